"""Rate limits and the priority range: ``rayfarm.cluster.limits`` on a real redis-server,
and the API that applies them as an ASGI app (real Redis, real file storage, no Ray).
Over a real farm: tests/farm/test_farm_retention.py."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
import redis.asyncio as aioredis

from rayfarm import Forbidden, JobSpec, TooManyRequests
from rayfarm.cluster.auth import AuthStore, Principal, Role
from rayfarm.cluster.limits import Limits
from rayfarm.cluster.settings import Settings

from helpers import AUTH
from helpers.api import api_client, refused, user_headers

ANA = Principal("ana", Role.ARTIST)
ROOT = Principal("root", Role.ADMIN)


def _limits(redis_url, body, **settings):
    async def main():
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        auth = AuthStore(client)
        s = Settings(redis_url=redis_url, storage="file:///tmp/unused", blender=("5.0",),
                     **settings)  # fmt: skip
        try:
            return await body(Limits(client, auth, s), auth)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_failed_sign_ins_past_the_burst_are_429_per_address(redis_url):
    async def body(limits: Limits, auth: AuthStore):
        for _ in range(5):
            await limits.sign_in_failed("10.0.0.9", "unknown or malformed token")  # a 401
        with pytest.raises(TooManyRequests, match="RAYFARM_AUTH_FAILURE_BURST") as refused:
            await limits.sign_in_failed("10.0.0.9", "unknown or malformed token")
        assert 1 <= refused.value.retry_after_s <= 2  # one failure a second refills
        await limits.sign_in_failed("10.0.0.9", "no token", guess=False)  # guessed nothing
        await limits.sign_in_failed("10.0.0.10", "unknown or malformed token")  # its own
        await asyncio.sleep(refused.value.retry_after_s)
        await limits.sign_in_failed("10.0.0.9", "unknown or malformed token")  # refilled

    _limits(redis_url, body, auth_failure_burst=5, auth_failures_per_min=60)


def test_failed_sign_ins_are_aggregated_in_the_audit_log(redis_url):
    """3 000 wrong tokens from one address leave one audit record (with the count), not
    3 000; a stranger using many addresses gets ``auth_audit_per_min`` records a
    minute farm-wide; every failure is counted in the metrics."""

    async def body(limits: Limits, auth: AuthStore):
        started = time.monotonic()
        await auth.audit(who="ana", action="POST /jobs", outcome=201)  # a real record
        for _ in range(3000):
            try:
                await limits.sign_in_failed("10.0.0.9", "unknown or malformed token")
            except TooManyRequests:
                pass
        (record,) = await auth.audit_log(action="sign-in failed")
        assert (record["from"], record["count"], record["outcome"]) == ("10.0.0.9", "1", "401")
        for n in range(50):
            await limits.sign_in_failed(f"10.1.0.{n}", "unknown or malformed token")
        records = await auth.audit_log(action="sign-in failed", limit=1000)
        # The farm-wide cap: 10.0.0.9's and four others, plus one per 12 s the test took
        # (a bucket of 5 refilled at 5 a minute; a busy machine takes more than 12 s).
        refilled = int((time.monotonic() - started) * 5 / 60)
        assert 5 <= len(records) <= 5 + refilled, (len(records), refilled)
        assert {r["from"] for r in records[:-1]} <= {f"10.1.0.{n}" for n in range(50)}
        assert (await auth.audit_log(user="ana"))[0]["action"] == "POST /jobs"
        assert int(await auth.redis.hget("rayfarm:metrics", "refused_sign_in_total")) == 3050

    _limits(redis_url, body, auth_audit_per_min=5)


def test_the_next_record_carries_the_tally_since_the_last(redis_url):
    async def body(limits: Limits, auth: AuthStore):
        for _ in range(7):
            await limits.refused("10.0.0.9", "anonymous", "POST /jobs", 403)
        # A minute on (the address's record bucket refilled): the next one is recorded,
        # carrying the six held back and itself.
        await auth.redis.hset("rayfarm:limit:record:anonymous:10.0.0.9", "at", 0)
        await limits.refused("10.0.0.9", "anonymous", "POST /jobs", 403)
        records = await auth.audit_log(action="POST /jobs")
        assert [r["count"] for r in records] == ["7", "1"]
        assert "7 request(s) without a valid token from 10.0.0.9" in records[0]["detail"]

    _limits(redis_url, body)


def test_artists_submissions_are_rate_limited_and_admins_are_not(redis_url):
    async def body(limits: Limits, auth: AuthStore):
        for _ in range(3):
            await limits.take_submission(ANA)
        with pytest.raises(TooManyRequests, match="RAYFARM_SUBMIT_BURST") as refused:
            await limits.take_submission(ANA)
        assert refused.value.retry_after_s == 60
        await limits.take_submission(Principal("bo", Role.ARTIST))
        for _ in range(10):
            await limits.take_submission(ROOT)

    _limits(redis_url, body, submit_burst=3, submit_per_min=1)


def test_the_priority_range_of_artists(redis_url):
    async def body(limits: Limits, auth: AuthStore):
        assert limits.check_priority(ANA, JobSpec(frames="1", priority=60)).priority == 60
        with pytest.raises(Forbidden, match=r"0-60 \(RAYFARM_ARTIST_MAX_PRIORITY") as refused:
            limits.check_priority(ANA, JobSpec(frames="1", priority=61))
        assert refused.value.detail == {"field": "priority", "min": 0, "max": 60}
        assert limits.check_priority(ROOT, JobSpec(frames="1", priority=100)).priority == 100

    _limits(redis_url, body, artist_max_priority=60)


def test_settings_refuse_a_priority_range_below_the_default():
    with pytest.raises(ValueError, match="between 50"):
        Settings(artist_max_priority=40, blender=("5.0",))


# -- over HTTP -------------------------------------------------------------------------


@pytest.fixture
def api(redis_url, tmp_path):
    with api_client(redis_url, tmp_path, auth_failure_burst=5, auth_failures_per_min=1,
                    submit_burst=2, submit_per_min=1) as client:  # fmt: skip
        yield client


def test_guessing_tokens_is_429_with_retry_after_while_a_valid_token_works(api):
    wrong = {"Authorization": "Bearer rf_" + "A" * 43}
    for _ in range(5):
        refused(api.get("/jobs", headers=wrong), 401, "unknown or malformed token")
    r = api.get("/jobs", headers=wrong)
    refused(r, 429, "too many failed sign-ins from testclient")
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    refused(api.post("/jobs", headers={"Authorization": "Basic eA=="}), 429, "RAYFARM_AUTH_")
    # No credentials at all guess nothing (a browser before signing in): 401 still.
    refused(api.get("/session", headers={"Authorization": ""}), 401, "no token")
    # A valid token from the very same address is taken: the address may be shared.
    assert api.get("/jobs").status_code == 200
    assert api.get("/whoami", headers=user_headers(api, "ana")).json()["user"] == "ana"
    records = api.get("/audit", params={"action": "sign-in failed"}).json()["records"]
    assert [(r["count"], r["from"]) for r in records] == [("1", "testclient")]
    assert api.get("/audit", params={"action": "POST /jobs"}).json()["records"] == []
    metrics = api.get("/metrics").text
    assert "rayfarm_refused_sign_in_total 8.0" in metrics


def test_an_artist_submitting_too_fast_gets_429(api, small_scene):
    ana = user_headers(api, "ana")
    scene = small_scene.read_bytes()

    def post(headers):
        form = {"scene": ("shot.blend", scene)}
        return api.post("/jobs", files=form, data={"spec": '{"frames": "1"}'}, headers=headers)

    assert [post(ana).status_code for _ in range(2)] == [201, 201]
    r = post(ana)
    refused(r, 429, "ana is submitting too fast")
    assert int(r.headers["Retry-After"]) == 60
    # The listing route counts the same way; an admin is not limited.
    digest = hashlib.sha256(scene).hexdigest()
    body = {"spec": {"frames": "1"}, "main": "shot.blend",
            "files": [{"path": "shot.blend", "sha256": digest, "size": len(scene)}]}  # fmt: skip
    refused(api.post("/jobs", json=body, headers=ana), 429, "RAYFARM_SUBMIT_PER_MIN")
    assert [post(AUTH).status_code for _ in range(4)] == [201] * 4
    assert api.get("/jobs", params={"owner": "ana"}).json()["total"] == 2


def test_an_artist_priority_above_the_range_is_403_and_stores_nothing(api, small_scene):
    ana = user_headers(api, "ana")
    form = {"scene": ("shot.blend", small_scene.read_bytes())}
    r = api.post("/jobs", files=form, data={"spec": '{"frames": "1", "priority": 90}'},
                 headers=ana)  # fmt: skip
    error = refused(r, 403, "priority 90 is above the range an artist may use: 0-50")
    assert error["detail"]["max"] == 50
    assert not (api.storage_dir / "blobs").exists()
    r = api.post("/jobs", files=form, data={"spec": '{"frames": "1", "priority": 90}'})
    assert r.status_code == 201 and r.json()["spec"]["priority"] == 90  # the admin


def test_grpc_peers_are_limited_by_address_not_by_connection():
    from rayfarm.cluster.grpc_ingress import peer_address

    assert peer_address("ipv4:10.0.0.9:51234") == "10.0.0.9"
    assert peer_address("ipv6:[2001:db8::7]:51234") == "2001:db8::7"
    assert peer_address("unix:/tmp/grpc.sock") == "unix:/tmp/grpc.sock"
