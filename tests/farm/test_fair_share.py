"""Scheduling a shared farm, over a real farm: fair share between users and between
weighted projects, quotas, job dependencies, preview order and job-end webhooks.

The farm runs four no-op render actors (``RAYFARM_ACTOR_CLASS``; Ray is told the machine
has four CPUs, ``RAY_OVERRIDE_RESOURCES``, as no-op actors use none): each task takes
``TASK_S`` seconds, long enough that tasks go one per actor call (no batches), so which
job holds which actor when is read off the jobs' events.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import subprocess
import threading
import time
from collections import Counter
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rayfarm import Farm, InvalidSpec, JobState
from rayfarm.cluster.ports import free_port

from helpers import ADMIN_TOKEN, PYTHON
from helpers.farms import WAIT_S, completed, run_farm

pytestmark = pytest.mark.slow

NOOP = "rayfarm.render.noop:NoopActor"
#: Seconds each task takes: above the batching threshold (``runs.SHORT_TASK_S``).
TASK_S = 0.6
ACTORS = 4


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("share-faults")


@pytest.fixture(scope="module")
def shared_farm(tmp_path_factory, farm_env, faults):
    env = {**farm_env, "RAYFARM_ACTOR_CLASS": NOOP, "RAYFARM_NOOP_TASK_S": str(TASK_S),
           "RAYFARM_CPU_ACTORS": str(ACTORS), "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": ACTORS}),
           "RAYFARM_NOOP_FAULTS": str(faults), "RAYFARM_WEBHOOK_ALLOW_HOSTS": "127.0.0.1,::1",
           "RAYFARM_WEBHOOK_BACKOFF_S": "0.5"}  # fmt: skip
    yield from run_farm(tmp_path_factory.mktemp("share-farm"), env)


@pytest.fixture(scope="module")
def admin(shared_farm):
    with Farm(shared_farm.url) as client:
        yield client


@pytest.fixture
def artist(admin):
    """``artist(name, projects)``: an SDK client of a new artist's (closed afterwards)."""
    made: list[Farm] = []

    def make(name: str, projects: list[str]) -> Farm:
        made.append(Farm(admin.url, token=admin.create_token(name, "artist", projects)))
        return made[-1]

    yield make
    for client in made:
        client.close()


def _cli(farm, *args: str, token: str = ADMIN_TOKEN) -> str:
    out = subprocess.run(
        [PYTHON, "-m", "rayfarm", "--url", farm.url, *args], capture_output=True, text=True,
        timeout=120, env={"RAYFARM_TOKEN": token, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def _at(event: dict[str, str]) -> float:
    return datetime.fromisoformat(event["at"]).timestamp()


def _starts(farm, *job_ids: str) -> list[tuple[float, str, str, int]]:
    """(time, actor, job id, frame) of every task start of the jobs, in time order."""
    found = []
    for job_id in job_ids:
        for e in farm.events(job_id):
            if e["kind"] == "task_started":
                found.append((_at(e), e["actor"], job_id, int(e["frame"])))
    return sorted(found)


def _holders(starts: list[tuple[float, str, str, int]], t: float) -> Counter:
    """How many actors each job holds at ``t``: an actor works for the job of its latest
    task start up to ``t``."""
    latest: dict[str, str] = {}
    for at, actor, job_id, _ in starts:
        if at > t:
            break
        latest[actor] = job_id
    return Counter(latest.values())


def _done_at(farm, job_id: str, count: int) -> float:
    """When the job's ``count``-th task finished."""
    done = sorted(_at(e) for e in farm.events(job_id) if e["kind"] == "task_done")
    return done[count - 1]


def _wait_idle(farm: Farm) -> None:
    deadline = time.monotonic() + WAIT_S
    while farm.jobs(state="PROCESSING", limit=1) or farm.jobs(state="PENDING", limit=1):
        assert time.monotonic() < deadline, "the farm did not go idle"
        time.sleep(0.2)


def test_a_small_job_of_another_user_starts_while_a_big_one_runs(shared_farm, artist,
                                                                  small_scene):  # fmt: skip
    alice, bob = artist("alice", ["film"]), artist("bob", ["ads"])
    big = alice.submit(small_scene, frames="1-40")
    deadline = time.monotonic() + WAIT_S
    while big.status().tasks_done < 1:  # every actor is busy with alice's job
        assert time.monotonic() < deadline
        time.sleep(0.05)
    small = bob.submit(small_scene, frames="1-4")
    completed(small)
    completed(big)
    starts = _starts(shared_farm, big.id, small.id)
    bobs = [t for t, _, job, _ in starts if job == small.id]
    # Bob's frames all started before alice's job was half done.
    assert max(bobs) < _done_at(shared_farm, big.id, 20)
    # The first as soon as an actor was free: alice's job, which held every actor, did
    # not start a task on each of them again before bob's did.
    submitted = small.created_at.timestamp()
    meanwhile = [t for t, _, job, _ in starts if job == big.id and submitted < t < min(bobs)]
    assert len(meanwhile) < ACTORS, meanwhile


def test_running_slots_follow_the_project_weights(shared_farm, admin, artist, small_scene):
    _wait_idle(admin)
    assert "film  3" in _cli(shared_farm, "admin", "share", "set", "film", "3")
    alice, bob = artist("alice", ["film"]), artist("bob", ["ads"])
    a = alice.submit(small_scene, frames="1-48", project="film")
    b = bob.submit(small_scene, frames="1-48", project="ads")
    completed(a)
    completed(b)
    starts = _starts(shared_farm, a.id, b.id)
    last_start = {job: max(t for t, _, j, _ in starts if j == job) for job in (a.id, b.id)}
    both_from = max(min(t for t, _, j, _ in starts if j == job) for job in (a.id, b.id))
    both_until = min(last_start.values())  # from then on one job has nothing waiting
    # Past the first round of tasks, while both have work, each start sees the slots.
    settle = both_from + 2 * TASK_S
    samples = [_holders(starts, t) for t, _, _, _ in starts if settle <= t < both_until]
    assert len(samples) >= 10, (len(samples), both_from, both_until)
    held = Counter((s[a.id], s[b.id]) for s in samples)
    assert held.most_common(1)[0][0] == (3, 1), held
    ratio = sum(s[a.id] for s in samples) / max(1, sum(s[b.id] for s in samples))
    assert 2.5 <= ratio <= 3.5, (ratio, held)
    admin.set_share("film", None)


def test_a_quota_caps_a_users_slots_and_the_waiting_job_says_why(shared_farm, admin, artist,
                                                                   small_scene):  # fmt: skip
    _wait_idle(admin)
    assert "user carol  gpu -  cpu 1" in _cli(shared_farm, "admin", "quota", "set", "user",
                                               "carol", "--cpu", "1")  # fmt: skip
    carol = artist("carol", [])
    first = carol.submit(small_scene, frames="1-10")
    second = carol.submit(small_scene, frames="1-2")
    reason = "over quota: user carol's jobs hold the 1 CPU slot(s) it may have at once"
    deadline = time.monotonic() + WAIT_S
    while second.status().detail != reason:  # queued behind carol's quota, saying so
        assert second.state is JobState.PENDING and time.monotonic() < deadline
        time.sleep(0.05)
    assert reason in _cli(shared_farm, "status", second.id, token=carol.token or "")
    completed(first)
    completed(second)
    assert second.detail is None  # once it ran, nothing holds it
    # Said once while it was queued (and, running, again: its second task waited for the
    # slot its first held).
    events = shared_farm.events(second.id)
    started = next(i for i, e in enumerate(events) if e.get("to") == "PROCESSING")
    assert [e["reason"] for e in events[:started] if e["kind"] == "waiting"] == [reason]
    assert {e["reason"] for e in events if e["kind"] == "waiting"} == {reason}
    # Never two of carol's tasks at once: each started a whole task after the one before.
    starts = [t for t, _, _, _ in _starts(shared_farm, first.id, second.id)]
    assert len(starts) == 12
    assert all(b - a >= TASK_S - 0.01 for a, b in itertools.pairwise(starts))
    admin.set_quota("user", "carol")


def test_a_job_waits_for_its_dependencies_and_fails_with_them(shared_farm, admin, small_scene,
                                                              faults):  # fmt: skip
    _wait_idle(admin)
    first = admin.submit(small_scene, frames="1-40")
    after = admin.submit(small_scene, frames="1-9", depends_on=[first.id], order="preview")
    # The CLI's --after says the same.
    line = _cli(shared_farm, "submit", str(small_scene), "--frames", "1", "--after", first.id,
                "--json")  # fmt: skip
    by_cli = admin.job(json.loads(line[line.index("{") :])["id"])
    assert by_cli.spec.depends_on == (first.id,)
    completed(first)
    completed(after)
    completed(by_cli)
    blocked = [e["reason"] for e in shared_farm.events(after.id) if e["kind"] == "waiting"]
    assert blocked and blocked[0].startswith(f"blocked by {first.id} (P"), blocked
    finished = max(_at(e) for e in shared_farm.events(first.id) if e["kind"] == "state")
    starts = _starts(shared_farm, after.id)
    assert starts[0][0] >= finished  # not one task before its dependency completed
    assert {frame for *_, frame in starts[:ACTORS]} == {1, 9, 5, 3}

    # A dependency that fails fails its dependents, naming it; so does a cancelled one.
    (faults / "777").touch()  # frame 777's first render fails (the no-op's fault folder)
    doomed = admin.submit(small_scene, frames="777", max_retries=0)
    waiting = admin.submit(small_scene, frames="1-2", depends_on=[doomed.id])
    long = admin.submit(small_scene, frames="1-60")
    stranded = admin.submit(small_scene, frames="1-2", depends_on=[long.id])
    assert doomed.wait(timeout=WAIT_S).state is JobState.FAILED
    assert waiting.wait(timeout=WAIT_S).state is JobState.FAILED
    assert waiting.refresh().error == f"job {doomed.id}, which this job depends on, failed"
    long.cancel()
    assert stranded.wait(timeout=WAIT_S).state is JobState.FAILED
    assert stranded.refresh().error == (f"job {long.id}, which this job depends on, was cancelled")
    assert not [e for e in shared_farm.events(stranded.id) if e["kind"] == "task_started"]

    # Refused at submission: an unknown job, a failed one; and a change that closes a cycle.
    with pytest.raises(InvalidSpec, match="depends_on: no job 0123456789abcdef"):
        admin.submit(small_scene, frames="1", depends_on=["0123456789abcdef"])
    with pytest.raises(InvalidSpec, match=f"job {stranded.id} is FAILED"):
        admin.submit(small_scene, frames="1", depends_on=[stranded.id])
    blocker = admin.submit(small_scene, frames="1-40")
    b = admin.submit(small_scene, frames="1", depends_on=[blocker.id])  # queued a while
    c = admin.submit(small_scene, frames="1", depends_on=[b.id])
    with pytest.raises(InvalidSpec, match=f"cycle: {b.id} -> {c.id} -> {b.id}"):
        admin.set_dependencies(b.id, [blocker.id, c.id])
    assert admin.job(b.id).spec.depends_on == (blocker.id,)
    for job in (blocker, b, c):
        completed(job)


class _Receiver(BaseHTTPRequestHandler):
    """A webhook receiver: records each call; the first call to each path answers 500."""

    calls: list[tuple[str, dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        first = not any(path == self.path for path, _, _ in self.calls)
        self.calls.append((self.path, dict(self.headers), body))
        self.send_response(500 if first else 204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_jobs_end_is_posted_signed_and_retried_after_a_500(shared_farm, artist, small_scene):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        dora = artist("dora", [])
        # A name: resolved, its addresses checked, the call sent to the address checked.
        mine = f"http://localhost:{server.server_port}/mine"
        secret = dora.set_webhook(mine)["secret"]
        assert secret and dora.webhook() == {"url": mine, "secret": secret}
        job = completed(dora.submit(small_scene, frames="1-2", webhook=f"{base}/job?t=x"))
        deadline = time.monotonic() + 60
        while len(_Receiver.calls) < 4:  # each URL: the 500, then the retry
            assert time.monotonic() < deadline, _Receiver.calls
            time.sleep(0.1)
    finally:
        server.shutdown()
        server.server_close()
    by_path: dict[str, list[dict]] = {}
    for path, headers, body in _Receiver.calls:
        host = "localhost" if path == "/mine" else "127.0.0.1"
        assert headers["Host"] == f"{host}:{server.server_port}"
        # The receiver's check: the HMAC-SHA256 of the raw body with the secret.
        want = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Rayfarm-Signature"], want)
        payload = json.loads(body)
        assert headers["X-Rayfarm-Delivery"] == payload["id"]
        by_path.setdefault(path, []).append(payload)
    assert sorted(by_path) == ["/job?t=x", "/mine"]
    for calls in by_path.values():
        assert [c["attempt"] for c in calls] == [1, 2]
        assert calls[0]["id"] == calls[1]["id"]  # one delivery, tried twice
        assert calls[1]["event"] == "job.completed"
        assert calls[1]["job"] == {
            "id": job.id, "state": "COMPLETED", "owner": "dora", "project": None,
            "error": None, "frames_done": 2, "frames_total": 2,
        }  # fmt: skip
    logged = [e["outcome"] for e in shared_farm.events(job.id) if e["kind"] == "webhook"]
    assert sorted(logged) == sorted(["HTTP 500; trying again (attempt 2 of 8)"] * 2
                                    + ["delivered HTTP 204"] * 2)  # fmt: skip
