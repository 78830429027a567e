"""The Redis job store on a real redis-server: atomic transitions, races, AOF."""

import asyncio
import itertools
from datetime import UTC, datetime

import pytest
import redis as sync_redis

from rayfarm import InvalidTransition, JobNotFound, JobSpec, JobState
from rayfarm.cluster import keys
from rayfarm.cluster.job_index import outranks, queue_score
from rayfarm.cluster.progress import Finished
from rayfarm.cluster.redis_server import RedisServer
from rayfarm.cluster.store import JobStore
from rayfarm.models import JobRecord


def _job(
    job_id: str, priority: int = 50, frames: str = "1-4", project: str | None = None
) -> JobRecord:
    spec = JobSpec(frames=frames, priority=priority, project=project)
    return JobRecord(
        id=job_id,
        state=JobState.PENDING,
        owner="tester",
        spec=spec,
        scene_file="shot.blend",
        frames_total=len(spec.frame_list),
        tasks_total=len(spec.frame_list),
        created_at=datetime.now(UTC),
    )


async def _events(store: JobStore, job_id: str) -> list[dict[str, str]]:
    """The job's events, oldest first, each with its ``id``."""
    return [{"id": i, **f} for i, f in await store.events_after(job_id, None, 1000)]


async def _queued(store: JobStore) -> list[str]:
    """The queued job ids, in queue order."""
    return [job_id for job_id, _ in await store.queue_head(100)]


def run(coro):
    return asyncio.run(coro)


async def _with_store(url, fn):
    store = JobStore.from_url(url)
    try:
        return await fn(store)
    finally:
        await store.close()


def test_create_get_list_and_queue(redis_url):
    async def go(store: JobStore):
        await store.create(_job("a" * 16, priority=10), "jobs/a/input/scene.blend", "h1")
        await store.create(_job("b" * 16, priority=90), "jobs/b/input/scene.blend", "h2")
        job = await store.get("a" * 16)
        assert job.state is JobState.PENDING and job.owner == "tester"
        assert job.spec.priority == 10 and job.frames_total == 4
        assert await _queued(store) == ["b" * 16, "a" * 16]  # priority first
        jobs, total = await store.list_jobs()
        assert total == 2 and [j.id for j in jobs] == ["b" * 16, "a" * 16]
        only, n = await store.list_jobs(JobState.PENDING, 0, 1)
        assert n == 2 and len(only) == 1
        with pytest.raises(JobNotFound):
            await store.get("c" * 16)
        events = await _events(store, "a" * 16)
        assert events[0]["kind"] == "state" and events[0]["to"] == "PENDING"

    run(_with_store(redis_url, go))


@pytest.mark.parametrize(
    ("path", "target", "ok"),
    [
        ((), JobState.PROCESSING, True),
        ((), JobState.CANCELLED, True),
        ((), JobState.COMPLETED, False),
        ((), JobState.FAILED, True),  # a dependency failed
        ((JobState.PROCESSING,), JobState.COMPLETED, True),
        ((JobState.PROCESSING,), JobState.PENDING, False),
        ((JobState.PROCESSING, JobState.FAILED), JobState.PENDING, True),
        ((JobState.PROCESSING, JobState.FAILED), JobState.CANCELLED, False),
        ((JobState.PROCESSING, JobState.COMPLETED), JobState.CANCELLED, False),
        ((JobState.CANCELLED,), JobState.PENDING, False),
    ],
)
def test_store_applies_the_table(redis_url, path, target, ok):
    async def go(store: JobStore):
        await store.create(_job("d" * 16), "k", "h")
        for step in path:
            await store.transition(
                "d" * 16, step, error="boom" if step is JobState.FAILED else None
            )
        before = await store.get("d" * 16)
        if ok:
            assert await store.transition("d" * 16, target) is before.state
            after = await store.get("d" * 16)
            assert after.state is target
            queued = await _queued(store)
            assert (("d" * 16) in queued) == (target is JobState.PENDING)
            if target is JobState.PENDING:
                assert after.error is None and after.finished_at is None
            if target.is_terminal:
                assert after.finished_at is not None
        else:
            with pytest.raises(InvalidTransition):
                await store.transition("d" * 16, target)
            assert (await store.get("d" * 16)).state is before.state

    run(_with_store(redis_url, go))


def test_each_creation_and_state_change_is_told_farm_wide_with_who_may_see_it(redis_url):
    """The changes stream a list of jobs follows: one entry per creation and per state
    change (written in the same transaction or script), none for a refused change."""
    plain, shared = "c" * 16, "d" * 16

    async def go(store: JobStore):
        await store.create(_job("e" * 16), "jobs/e/input/scene.blend", "h0")
        start = await store.last_change()
        await store.create(_job(plain), "jobs/c/input/scene.blend", "h1")
        await store.create(_job(shared, project="p9"), "jobs/d/input/scene.blend", "h2")
        await store.transition(plain, JobState.PROCESSING)
        await store.transition(shared, JobState.CANCELLED)
        with pytest.raises(InvalidTransition):
            await store.transition(shared, JobState.PROCESSING)
        await store.transition(plain, JobState.FAILED, error="boom")
        await store.transition(plain, JobState.PENDING)
        entries = await store.read_after(keys.changes(), start)
        told = [(f["job"], f["owner"], f["project"], f["state"]) for _, f in entries]
        assert told == [
            (plain, "tester", "", "PENDING"),
            (shared, "tester", "p9", "PENDING"),
            (plain, "tester", "", "PROCESSING"),
            (shared, "tester", "p9", "CANCELLED"),
            (plain, "tester", "", "FAILED"),
            (plain, "tester", "", "PENDING"),
        ]
        assert await store.last_change() == entries[-1][0]

    run(_with_store(redis_url, go))


def test_unknown_job_transition(redis_url):
    async def go(store: JobStore):
        with pytest.raises(JobNotFound):
            await store.transition("e" * 16, JobState.CANCELLED)

    run(_with_store(redis_url, go))


def test_cancel_racing_completion_has_one_answer(redis_url):
    """Many concurrent cancels and completions of the same jobs: each job ends in
    exactly one terminal state, and exactly one transition out of PROCESSING won."""

    async def go(store: JobStore):
        ids = [f"{i:016x}" for i in range(30)]
        for i in ids:
            await store.create(_job(i), "k", "h")
            await store.transition(i, JobState.PROCESSING)
        # Several clients, each with its own connection, all racing.
        stores = [JobStore.from_url(redis_url) for _ in range(6)]
        targets = itertools.cycle([JobState.CANCELLED, JobState.COMPLETED, JobState.FAILED])

        async def attempt(s: JobStore, job_id: str, target: JobState):
            try:
                await s.transition(job_id, target)
                return target
            except InvalidTransition:
                return None

        coros = [attempt(s, i, next(targets)) for i in ids for s in stores]
        results = await asyncio.gather(*coros)
        for s in stores:
            await s.close()
        for n, job_id in enumerate(ids):
            won = [r for r in results[n * len(stores) : (n + 1) * len(stores)] if r]
            assert len(won) == 1
            job = await store.get(job_id)
            assert job.state is won[0]
            state_events = [e for e in await _events(store, job_id) if e["kind"] == "state"]
            assert [e["to"] for e in state_events] == ["PENDING", "PROCESSING", won[0].value]

    run(_with_store(redis_url, go))


def test_retry_resets_only_incomplete_frames(redis_url):
    async def go(store: JobStore):
        job_id = "f" * 16
        await store.create(_job(job_id), "k", "h")
        await store.transition(job_id, JobState.PROCESSING)
        stored = [
            Finished(
                frame,
                keys.task_key(frame, 0),
                0.2,
                object_key=f"jobs/{job_id}/frames/{frame:04d}.png",
            )
            for frame in (1, 2)
        ]
        # Frame 3's tile done, the frame not stored.
        await store.finish_tasks(job_id, [*stored, Finished(3, keys.task_key(3, 0), 0.2)])
        await store.add_attempt(job_id, keys.task_key(4, 0))
        await store.transition(job_id, JobState.FAILED, error="frame 4: boom")
        await store.reset_incomplete(job_id)
        assert await store.tasks_done(job_id) == {keys.task_key(1, 0), keys.task_key(2, 0)}
        assert set(await store.frames_done(job_id)) == {1, 2}
        status = await store.status(job_id)
        assert (status.state, status.frames_done, status.tasks_done) == (JobState.FAILED, 2, 2)
        assert status.error == "frame 4: boom"

    run(_with_store(redis_url, go))


def test_jobs_survive_a_redis_restart(tmp_path):
    """AOF on: a stopped and restarted redis-server still has every job."""
    server = RedisServer(tmp_path / "aof").start()
    try:

        async def write(store: JobStore):
            for i in range(5):
                await store.create(_job(f"{i:016x}"), "k", "h")
            await store.transition(f"{0:016x}", JobState.PROCESSING)

        run(_with_store(server.url, write))
        port = server.port
        server.stop()
        assert (tmp_path / "aof" / "appendonlydir").is_dir()
        server = RedisServer(tmp_path / "aof", port=port).start()

        async def read(store: JobStore):
            _, total = await store.list_jobs()
            assert total == 5
            assert (await store.get(f"{0:016x}")).state is JobState.PROCESSING
            assert len(await _queued(store)) == 4

        run(_with_store(server.url, read))
        client = sync_redis.Redis.from_url(server.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()
    finally:
        server.stop()


def test_queue_scores_order_priority_then_age():
    old, new = "2026-01-01T00:00:00+00:00", "2026-11-22T00:00:00+00:00"
    assert queue_score(90, new) < queue_score(10, old)  # priority beats age
    assert queue_score(50, old) < queue_score(50, new)  # then older first
    assert outranks(queue_score(51, new), queue_score(50, old))
    assert not outranks(queue_score(50, old), queue_score(50, new))  # age never outranks
    assert not outranks(queue_score(10, old), queue_score(90, new))


def _owned(job_id: str, owner: str, project: str | None, at: int) -> JobRecord:
    spec = JobSpec(frames="1", project=project)
    return JobRecord(
        id=job_id, state=JobState.PENDING, owner=owner, spec=spec, scene_file="shot.blend",
        frames_total=1, tasks_total=1, created_at=datetime.fromtimestamp(1_700_000_000 + at, UTC),
    )  # fmt: skip


def test_listings_read_the_owner_and_project_indexes(redis_url):
    """Every combination of scope (own jobs, projects), state and owner lists exactly the
    jobs a scan of all of them finds, newest first, paged; no scratch key is left."""
    owners, projects = ["ana", "bo", "cy"], [None, "sh010", "sh020"]
    jobs = [_owned(f"{i:016x}", owners[i % 3], projects[(i // 3) % 3], at=i) for i in range(27)]

    async def go(store: JobStore):
        for job in jobs:
            await store.create(job, "{}", "h")
        for job in jobs[::4]:
            await store.transition(job.id, JobState.CANCELLED)
        cancelled = {j.id for j in jobs[::4]}
        scopes = [None, [], [("user", "ana")], [("project", "sh010")],
                  [("user", "bo"), ("project", "sh010"), ("project", "sh020")]]  # fmt: skip
        for among, state, owner in itertools.product(
            scopes, [None, JobState.CANCELLED, JobState.PENDING], [None, "ana", "cy"]
        ):
            want = [
                j.id for j in reversed(jobs)
                if (among is None or ("user", j.owner) in among
                    or ("project", j.spec.project) in among)
                and (state is None or (j.id in cancelled) == (state is JobState.CANCELLED))
                and (owner is None or j.owner == owner)
            ]  # fmt: skip
            got, total = await store.list_jobs(state, 0, 100, owner=owner, among=among)
            assert ([j.id for j in got], total) == (want, len(want)), (among, state, owner)
            page, total = await store.list_jobs(state, 2, 3, owner=owner, among=among)
            assert ([j.id for j in page], total) == (want[2:5], len(want))
        with sync_redis.Redis.from_url(redis_url) as client:
            assert not client.keys(keys.scratch("*"))

    run(_with_store(redis_url, go))


def test_indexes_are_built_over_jobs_stored_before_them(redis_url):
    async def go(store: JobStore):
        jobs = [_owned(f"{i:016x}", ["ana", "bo"][i % 2], "sh010" if i < 3 else None, at=i)
                for i in range(6)]  # fmt: skip
        for job in jobs:
            await store.create(job, "{}", "h")
        # As a farm that stored them before the indexes existed left them.
        with sync_redis.Redis.from_url(redis_url) as client:
            client.delete(keys.jobs_of("ana"), keys.jobs_of("bo"),
                          keys.jobs_in_project("sh010"), keys.indexes())  # fmt: skip
        assert (await store.list_jobs(among=[("user", "ana")]))[1] == 0
        assert await store.build_indexes() == 6
        assert await store.build_indexes() == 0  # once
        got, _ = await store.list_jobs(among=[("user", "ana"), ("project", "sh010")])
        assert [j.id for j in got] == [f"{i:016x}" for i in (4, 2, 1, 0)]

    run(_with_store(redis_url, go))
