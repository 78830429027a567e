"""Scheduling over HTTP, as an ASGI app on a real Redis (no Ray: nothing renders):
project weights, quotas, urgent jobs, dependencies checked at submission (unknown,
invisible, failed, cycles) and webhooks (settings, a job's own URL kept out of its spec,
a call to a private address refused). Every refusal is a precise 4xx that stores
nothing."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis

from rayfarm.cluster.policy import PolicyStore
from rayfarm.cluster.scheduler import Policy, Quota

from helpers.api import api_client, refused, user_headers


@pytest.fixture
def api(redis_url, tmp_path):
    with api_client(redis_url, tmp_path, webhook_backoff_s=0.2) as client:
        client.redis_url = redis_url
        yield client


def _submit(api, scene, headers=None, **spec):
    body = json.dumps({"frames": "1-2", **spec})
    return api.post("/jobs", files={"scene": ("shot.blend", scene.read_bytes())},
                    data={"spec": body}, headers=headers or {})  # fmt: skip


def _policy(api) -> Policy:
    async def load() -> Policy:
        client = aioredis.Redis.from_url(api.redis_url, decode_responses=True)
        try:
            return await PolicyStore(client).load()
        finally:
            await client.aclose()

    return asyncio.run(load())


def test_admins_weigh_projects_and_set_quotas_which_everyone_reads(api):
    ana = user_headers(api, "ana", "artist", ["film"])
    assert api.put("/shares/film", json={"weight": 3}).json() == {"project": "film", "weight": 3.0}
    assert api.put("/shares/ads", json={"weight": 0.5}).status_code == 200
    assert api.get("/shares", headers=ana).json() == {"shares": {"film": 3.0, "ads": 0.5}}
    refused(api.put("/shares/film", json={"weight": 9}, headers=ana), 403, "for admins")
    for bad in ({"weight": 0}, {"weight": -1}, {"weight": "3"}, {"weight": True},
                {"weight": 1e9}, {"weight": 1, "more": 2}, [3]):  # fmt: skip
        refused(api.put("/shares/film", json=bad), 400, "weight")
    refused(api.put("/shares/-bad-", json={"weight": 1}), 400, "project name")
    assert api.delete("/shares/ads").status_code == 200

    assert api.put("/quotas/user/ana", json={"cpu": 2}).json() == {
        "scope": "user", "name": "ana", "gpu": None, "cpu": 2}  # fmt: skip
    assert api.put("/quotas/project/film", json={"gpu": 4, "cpu": None}).status_code == 200
    assert api.get("/quotas", headers=ana).json() == {"quotas": {
        "user": {"ana": {"gpu": None, "cpu": 2}},
        "project": {"film": {"gpu": 4, "cpu": None}},
    }}  # fmt: skip
    refused(api.put("/quotas/group/x", json={"cpu": 1}), 400, "per user or per project")
    for bad in ({"cpu": -1}, {"cpu": 1.5}, {"gpu": "2"}, {"slots": 2}, {}):
        refused(api.put("/quotas/user/ana", json=bad), 400, "")
    refused(api.put("/quotas/user/ana", json={"cpu": 1}, headers=ana), 403, "for admins")
    # What the dispatcher reads every round.
    assert _policy(api) == Policy(
        weights={"film": 3.0}, users={"ana": Quota(cpu=2)}, projects={"film": Quota(gpu=4)}
    )
    assert api.delete("/quotas/user/ana").status_code == 200
    assert _policy(api).users == {}


def test_dependencies_are_checked_when_a_job_is_submitted(api, small_scene):
    first = _submit(api, small_scene).json()
    second = _submit(api, small_scene, depends_on=[first["id"]], order="preview")
    assert second.status_code == 201, second.text
    assert second.json()["spec"]["depends_on"] == [first["id"]]
    assert second.json()["spec"]["order"] == "preview"
    jobs = api.get("/jobs").json()["total"]

    unknown = "0123456789abcdef"
    error = refused(_submit(api, small_scene, depends_on=[unknown]), 422, f"no job {unknown}")
    assert error["detail"] == {"field": "depends_on", "job_id": unknown}
    refused(_submit(api, small_scene, depends_on=["nope"]), 422, "not a job id")
    # Another artist's job is as unknown to ana as a job that does not exist.
    ana = user_headers(api, "ana", "artist")
    ben = user_headers(api, "ben", "artist")
    bens = _submit(api, small_scene, headers=ben).json()
    refused(_submit(api, small_scene, headers=ana, depends_on=[bens["id"]]), 422,
            f"depends_on: no job {bens['id']}")  # fmt: skip
    # A job that can never complete cannot be waited for.
    api.post(f"/jobs/{bens['id']}/cancel")
    refused(_submit(api, small_scene, headers=ben, depends_on=[bens["id"]]), 422,
            f"job {bens['id']} is CANCELLED")  # fmt: skip
    assert api.get("/jobs").json()["total"] == jobs + 1  # only ben's job was made


def test_a_dependency_cycle_is_refused(api, small_scene):
    a = _submit(api, small_scene).json()["id"]
    b = _submit(api, small_scene, depends_on=[a]).json()["id"]
    c = _submit(api, small_scene, depends_on=[b]).json()["id"]
    error = refused(api.put(f"/jobs/{a}/depends_on", json={"depends_on": [c]}), 422,
                    f"a dependency cycle: {a} -> {c} -> {b} -> {a}")  # fmt: skip
    assert error["detail"]["cycle"] == [a, c, b, a]
    refused(api.put(f"/jobs/{a}/depends_on", json={"depends_on": [a]}), 422,
            f"cycle: {a} -> {a}")  # fmt: skip
    assert api.get(f"/jobs/{a}").json()["spec"]["depends_on"] is None  # unchanged
    # A change that closes no cycle is taken; only a queued job's may change.
    other = _submit(api, small_scene).json()["id"]
    changed = api.put(f"/jobs/{c}/depends_on", json={"depends_on": [b, other]})
    assert changed.status_code == 200 and changed.json()["spec"]["depends_on"] == [b, other]
    api.post(f"/jobs/{other}/cancel")
    refused(api.put(f"/jobs/{other}/depends_on", json={"depends_on": []}), 409, "CANCELLED")
    ana = user_headers(api, "ana", "artist")
    refused(api.put(f"/jobs/{a}/depends_on", json={"depends_on": []}, headers=ana), 404,
            "no job")  # fmt: skip


def test_an_admin_marks_a_job_urgent_and_it_moves_to_the_front(api, small_scene):
    first = _submit(api, small_scene, priority=50).json()["id"]
    later = _submit(api, small_scene, priority=10).json()["id"]
    queue = "rayfarm:queue"
    assert [j.decode() for j in api.redis.zrange(queue, 0, -1)] == [first, later]
    marked = api.post(f"/jobs/{later}/urgent", json={"urgent": True}).json()
    assert marked["urgent"] is True
    assert [j.decode() for j in api.redis.zrange(queue, 0, -1)] == [later, first]
    ana = user_headers(api, "ana", "artist")
    refused(api.post(f"/jobs/{first}/urgent", headers=ana), 404, "no job")
    refused(api.post(f"/jobs/{later}/urgent", json={"urgent": "yes"}), 400, "urgent")
    assert api.post(f"/jobs/{later}/urgent", json={"urgent": False}).json()["urgent"] is False
    assert [j.decode() for j in api.redis.zrange(queue, 0, -1)] == [first, later]
    assert api.post(f"/jobs/{first}/urgent").json()["urgent"] is True  # no body: urgent


def test_webhooks_are_set_per_user_and_per_job(api, small_scene):
    ana = user_headers(api, "ana", "artist")
    viewer = user_headers(api, "vi", "viewer")
    assert api.get("/webhook", headers=ana).json() == {"url": None, "secret": None}
    made = api.put("/webhook", json={"url": "https://hooks.example/rf?t=1"}, headers=ana).json()
    assert made["url"] == "https://hooks.example/rf?t=1" and made["secret"].startswith("whsec_")
    assert api.get("/webhook", headers=ana).json() == made
    again = api.put("/webhook", json={"url": "https://hooks.example/b"}, headers=ana).json()
    assert again["secret"] == made["secret"]
    rotated = api.put("/webhook", json={"url": "https://hooks.example/b", "rotate": True},
                      headers=ana).json()  # fmt: skip
    assert rotated["secret"] != made["secret"]
    for bad in ("ftp://hooks.example/x", "https://me:pw@hooks.example/", "hooks.example",
                "http://hooks.example:port/", "https://" + "x" * 3000):  # fmt: skip
        refused(api.put("/webhook", json={"url": bad}, headers=ana), 400, "url")
    refused(api.put("/webhook", json={"url": "https://x.example"}, headers=viewer), 403, "")
    assert api.delete("/webhook", headers=ana).json() == {"url": None,
                                                          "secret": rotated["secret"]}  # fmt: skip

    # A job's own webhook is kept apart from its spec (its members see the spec).
    job = _submit(api, small_scene, headers=ana, webhook="https://hooks.example/job?token=s")
    assert job.status_code == 201, job.text
    assert job.json()["spec"].get("webhook") is None
    stored = api.redis.hget(f"rayfarm:job:{job.json()['id']}", "webhook")
    assert stored == b"https://hooks.example/job?token=s"
    refused(_submit(api, small_scene, webhook="file:///etc/passwd"), 422, "webhook")


def test_a_webhook_to_a_private_address_is_refused_and_logged(api, small_scene):
    """The farm must not be turned against its own network: without the admin's allow
    list, a job's end is not sent to a loopback address, and its log says why."""
    api.put("/webhook", json={"url": "http://127.0.0.1:9/hook"})
    job = _submit(api, small_scene, webhook="http://localhost:9/job").json()["id"]
    api.post(f"/jobs/{job}/cancel")
    deadline = time.monotonic() + 30
    while True:
        events = [e for _, e in api.redis.xrange(f"rayfarm:job:{job}:events")
                  if e[b"kind"] == b"webhook"]  # fmt: skip
        if len(events) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    outcomes = sorted(e[b"outcome"].decode() for e in events)
    assert len(outcomes) == 2, outcomes
    # An address, and a name whose addresses are checked once resolved.
    assert outcomes[0].startswith("refused: 127.0.0.1 is a non-public address (127.0.0.1)")
    assert outcomes[1].startswith("refused: localhost is a non-public address")
    assert all("RAYFARM_WEBHOOK_ALLOW_HOSTS" in o for o in outcomes)
