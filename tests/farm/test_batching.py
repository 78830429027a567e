"""Batches of short tasks: an actor gets several whole frames per call once a job's
frames are measured short, and every task still has its own events, attempt, frame
and metadata; a failure inside a batch, and an actor killed mid-batch, re-queue
exactly what did not finish.

The farm tests run the no-op render actor (``RAYFARM_ACTOR_CLASS``) with a per-task
time and its one-shot fault folder (``rayfarm.render.noop``), so batches are certain
and a fault lands on a chosen frame; one test renders a tiny scene with bpy.
"""

import asyncio
import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis

from rayfarm import Farm, JobSpec, JobState
from rayfarm.cluster import keys
from rayfarm.cluster.progress import NOT_PROCESSING, RENDER_S_BUCKETS, Finished
from rayfarm.cluster.runs import BATCH_S, MAX_BATCH, SHORT_TASK_S, Run, expand
from rayfarm.cluster.store import JobStore
from rayfarm.models import JobRecord

from helpers.blender import pixels, render_reference
from helpers.farms import WAIT_S, completed, farm_processes, run_farm

NOOP = "rayfarm.render.noop:NoopActor"
#: Seconds each no-op task takes: short, so the dispatcher batches them.
NOOP_TASK_S = 0.02


def _job(job_id: str, frames: str) -> JobRecord:
    spec = JobSpec(frames=frames)
    n = len(spec.frame_list)
    return JobRecord(id=job_id, state=JobState.PENDING, owner="tester", spec=spec,
               scene_file="shot.blend", frames_total=n, tasks_total=n,
               created_at=datetime.now(UTC))  # fmt: skip


async def _events(store: JobStore, job_id: str) -> list[dict[str, str]]:
    """The job's events, oldest first, each with its ``id``."""
    return [{"id": i, **f} for i, f in await store.events_after(job_id, None, 1000)]


# -- the store's two scripts, on a real redis-server ---------------------------------------


def test_start_and_finish_record_a_batch_in_one_script_each(redis_url):
    async def go(store: JobStore) -> None:
        job_id = "c" * 16
        await store.create(_job(job_id, "1-3"), "k", "h")
        await store.transition(job_id, JobState.PROCESSING)
        where = {"actor": 1, "node": "n1", "host": "box", "device": "CPU"}
        named = [(keys.task_key(f, 0), f, 0) for f in (1, 2, 3)]
        assert await store.start_tasks(job_id, named, **where) == [1, 1, 1]
        assert await store.start_tasks(job_id, named[1:2], **where) == [2]  # its retry
        seconds = {1: 0.25, 2: 0.75, 3: 4.0}
        items = [
            Finished(f, key, seconds[f], {"frame": f, "tile": 0, "attempt": 1, **where},
                     f"jobs/{job_id}/frames/{f:04d}.png", {"sha256": str(f) * 64, "size": f})
            for key, f, _ in named
        ]  # fmt: skip
        before = await store.metrics()
        assert await store.finish_tasks(job_id, items) == 3
        after = await store.metrics()

        events = await _events(store, job_id)
        tail = [(e["kind"], e.get("task") or e.get("frame")) for e in events[2:]]
        assert tail == (
            [("task_started", k) for k, _, _ in named] + [("task_started", named[1][0])]
            + [x for k, f, _ in named for x in (("task_done", k), ("frame", str(f)))]
        )  # fmt: skip
        started = [e for e in events if e["kind"] == "task_started"]
        assert [e["attempt"] for e in started] == ["1", "1", "1", "2"]
        assert all(e["actor"] == "1" and e["host"] == "box" for e in started)
        done = [e for e in events if e["kind"] == "task_done"]
        assert [e["seconds"] for e in done] == [f"{seconds[f]:.3f}" for f in (1, 2, 3)]
        assert await store.frames_done(job_id) == {i.frame: i.object_key for i in items}
        assert await store.frame_meta(job_id) == {f: {"sha256": str(f) * 64, "size": f}
                                                  for f in (1, 2, 3)}  # fmt: skip
        assert await store.tasks_done(job_id) == {k for k, _, _ in named}

        def grew(name: str) -> float:
            return after["counters"].get(name, 0) - before["counters"].get(name, 0)

        assert grew("tasks_done_total") == 3 and grew("frames_stored_total") == 3
        assert grew("render_s_sum") == pytest.approx(sum(seconds.values()))
        buckets = Counter(next((f"{b:g}" for b in RENDER_S_BUCKETS if s <= b), "+Inf")
                          for s in seconds.values())  # fmt: skip
        for bucket, n in buckets.items():
            assert grew(f"render_s_bucket:{bucket}") == n

        # A cancel that lands while frames are being written wins: nothing is recorded.
        await store.transition(job_id, JobState.CANCELLED)
        length = len(await _events(store, job_id))
        late = Finished(4, keys.task_key(4, 0), 0.1, {}, "jobs/x/0004.png", {})
        assert await store.finish_tasks(job_id, [late]) == NOT_PROCESSING
        assert len(await _events(store, job_id)) == length
        assert 4 not in await store.frames_done(job_id)

    async def with_store() -> None:
        store = JobStore.from_url(redis_url)
        try:
            await go(store)
        finally:
            await store.close()

    asyncio.run(with_store())


# -- how a run sizes and takes its batches -------------------------------------------------


def _run(frames: str, grid: tuple[int, int] = (1, 1)) -> Run:
    job = _job("d" * 16, frames)
    run = Run(job=job, scene_hash="h", inputs=None, score=0.0, grid=grid)  # type: ignore[arg-type]
    run.pending.extend(expand(job, "h", set(), grid))
    return run


def test_batch_size_follows_the_measured_task_time_and_a_fair_share():
    run = _run("1-1000")
    assert run.batch_size(actors=4) == 1  # nothing measured yet
    run.frame_s.extend([SHORT_TASK_S * 4] * 3)
    assert run.batch_size(actors=4) == 1  # real renders: one task per call
    run.frame_s.clear()
    run.frame_s.extend([0.02, 0.03])
    size = run.batch_size(actors=4)
    assert 1 < size <= MAX_BATCH and size * 0.025 <= BATCH_S < (size + 1) * 0.025
    run.frame_s.clear()
    run.frame_s.append(0.0)  # free tasks: as many as allowed
    assert run.batch_size(actors=4) == MAX_BATCH
    few = _run("1-10")
    few.frame_s.append(0.0)
    assert few.batch_size(actors=4) == -(-10 // 4)  # a fair share: ceil(10 / 4)
    tiled = _run("1-100", grid=(2, 2))
    tiled.frame_s.append(0.0)
    assert tiled.batch_size(actors=4) == 1


def test_take_batch_skips_tasks_that_run_alone_and_keeps_their_place():
    run = _run("1-10")
    retried, crashed = keys.task_key(2, 0), keys.task_key(4, 0)
    run.failed_on[retried] = {0}
    run.solo.add(crashed)
    first = run.pending[0]
    batch = run.take_batch(first, 4)
    assert [t.frame for t in batch] == [1, 3, 5, 6]
    assert [t.frame for t in run.pending] == [2, 4, 7, 8, 9, 10]
    alone = run.take_batch(run.pending[0], 4)  # a retried task goes alone
    assert [t.frame for t in alone] == [2]


# -- a farm of no-op actors ---------------------------------------------------------------


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("noop-faults")


@pytest.fixture(scope="module")
def noop_farm(tmp_path_factory, farm_env, faults):
    env = {**farm_env, "RAYFARM_ACTOR_CLASS": NOOP, "RAYFARM_NOOP_TASK_S": str(NOOP_TASK_S),
           "RAYFARM_NOOP_FAULTS": str(faults)}  # fmt: skip
    yield from run_farm(tmp_path_factory.mktemp("noop-farm"), env)


@pytest.fixture(scope="module")
def noop_client(noop_farm):
    with Farm(noop_farm.url) as client:
        yield client


def _redis(local_farm) -> redis.Redis:
    return redis.Redis.from_url(local_farm.redis_url, decode_responses=True)


def _calls(events: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """The task_started events of each actor call, in order: one start script writes a
    batch's task_started events together, with one time and one actor."""
    calls: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for e in events:
        if e["kind"] == "task_started":
            calls[(e["actor"], e["at"])].append(e)
    return list(calls.values())


def _batches(events: list[dict[str, str]]) -> list[list[str]]:
    """The task keys handed to an actor in each call, in order."""
    return [[e["task"] for e in call] for call in _calls(events)]


def _check_stored_once(local_farm, job, events) -> None:
    """Each frame: one task_done, one frame event after it, one file whose SHA-256 the
    frame's metadata (and the manifest) holds."""
    frames = job.spec.frame_list
    done = Counter(e["task"] for e in events if e["kind"] == "task_done")
    assert done == Counter(keys.task_key(f, 0) for f in frames)
    assert Counter(int(e["frame"]) for e in events if e["kind"] == "frame") == Counter(frames)
    at = {(e["kind"], e.get("task") or e.get("frame")): i for i, e in enumerate(events)}
    for f in frames:
        assert at[("task_done", keys.task_key(f, 0))] < at[("frame", str(f))]
    root = local_farm.storage_dir / "jobs" / job.id
    files = sorted(p.name for p in (root / "frames").iterdir())
    assert files == [f"{f:04d}.png" for f in frames]
    manifest = json.loads((root / "manifest.json").read_text())
    for f in frames:
        key = manifest["frames"][str(f)]
        digest = hashlib.sha256((local_farm.storage_dir / key).read_bytes()).hexdigest()
        assert manifest["files"][key]["sha256"] == digest
    assert {i.frame: i.sha256 for i in job.frames()} == {
        f: manifest["files"][manifest["frames"][str(f)]]["sha256"] for f in frames
    }


@pytest.mark.slow
def test_a_fault_inside_a_batch_retries_that_task_and_requeues_the_rest(
    noop_farm, noop_client, small_scene, faults
):
    faulty = {9, 30}
    for frame in faulty:
        (faults / str(frame)).touch()
    job = completed(noop_client.submit(small_scene, frames="1-60", max_retries=1))
    events = noop_farm.events(job.id)
    _check_stored_once(noop_farm, job, events)
    batches = _batches(events)
    assert max(map(len, batches)) > 1, "no batch was handed out"
    assert not list(faults.iterdir())  # each fault fired once

    failed = [e for e in events if e["kind"] == "task_failed"]
    assert sorted(int(e["frame"]) for e in failed) == sorted(faulty)
    assert all(e["retry"] == "True" and "injected fault" in e["error"] for e in failed)
    # The failed task ran again elsewhere; its failure is its only spent retry.
    with _redis(noop_farm) as client:
        spent = client.hgetall(keys.attempts(job.id))
    assert spent == {keys.task_key(f, 0): "1" for f in faulty}
    for e in failed:
        retried = [x for x in events if x["kind"] == "task_done" and x["task"] == e["task"]]
        assert retried[0]["actor"] != e["actor"]

    # In the batch a fault hit: the tasks before it are done at that attempt, the ones
    # after it were queued again (task_retried, no task_failed) and done later, once.
    for e in failed:
        ran = (e["task"], e["attempt"])
        call = next(c for c in _calls(events) if ran in {(x["task"], x["attempt"]) for x in c})
        batch = [x["task"] for x in call]
        position = batch.index(e["task"])
        for key in batch[:position]:
            assert not _kinds_of(events, key) & {"task_failed", "task_retried"}
        for key in batch[position + 1 :]:
            kinds = _kinds_of(events, key)
            assert "task_retried" in kinds and "task_failed" not in kinds
    retried_keys = {e["task"] for e in events if e["kind"] == "task_retried"}
    for key in retried_keys:
        attempts = [int(e["attempt"]) for e in events if e["kind"] == "task_started"
                    and e["task"] == key]  # fmt: skip
        assert attempts == list(range(1, len(attempts) + 1))  # numbered, none reused


def _kinds_of(events, key) -> set[str]:
    return {e["kind"] for e in events if e.get("task") == key}


def _noop_pids(local_farm) -> list[int]:
    return [
        pid
        for pid in farm_processes(local_farm.mark) - local_farm.before
        if b"NoopActor" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


@pytest.mark.slow
def test_an_actor_killed_mid_batch_costs_no_retry_and_no_frame(noop_farm, noop_client,
                                                               small_scene):  # fmt: skip
    job = noop_client.submit(small_scene, frames="1-300", max_retries=0)
    deadline = time.monotonic() + WAIT_S
    while job.status().frames_done < 30:
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.05)
    victim = _noop_pids(noop_farm)[0]
    os.kill(victim, 9)
    job = completed(job)  # max_retries=0: a charged failure would have failed the job
    events = noop_farm.events(job.id)
    _check_stored_once(noop_farm, job, events)

    lost = [e for e in events if e["kind"] == "task_failed"]
    assert lost and all("died during a batch" in e["error"] and e["retry"] == "True"
                        for e in lost)  # fmt: skip
    (batch,) = {tuple(b) for b in _batches(events) if lost[0]["task"] in b and len(b) > 1}
    assert sorted(e["task"] for e in lost) == sorted(batch)  # the whole batch, once
    with _redis(noop_farm) as client:
        assert client.hgetall(keys.attempts(job.id)) == {}  # no retry spent
    for e in lost:  # each ran again, alone, as its next attempt
        again = [x for x in events if x["kind"] == "task_started" and x["task"] == e["task"]]
        assert [x["attempt"] for x in again] == [e["attempt"], str(int(e["attempt"]) + 1)]
        assert [again[-1]["task"]] in _batches(events)
    assert victim not in _noop_pids(noop_farm) and len(_noop_pids(noop_farm)) == 2


# -- real renders -------------------------------------------------------------------------


@pytest.mark.slow
def test_short_bpy_frames_render_in_batches_and_equal_bpy(farm, local_farm, make_scene,
                                                          tmp_path):  # fmt: skip
    scene = make_scene("--width", "24", "--height", "16", "--samples", "1", "--frames", "4")
    job = completed(farm.submit(scene, frames="1-40"))
    events = local_farm.events(job.id)
    _check_stored_once(local_farm, job, events)
    seconds = [float(e["seconds"]) for e in events if e["kind"] == "task_done"]
    batches = _batches(events)
    if sum(seconds[:16]) / 16 < SHORT_TASK_S / 2:  # measured short: batches must follow
        assert max(map(len, batches)) > 1
    for e in (e for e in events if e["kind"] == "task_done"):
        assert e["attempt"] == "1" and e["device"]
    want = render_reference(scene, tmp_path / "ref", [1, 2, 3, 4, 40])
    got = {int(p.stem): p for p in job.download(tmp_path / "farm")}
    for frame, path in want.items():
        assert np.array_equal(pixels(got[frame]), pixels(path)), f"frame {frame} differs"
