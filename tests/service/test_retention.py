"""Deleting jobs, the blob index and the housekeeping sweep, on a real redis-server and
real file storage: what a deletion frees (bytes in storage and in Redis), which blobs
survive it, upload quotas, retention, and one sweep at a time; then ``DELETE /jobs/{id}``
and ``PUT /blobs``'s quota over HTTP (an ASGI app, no Ray). Over a real farm:
tests/farm/test_farm_retention.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rayfarm import InvalidRequest, InvalidTransition, JobNotFound, JobSpec, JobState
from rayfarm.cluster import blobs as blob_index
from rayfarm.cluster import keys
from rayfarm.cluster.auth import AuthStore
from rayfarm.cluster.deletion import LATE_WRITES_S, Remover
from rayfarm.cluster.progress import Finished
from rayfarm.cluster.settings import Settings
from rayfarm.cluster.storage import Storage, frame_key, task_log_key
from rayfarm.cluster.store import JobStore, connect
from rayfarm.cluster.sweeper import Sweeper
from rayfarm.models import JobRecord
from rayfarm.render.inputs import InputFile, Inputs, blob_key

from helpers import AUTH
from helpers.api import api_client, refused, user_headers

GRACE_S = 3600.0


class Farm:
    """A job store, file storage, remover and sweeper over one Redis database."""

    def __init__(self, redis_url: str, root: Path, **settings) -> None:
        self.redis = connect(redis_url)
        self.store = JobStore(self.redis)
        self.storage = Storage(root.as_uri())
        self.root = root
        self.remover = Remover(self.redis, self.store, self.storage)
        self.settings = Settings(redis_url=redis_url, storage=root.as_uri(), data_dir=str(root),
                                 blender=("5.0",), **settings)  # fmt: skip
        self.auth = AuthStore(self.redis)
        self.sweeper = Sweeper(
            self.redis, self.store, self.storage, self.remover, self.auth, self.settings
        )

    def blob(self, data: bytes) -> tuple[str, int]:
        sha = hashlib.sha256(data).hexdigest()
        self.storage.put_bytes(blob_key(sha), data)
        return sha, len(data)

    async def job(self, job_id, files, state=JobState.COMPLETED, owner="ana", project=None):
        """A job over ``files`` ((sha, size) each), taken to ``state``, with two stored
        frames, a log and events as a render leaves them."""
        spec = JobSpec(frames="1-2", project=project)
        job = JobRecord(id=job_id, state=JobState.PENDING, owner=owner, spec=spec,
                  scene_file="a.blend", frames_total=2, tasks_total=2,
                  created_at=datetime.now(UTC))  # fmt: skip
        listed = tuple(InputFile(f"f{i}.blend" if i == 0 else f"tex/{i}.png", sha, size)
                       for i, (sha, size) in enumerate(files))  # fmt: skip
        inputs = Inputs(self.storage.root, "f0.blend", listed)
        await self.store.create(job, inputs.to_json(), inputs.digest)
        if state is JobState.PENDING:
            return
        await self.store.transition(job_id, JobState.PROCESSING)
        for frame in (1, 2):
            key = frame_key(job_id, frame, "png")
            self.storage.put_bytes(key, b"P" * 5000)
            self.storage.put_bytes(task_log_key(job_id, f"f{frame:07d}t000", 1), b"log\n" * 100)
            done = Finished(
                frame,
                f"f{frame:07d}t000",
                1.0,
                {"frame": frame},
                key,
                {"sha256": "0" * 64, "size": 5000},
            )
            await self.store.finish_tasks(job_id, [done])
        if state is not JobState.PROCESSING:
            await self.store.transition(job_id, state)

    def stored(self, prefix: str) -> int:
        """Bytes under ``prefix`` on disk."""
        folder = self.root / prefix
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    async def redis_bytes(self, job_id: str) -> int:
        """Bytes Redis holds in the job's own keys (MEMORY USAGE)."""
        total = 0
        for key in self.job_keys(job_id):
            total += await self.redis.memory_usage(key) or 0
        return total

    @staticmethod
    def job_keys(job_id: str) -> list[str]:
        return [keys.job(job_id), keys.tasks(job_id), keys.frames(job_id),
                keys.frame_meta(job_id), keys.tries(job_id), keys.attempts(job_id),
                keys.events(job_id)]  # fmt: skip


def _run(redis_url, tmp_path, body, **settings):
    async def main():
        farm = Farm(redis_url, tmp_path / "storage", **settings)
        try:
            return await body(farm)
        finally:
            await farm.redis.aclose()

    return asyncio.run(main())


A, B, C = "a" * 16, "b" * 16, "c" * 16


def test_a_deletion_frees_the_job_and_the_blobs_only_it_used(redis_url, tmp_path):
    """Job A uses a shared scene and its own texture; job B the shared scene. Deleting A
    frees A's frames, logs, Redis state and its texture, not the shared scene; deleting
    B then frees the scene."""

    async def body(farm: Farm):
        shared, own = farm.blob(b"S" * 40_000), farm.blob(b"T" * 30_000)
        # Once first: Redis's memory then holds the scripts a deletion loads.
        await farm.job(C, [farm.blob(b"W")])
        await farm.remover.delete_job(C)
        await farm.job(A, [shared, own], project="p1")
        await farm.job(B, [shared])
        for i in range(2000):  # an execution log of some size, as a real job has
            await farm.store.event(A, "progress", task="f0000001t000", samples=i, of=2000)
        redis_before = await farm.redis_bytes(A)
        memory_before = (await farm.redis.info("memory"))["used_memory"]
        files_before = farm.stored(f"jobs/{A}")
        assert redis_before > 100_000 and files_before > 10_000

        gone = await farm.remover.delete_job(A)
        assert (gone.state, gone.objects, gone.bytes) == (JobState.COMPLETED, 4, files_before)
        assert (gone.blobs, gone.blob_bytes) == (1, 30_000)
        # Redis: every key of the job gone, and the memory with it.
        assert [k for k in farm.job_keys(A) if await farm.redis.exists(k)] == []
        assert await farm.redis_bytes(A) == 0
        memory_after = (await farm.redis.info("memory"))["used_memory"]
        assert memory_before - memory_after > redis_before // 2
        # Gone from every listing and index; 404 everywhere.
        for index in (keys.all_jobs(), keys.jobs_in("COMPLETED"), keys.jobs_of("ana"),
                      keys.jobs_in_project("p1")):  # fmt: skip
            assert await farm.redis.zscore(index, A) is None
        assert [j.id for j in (await farm.store.list_jobs())[0]] == [B]
        assert await farm.store.list_jobs(owner="ana", among=[("project", "p1")]) == ([], 0)
        with pytest.raises(JobNotFound):
            await farm.store.get(A)
        with pytest.raises(JobNotFound):
            await farm.remover.delete_job(A)
        # Storage: the folder and the texture gone; the shared scene kept (B uses it).
        assert not (farm.root / "jobs" / A).exists() and farm.stored(f"jobs/{B}") > 0
        assert not farm.storage.exists(blob_key(own[0]))
        assert farm.storage.exists(blob_key(shared[0]))
        assert await farm.store.blobs.stats() == {"count": 1, "bytes": 40_000, "pending_bytes": 0}
        changes = await farm.store.read_after(keys.changes(), None, 100)
        assert changes[-1][1] == {"job": A, "owner": "ana", "project": "p1", "state": "DELETED"}

        gone = await farm.remover.delete_job(B)
        assert (gone.blobs, gone.blob_bytes) == (1, 40_000)
        assert not farm.storage.exists(blob_key(shared[0]))
        assert await farm.redis.keys("rayfarm:blob:*") == []
        assert farm.stored("blobs") == 0 and farm.stored("jobs") == 0

    _run(redis_url, tmp_path, body)


@pytest.mark.parametrize("state", [JobState.PENDING, JobState.PROCESSING])
def test_a_job_still_to_render_is_not_deleted(redis_url, tmp_path, state):
    async def body(farm: Farm):
        scene = farm.blob(b"S" * 100)
        await farm.job(A, [scene], state=state)
        with pytest.raises(InvalidTransition, match=f"job {A} is {state}: cancel it first"):
            await farm.remover.delete_job(A)
        assert (await farm.store.get(A)).state is state
        assert farm.storage.exists(blob_key(scene[0]))
        await farm.store.transition(A, JobState.CANCELLED)
        assert (await farm.remover.delete_job(A)).state is JobState.CANCELLED

    _run(redis_url, tmp_path, body)


def test_uploads_count_against_the_quota_until_a_job_uses_them(redis_url, tmp_path):
    async def body(farm: Farm):
        index = farm.store.blobs
        one, two = farm.blob(b"1" * 600), farm.blob(b"2" * 500)
        assert await index.register_upload(*one, "ana", GRACE_S, 1000) == blob_index.Upload(
            True, 600
        )
        # Again: renewed, counted once.
        assert (await index.register_upload(*one, "ana", GRACE_S, 1000)).pending_bytes == 600
        assert await index.register_upload(*two, "ana", GRACE_S, 1000) == blob_index.Upload(
            False, 600
        )
        assert (await index.register_upload(*two, "bo", GRACE_S, 1000)).ok  # bo's own quota
        await farm.job(A, [one], state=JobState.PENDING)  # ana's job uses it
        assert await index.pending_bytes("ana") == 0
        assert (await index.register_upload(*two, "ana", GRACE_S, 1000)).ok
        assert await index.stats() == {"count": 2, "bytes": 1100, "pending_bytes": 1000}

    _run(redis_url, tmp_path, body)


def test_unused_uploads_lapse_and_are_deleted_by_the_sweep(redis_url, tmp_path):
    async def body(farm: Farm):
        index = farm.store.blobs
        used, unused, kept = farm.blob(b"U" * 700), farm.blob(b"N" * 300), farm.blob(b"K" * 9)
        for blob in (used, unused):
            await index.register_upload(*blob, "ana", 0.2, 0)
        await index.register_upload(*kept, "ana", GRACE_S, 0)
        await farm.job(A, [used])
        await asyncio.sleep(0.3)
        report = await farm.sweeper.sweep()
        assert (report["blobs_deleted"], report["blob_bytes_deleted"]) == (1, 300)
        assert not farm.storage.exists(blob_key(unused[0]))
        assert farm.storage.exists(blob_key(used[0])) and farm.storage.exists(blob_key(kept[0]))
        assert await index.pending_bytes("ana") == 9
        assert report["usage"]["blobs_bytes"] == 709

    _run(redis_url, tmp_path, body)


def test_a_blob_being_deleted_is_not_taken_up_until_it_is_gone(redis_url, tmp_path, monkeypatch):
    """Between a deletion marking a blob dying and its object going, a submission or an
    upload of it waits; a submission that waits too long is refused naming it."""
    monkeypatch.setattr(blob_index, "DYING_WAIT_S", 0.3)

    async def body(farm: Farm):
        index = farm.store.blobs
        scene = farm.blob(b"S" * 100)
        await farm.job(A, [scene])
        await farm.redis.hset(keys.blob(scene[0]), "state", "dying")  # mid-deletion
        await farm.redis.zrem(keys.blob_refs(scene[0]), A)
        with pytest.raises(InvalidRequest, match=f"blob {scene[0]} is being deleted"):
            async with index.holding([scene]):
                pass
        assert await index.dying([scene[0], "f" * 64]) == {scene[0]}

        async def finish_deletion():
            await asyncio.sleep(0.1)
            await farm.remover.delete_blobs([scene[0]])

        finishing = asyncio.create_task(finish_deletion())
        upload = await index.register_upload(*scene, "ana", GRACE_S, 0)  # waits, then goes
        await finishing
        assert upload.ok and await farm.redis.hget(keys.blob(scene[0]), "state") == "live"
        async with index.holding([scene]):
            assert await farm.redis.zcard(keys.blob_refs(scene[0])) == 2  # upload + hold
        assert await farm.redis.zcard(keys.blob_refs(scene[0])) == 1

    _run(redis_url, tmp_path, body)


def test_blobs_of_jobs_stored_before_the_index_are_not_taken(redis_url, tmp_path):
    async def body(farm: Farm):
        shared = farm.blob(b"S" * 100)
        await farm.job(A, [shared])
        await farm.job(B, [shared])
        # As a farm upgraded from before the blob index has it: no references at all.
        await farm.redis.delete(keys.blob(shared[0]), keys.blob_refs(shared[0]),
                                keys.blob_stats(), keys.blobs_indexed())  # fmt: skip
        await farm.remover.delete_job(A)
        assert farm.storage.exists(blob_key(shared[0]))
        assert await farm.redis.zrange(keys.blob_refs(shared[0]), 0, -1) == [B]

    _run(redis_url, tmp_path, body)


def test_retention_deletes_jobs_that_finished_longer_ago_than_kept(redis_url, tmp_path):
    async def body(farm: Farm):
        scene = farm.blob(b"S" * 100)
        for job_id in (A, B):
            await farm.job(job_id, [scene])
        await farm.job(C, [scene], state=JobState.PROCESSING)
        old = datetime.now(UTC) - timedelta(days=31)
        for job_id in (A, C):  # created long ago; A finished long ago, C still renders
            await farm.redis.zadd(keys.jobs_in("COMPLETED" if job_id == A else "PROCESSING"),
                                  {job_id: old.timestamp()})  # fmt: skip
        await farm.redis.hset(keys.job(A), "finished_at", old.isoformat())
        report = await farm.sweeper.sweep()
        assert report["jobs_deleted"] == 1
        assert await farm.redis.exists(keys.job(A)) == 0
        assert {j.id for j in (await farm.store.list_jobs())[0]} == {B, C}
        assert farm.storage.exists(blob_key(scene[0])) and not (farm.root / "jobs" / A).exists()
        (record,) = await farm.auth.audit_log(user="retention")
        assert record["job"] == A and "RAYFARM_RETENTION_DAYS" in record["detail"]
        assert report["usage"]["jobs_bytes"] == farm.stored("jobs") > 0

    _run(redis_url, tmp_path, body)


def test_retention_of_0_days_keeps_every_job(redis_url, tmp_path):
    async def body(farm: Farm):
        await farm.job(A, [farm.blob(b"S")])
        await farm.redis.hset(keys.job(A), "finished_at", "2001-01-01T00:00:00+00:00")
        await farm.redis.zadd(keys.jobs_in("COMPLETED"), {A: 0})
        assert (await farm.sweeper.sweep())["jobs_deleted"] == 0
        assert (await farm.store.get(A)).state is JobState.COMPLETED

    _run(redis_url, tmp_path, body, retention_days=0)


def test_one_replica_sweeps_at_a_time_and_the_last_sweep_outlives_restarts(redis_url, tmp_path):
    async def body(farm: Farm):
        await farm.job(A, [farm.blob(b"S")])
        replicas = [Sweeper(farm.redis, farm.store, farm.storage, farm.remover, farm.auth,
                            Settings(**{**farm.settings.to_dict(), "sweep_interval_s": 1.0}))
                    for _ in range(4)]  # fmt: skip
        for replica in replicas:
            replica.started = time.time() - 2  # started more than an interval ago
        reports = await asyncio.gather(*(r.sweep_if_due() for r in replicas))
        assert sum(r is not None for r in reports) == 1
        # A replica started now (a restart) finds the last sweep in Redis: not due yet.
        fresh = Sweeper(
            farm.redis, farm.store, farm.storage, farm.remover, farm.auth, replicas[0].settings
        )
        fresh.started = 0
        assert await fresh.sweep_if_due() is None
        await asyncio.sleep(1.0)
        assert await fresh.sweep_if_due() is not None

    _run(redis_url, tmp_path, body)


def test_what_a_cancelled_render_writes_after_the_deletion_is_swept_later(redis_url, tmp_path):
    async def body(farm: Farm):
        await farm.job(A, [farm.blob(b"S")], state=JobState.CANCELLED)
        await farm.remover.delete_job(A)
        # A render cancelled just before: its last log and event land after the delete.
        farm.storage.put_bytes(task_log_key(A, "f0000002t000", 2), b"late\n")
        await farm.store.event(A, "task_failed", task="f0000002t000")
        assert await farm.remover.sweep_deleted(time.time() - LATE_WRITES_S) == 0  # too soon
        assert await farm.remover.sweep_deleted(time.time() + 1) == 1
        assert not (farm.root / "jobs" / A).exists()
        assert await farm.redis.exists(keys.events(A)) == 0
        assert await farm.redis.zcard(keys.deleted()) == 0

    _run(redis_url, tmp_path, body)


# -- over HTTP -------------------------------------------------------------------------


@pytest.fixture
def api(redis_url, tmp_path):
    with api_client(redis_url, tmp_path, upload_quota_bytes=1_000_000) as client:  # fmt: skip
        yield client


def test_uploads_past_the_quota_are_413_naming_it(api):
    ana = user_headers(api, "ana")

    def put(data, headers=ana, chunked=False):
        sha = hashlib.sha256(data).hexdigest()
        content = iter([data]) if chunked else data
        return api.put(f"/blobs/{sha}", content=content, headers=headers)

    assert put(b"1" * 700_000).status_code == 201
    too_much = b"2" * 350_000
    error = refused(put(too_much), 413, "the quota of 1000000 bytes (RAYFARM_UPLOAD_QUOTA_BYTES)")
    assert error["detail"]["pending"] == 700_000
    refused(put(too_much, chunked=True), 413, "RAYFARM_UPLOAD_QUOTA_BYTES")  # no length
    assert not (api.storage_dir / "blobs" / "sha256" / hashlib.sha256(too_much).hexdigest()[:2]
                ).exists()  # fmt: skip
    assert put(b"3" * 100_000).status_code == 201  # within what is left
    assert put(too_much, headers=user_headers(api, "bo")).status_code == 201  # bo's own quota
    assert put(too_much, headers=AUTH).status_code == 201  # admins have none
    assert "rayfarm_uploads_pending_bytes 1.5e+06" in api.get("/metrics").text


def test_a_job_using_the_uploads_gives_the_quota_back(api, small_scene):
    ana = user_headers(api, "ana")
    scene = small_scene.read_bytes()
    digest = hashlib.sha256(scene).hexdigest()
    assert api.put(f"/blobs/{digest}", content=scene, headers=ana).status_code == 201
    filler = b"F" * (1_000_000 - len(scene))
    sha = hashlib.sha256(filler).hexdigest()
    assert api.put(f"/blobs/{sha}", content=filler, headers=ana).status_code == 201
    refused(api.put(f"/blobs/{'0' * 64}", content=b"x", headers=ana), 413, "quota")
    body = {"spec": {"frames": "1"}, "main": "shot.blend",
            "files": [{"path": "shot.blend", "sha256": digest, "size": len(scene)}]}  # fmt: skip
    assert api.post("/jobs", json=body, headers=ana).status_code == 201
    data = b"4" * (len(scene) - 1)
    r = api.put(f"/blobs/{hashlib.sha256(data).hexdigest()}", content=data, headers=ana)
    assert r.status_code == 201, r.text


def test_delete_is_for_the_owner_or_an_admin_and_a_finished_job(api, small_scene):
    ana, bo = user_headers(api, "ana", projects=["p1"]), user_headers(api, "bo")
    vic = user_headers(api, "vic", "viewer", ["p1"])
    form = {"scene": ("shot.blend", small_scene.read_bytes())}
    job = api.post("/jobs", files=form, data={"spec": json.dumps(
        {"frames": "1", "project": "p1"})}, headers=ana).json()  # fmt: skip
    refused(api.delete(f"/jobs/{job['id']}", headers=ana), 409,
           f"job {job['id']} is PENDING: cancel it first")  # fmt: skip
    refused(api.delete(f"/jobs/{job['id']}", headers=bo), 404, "no job")
    refused(api.delete(f"/jobs/{job['id']}", headers=vic), 403, "may not change it")
    assert api.post(f"/jobs/{job['id']}/cancel", headers=ana).status_code == 200
    r = api.delete(f"/jobs/{job['id']}", headers=ana)
    assert r.status_code == 200, r.text
    freed = r.json()
    assert (freed["id"], freed["state"], freed["blobs"]) == (job["id"], "CANCELLED", 1)
    assert freed["blob_bytes"] == len(small_scene.read_bytes())
    for path in ("", "/status", "/frames", "/logs"):
        assert api.get(f"/jobs/{job['id']}{path}").status_code == 404
    assert api.get("/jobs").json() == {"jobs": [], "total": 0}
    assert [p for p in (api.storage_dir / "blobs").rglob("*") if p.is_file()] == []
    records = api.get("/audit", params={"job": job["id"], "action": "DELETE"}).json()["records"]
    assert [(r["who"], r["outcome"]) for r in records] == [
        ("ana", "200"),
        ("vic", "403"),
        ("bo", "404"),
        ("ana", "409"),
    ]
    assert "rayfarm_jobs_deleted_total 1.0" in api.get("/metrics").text
