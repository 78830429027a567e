"""Retention, quotas and rate limits over a real farm (`rayfarm up`: Ray, Redis, Serve
behind its proxy, render actors, file storage): what deleting a job frees in storage and
in Redis, a retention that deletes old jobs by itself, 429 on token guessing while a
valid token works, the submission rate, the artists' priority range and the upload
quota. The logic in detail: tests/service/test_retention.py and
tests/service/test_rate_limits.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from rayfarm import (
    AsyncFarm,
    Farm,
    Forbidden,
    InvalidTransition,
    JobNotFound,
    JobState,
    PayloadTooLarge,
    TooManyRequests,
)

from helpers import AUTH, PYTHON
from helpers.blender import SMALL
from helpers.farms import WAIT_S, LocalFarm, completed, run_farm

pytestmark = pytest.mark.slow

#: The limits of the module's farm: low, to be reached in a test.
LIMITS = {
    "RAYFARM_CPU_ACTORS": "1",
    "RAYFARM_SUBMIT_BURST": "4",
    "RAYFARM_SUBMIT_PER_MIN": "1",
    "RAYFARM_AUTH_FAILURE_BURST": "5",
    "RAYFARM_AUTH_FAILURES_PER_MIN": "1",
    "RAYFARM_UPLOAD_QUOTA_BYTES": "1500000",
    "RAYFARM_RETENTION_DAYS": "0",  # keep: the jobs here are deleted by hand
    "RAYFARM_SWEEP_INTERVAL_S": "1",  # storage measured every second or so
}


@pytest.fixture(scope="module")
def limited(tmp_path_factory, farm_env) -> Iterator[LocalFarm]:
    yield from run_farm(tmp_path_factory.mktemp("limited"), {**farm_env, **LIMITS})


def _redis(farm: LocalFarm) -> redis.Redis:
    """The farm's own Redis."""
    return redis.Redis.from_url(farm.redis_url, decode_responses=True)


def _artist(farm: LocalFarm, name: str) -> Farm:
    with Farm(farm.url) as admin:
        return Farm(farm.url, token=admin.create_token(name, role="artist"))


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _blob(farm: LocalFarm, data: bytes) -> Path:
    sha = hashlib.sha256(data).hexdigest()
    return farm.storage_dir / "blobs" / "sha256" / sha[:2] / sha


def _job_keys(r: redis.Redis, job_id: str) -> list[str]:
    return [k for k in r.scan_iter(f"rayfarm:job:{job_id}*")]


async def _delete_async(url: str, token: str, job_id: str) -> dict:
    async with AsyncFarm(url, token=token) as farm:
        return await (await farm.job(job_id)).delete()


def _measured(farm: LocalFarm, after: float) -> dict[str, float]:
    """The storage gauges of /metrics, once a sweep measured storage after ``after``."""
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(f"{farm.url}/metrics", timeout=30).text
        found = dict(re.findall(r'^rayfarm_storage_bytes\{area="(\w+)"\} (\S+)$', text, re.M))
        at = re.search(r"^rayfarm_storage_measured_timestamp_seconds (\S+)$", text, re.M)
        if at and float(at[1]) > after:
            return {area: float(v) for area, v in found.items()}
        assert time.monotonic() < deadline, "no sweep measured storage"
        time.sleep(0.5)


def test_deleting_jobs_frees_their_storage_and_redis_and_keeps_shared_blobs(
    limited, small_scene, make_scene
):
    """Jobs A and B render the same scene, C another. Deleting A frees A's frames, logs
    and Redis state and keeps the scene (B uses it); deleting C (through the asyncio SDK)
    frees its scene too, and so does `rayfarm rm B` for the first. A job still rendering
    is refused (409) until it is cancelled."""
    other = make_scene(*SMALL[:-1], "4")
    r = _redis(limited)
    with _artist(limited, "ana") as ana:
        a = ana.submit(small_scene, frames="1-2")
        b = ana.submit(small_scene, frames="3")
        c = ana.submit(other, frames="1")
        for job in (a, b, c):
            completed(job)
        files_a = _bytes(limited.storage_dir / "jobs" / a.id)
        keys_a = _job_keys(r, a.id)
        redis_a = sum(r.memory_usage(k) or 0 for k in keys_a)
        assert files_a > 0 and len(keys_a) >= 5 and redis_a > 0
        blobs_before = _bytes(limited.storage_dir / "blobs")

        freed = a.delete()
        assert (freed["state"], freed["bytes"], freed["blobs"]) == ("COMPLETED", files_a, 0)
        assert not (limited.storage_dir / "jobs" / a.id).exists()
        assert _job_keys(r, a.id) == []
        assert _blob(limited, small_scene.read_bytes()).exists()  # B uses it
        assert _bytes(limited.storage_dir / "blobs") == blobs_before
        with pytest.raises(JobNotFound):
            ana.job(a.id)
        assert a.id not in {j.id for j in ana.jobs(limit=500)}
        assert r.zscore("rayfarm:jobs:owner:ana", a.id) is None
        assert r.zscore("rayfarm:jobs:COMPLETED", a.id) is None

        freed = asyncio.run(_delete_async(limited.url, ana.token or "", c.id))
        size = other.stat().st_size
        assert (freed["blobs"], freed["blob_bytes"]) == (1, size)
        assert not _blob(limited, other.read_bytes()).exists()
        assert _bytes(limited.storage_dir / "blobs") == blobs_before - size

        cli = subprocess.run(
            [PYTHON, "-m", "rayfarm", "--url", limited.url, "rm", b.id],
            env={**os.environ, "RAYFARM_TOKEN": ana.token or ""},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert f"{b.id}  deleted (COMPLETED)" in cli.stdout
        assert not _blob(limited, small_scene.read_bytes()).exists()
        assert _bytes(limited.storage_dir / "blobs") == _bytes(limited.storage_dir / "jobs") == 0

        running = ana.submit(small_scene, frames="1-2000", priority=0)
        deadline = time.monotonic() + WAIT_S
        while running.status().state is JobState.PENDING:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with pytest.raises(InvalidTransition, match="cancel it first"):
            running.delete()
        running.cancel()
        assert running.delete()["state"] == "CANCELLED"
    deleted = time.time()
    measured = _measured(limited, deleted)
    assert measured["blobs"] == _bytes(limited.storage_dir / "blobs") == 0
    r.close()


def test_guessing_tokens_is_answered_429_while_a_valid_token_works(limited):
    wrong = {"Authorization": "Bearer rf_" + "Z" * 43}
    with httpx.Client(base_url=limited.url, timeout=30) as http:
        codes = [http.get("/jobs", headers=wrong).status_code for _ in range(8)]
        assert codes[:5] == [401] * 5 and codes[5:] == [429] * 3
        refused = http.get("/jobs/0123456789abcdef", headers=wrong)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "RAYFARM_AUTH_FAILURE_BURST" in refused.json()["error"]["message"]
        # The same client, with a valid token: taken (the address may be shared).
        assert http.get("/jobs", headers=AUTH).status_code == 200
        records = http.get("/audit", params={"action": "sign-in failed"}, headers=AUTH)
        assert [rec["count"] for rec in records.json()["records"]] == ["1"]


def test_an_artist_submitting_too_fast_or_too_high_is_refused(limited, small_scene):
    with _artist(limited, "bo") as bo, Farm(limited.url) as admin:
        with pytest.raises(Forbidden, match="0-50 \\(RAYFARM_ARTIST_MAX_PRIORITY"):
            bo.submit(small_scene, frames="1", priority=90)
        jobs = [bo.submit(small_scene, frames="1", priority=0) for _ in range(4)]
        with pytest.raises(TooManyRequests, match="RAYFARM_SUBMIT_BURST") as refused:
            bo.submit(small_scene, frames="1", priority=0)
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
        urgent = admin.submit(small_scene, frames="1", priority=90)  # an admin: any
        assert urgent.spec.priority == 90
        assert {j.id for j in bo.jobs()} == {j.id for j in jobs}


def test_uploads_past_the_quota_are_refused_naming_it(limited):
    first, second = os.urandom(1_000_000), os.urandom(600_000)
    with _artist(limited, "cy") as cy:

        def put(data: bytes) -> None:
            with cy._request("PUT", f"/blobs/{hashlib.sha256(data).hexdigest()}", content=data):
                pass

        put(first)
        with pytest.raises(PayloadTooLarge, match=r"quota of 1500000 bytes \(RAYFARM_UPLOAD_"):
            put(second)
    assert _blob(limited, first).exists() and not _blob(limited, second).exists()


def test_retention_deletes_old_finished_jobs_by_itself(tmp_path, farm_env, small_scene):
    """Jobs are kept 0.0001 days (8.64 s) after they finish: the farm's sweep deletes
    one, its files and the scene only it used, and audits it."""
    env = {**farm_env, "RAYFARM_CPU_ACTORS": "1", "RAYFARM_RETENTION_DAYS": "0.0001",
           "RAYFARM_SWEEP_INTERVAL_S": "1"}  # fmt: skip
    for farm in run_farm(tmp_path / "farm", env):
        r = _redis(farm)
        with Farm(farm.url) as client:
            job = completed(client.submit(small_scene, frames="1"))
            assert _bytes(farm.storage_dir / "jobs" / job.id) > 0
            assert _blob(farm, small_scene.read_bytes()).exists()
            deadline = time.monotonic() + 120
            while _job_keys(r, job.id):
                assert time.monotonic() < deadline, "retention did not delete the job"
                time.sleep(0.5)
            with pytest.raises(JobNotFound):
                client.job(job.id)
            assert not (farm.storage_dir / "jobs" / job.id).exists()
            assert not _blob(farm, small_scene.read_bytes()).exists()
            (record,) = client.audit(user="retention")
            assert record["job"] == job.id and "RAYFARM_RETENTION_DAYS" in record["detail"]
            assert _measured(farm, time.time()) == {"jobs": 0.0, "blobs": 0.0}
        r.close()
