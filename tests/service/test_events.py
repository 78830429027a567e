"""The execution log on a real redis-server: the event hub, following a job's events
(resume, end at the terminal state), state indexes and metrics counters."""

import asyncio

from test_store import _job, _with_store, run

from rayfarm import JobState
from rayfarm.cluster import keys
from rayfarm.cluster.events import EventHub, decode, follow, sse
from rayfarm.cluster.progress import Finished
from rayfarm.cluster.store import JobStore


def test_hub_wait_outlasts_the_socket_timeout(redis_url):
    """redis-py applies its socket timeout to a blocking XREAD; a wait longer than it
    must not read as a dead server (it did with redis-py 8's 5 s default)."""

    async def go():
        store = JobStore.from_url(redis_url, socket_timeout_s=0.4)
        hub = EventHub(store)
        try:
            await store.create(_job("a" * 16), "k", "h")
            last = (await store.status("a" * 16)).event
            assert await hub.wait("a" * 16, last, timeout_s=1.0) is False

            async def later():
                await asyncio.sleep(0.6)
                await store.transition("a" * 16, JobState.CANCELLED)

            task = asyncio.create_task(later())
            assert await hub.wait("a" * 16, last, timeout_s=5.0) is True
            await task
        finally:
            await store.close()

    run(go())


def test_hub_serves_many_waiters_at_different_positions(redis_url):
    """Waiters on several jobs, some behind and some at the head of their stream: each
    wakes exactly when its stream has something newer than its own position."""

    async def go(store: JobStore):
        hub = EventHub(store)
        ids = [f"{i:016x}" for i in range(3)]
        for job_id in ids:
            await store.create(_job(job_id), "k", "h")
        first = (await store.status(ids[0])).event
        await store.event(ids[0], "note", text="second")
        head = (await store.status(ids[0])).event
        behind = hub.wait(ids[0], first, 5.0)  # already has something newer
        at_head = asyncio.ensure_future(hub.wait(ids[0], head, 5.0))
        others = [asyncio.ensure_future(hub.wait(j, (await store.status(j)).event, 5.0))
                  for j in ids[1:]]  # fmt: skip
        assert await behind is True
        await asyncio.sleep(0.3)
        assert not at_head.done() and not any(o.done() for o in others)
        assert hub.waiting == 3
        await store.event(ids[2], "note", text="for job 2 only")
        assert await others[1] is True
        assert not at_head.done() and not others[0].done()
        await store.event(ids[0], "note", text="third")
        assert await at_head is True
        assert await others[0] is False  # nothing ever came for job 1
        assert hub.waiting == 0

    run(_with_store(redis_url, go))


def test_hub_wakes_followers_of_the_farms_changes_with_those_of_a_jobs_events(redis_url):
    """One hub, one XREAD: a list following the farm's changes and a page following a
    job's events wait side by side; an event of the job wakes only its follower, a state
    change both, and every list reads the change in one shared read."""

    async def go(store: JobStore):
        hub = EventHub(store)
        job_id = "a" * 16
        await store.create(_job(job_id), "k", "h")
        since = await store.last_change()
        event = (await store.status(job_id)).event
        lists = [asyncio.ensure_future(hub.wait_stream(keys.changes(), since, 5.0))
                 for _ in range(2)]  # fmt: skip
        page = asyncio.ensure_future(hub.wait(job_id, event, 5.0))
        await asyncio.sleep(0.3)
        assert hub.waiting == 3
        await store.event(job_id, "note", text="not a change of state")
        assert await page is True
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in lists)
        await store.transition(job_id, JobState.CANCELLED)
        assert await asyncio.gather(*lists) == [True, True]
        reads = await asyncio.gather(*(hub.read_after(keys.changes(), since) for _ in lists))
        assert reads[0] == reads[1] and [f["state"] for _, f in reads[0]] == ["CANCELLED"]

    run(_with_store(redis_url, go))


def test_follow_resumes_exactly_and_ends_after_the_terminal_state(redis_url):
    async def go(store: JobStore):
        hub = EventHub(store)
        job_id = "b" * 16
        await store.create(_job(job_id), "k", "h")
        await store.transition(job_id, JobState.PROCESSING)
        await store.finish_tasks(
            job_id, [Finished(1, keys.task_key(1, 0), 1.5, {"frame": 1, "tile": 0})]
        )

        async def finish_later():
            await asyncio.sleep(0.5)
            await store.event(job_id, "frame", frame=1)
            await store.transition(job_id, JobState.FAILED, error="frame 2: boom")
            await store.event(job_id, "late", text="after the end")  # never followed

        writer = asyncio.create_task(finish_later())
        seen = [e async for e in follow(store, hub, job_id, heartbeat_s=0.2)]
        await writer
        events = [e for e in seen if e is not None]
        assert None in seen  # a heartbeat while nothing happened
        kinds = [e["kind"] for e in events]
        assert kinds == ["state", "state", "task_done", "frame", "state"]
        assert events[2]["seconds"] == 1.5 and events[2]["frame"] == 1  # typed
        assert events[-1]["to"] == "FAILED" and events[-1]["error"] == "frame 2: boom"
        ids = [e["id"] for e in events]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        # Reconnecting after any event gives exactly the rest, up to the end.
        for n in range(len(events) - 1):
            rest = [e async for e in follow(store, hub, job_id, after=ids[n])]
            assert [e["id"] for e in rest if e] == ids[n + 1 :]
        # After the end: what came later, then the stream ends again at once.
        (late,) = [e async for e in follow(store, hub, job_id, after=ids[-1])]
        assert late["kind"] == "late"
        assert [e async for e in follow(store, hub, job_id, after=late["id"])] == []

    run(_with_store(redis_url, go))


def test_sse_format():
    event = decode("5-1", {"kind": "progress", "at": "t", "samples": "3", "of": "8"})
    assert event == {"id": "5-1", "kind": "progress", "at": "t", "samples": 3, "of": 8}
    assert sse(event) == (
        b'id: 5-1\nevent: progress\ndata: {"id": "5-1", "kind": "progress", "at": "t", '
        b'"samples": 3, "of": 8}\n\n'
    )
    assert sse(None) == b": keep-alive\n\n"


def test_state_indexes_and_metrics_follow_every_change(redis_url):
    async def go(store: JobStore):
        ids = [f"{i:016x}" for i in range(4)]
        for job_id in ids:
            await store.create(_job(job_id), "k", "h")
        await store.transition(ids[0], JobState.PROCESSING)
        await store.transition(ids[0], JobState.FAILED, error="x")
        await store.transition(ids[0], JobState.PENDING)  # retry
        await store.transition(ids[1], JobState.CANCELLED)
        await store.transition(ids[2], JobState.PROCESSING)
        done = [Finished(int(s), keys.task_key(int(s), 0), s) for s in (0.2, 0.7, 4.0, 5000.0)]
        await store.finish_tasks(ids[2], [*done, Finished(1, object_key="k1")])
        await store.count(upload_bytes_total=1000, upload_blobs_total=2)

        m = await store.metrics()
        assert m["jobs"] == {
            JobState.PENDING: 2, JobState.PROCESSING: 1, JobState.COMPLETED: 0,
            JobState.FAILED: 0, JobState.CANCELLED: 1,
        }  # fmt: skip
        pending, total = await store.list_jobs(JobState.PENDING)
        assert total == 2 and [j.id for j in pending] == [ids[3], ids[0]]  # newest first
        assert m["queue_depth"] == 2
        c = m["counters"]
        assert c["jobs_submitted_total"] == 4 and c["tasks_done_total"] == 4
        assert c["frames_stored_total"] == 1 and c["upload_bytes_total"] == 1000
        assert c["render_s_bucket:0.5"] == 1 and c["render_s_bucket:1"] == 1
        assert c["render_s_bucket:5"] == 1 and c["render_s_bucket:+Inf"] == 1
        assert abs(c["render_s_sum"] - 5004.9) < 1e-6

    run(_with_store(redis_url, go))
