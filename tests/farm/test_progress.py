"""Live progress on a real local farm: the event stream while a job renders (order,
resume with Last-Event-ID), logs, warnings, metrics, the SDK's progress bar, the
asyncio SDK, and the CLI's ``watch`` and ``logs``."""

import asyncio
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import rayfarm
from rayfarm import (
    AsyncFarm,
    FrameStored,
    JobState,
    Progress,
    SceneWarning,
    StateChanged,
    TaskDone,
    TaskQueued,
    TaskStarted,
)
from rayfarm.events import read_sse

from helpers import AUTH, PYTHON
from helpers.farms import WAIT_S, completed

pytestmark = pytest.mark.slow


def _order(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def _sse_ids(url: str, last_event_id: str | None = None, limit: int | None = None) -> list[str]:
    """Event ids from a raw SSE connection (no SDK), at most ``limit`` of them."""
    headers = {**AUTH, "Last-Event-ID": last_event_id} if last_event_id else AUTH
    ids: list[str] = []
    with httpx.stream("GET", url, headers=headers, timeout=WAIT_S) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for message in read_sse(r.iter_lines()):
            if message is None or message.event == "end":
                continue
            ids.append(message.id or "")
            if limit is not None and len(ids) >= limit:
                break
    return ids


def test_events_arrive_in_order_while_a_job_renders(farm, small_scene):
    job = farm.submit(small_scene, frames="1-4", tiles="2x2", samples=16)
    events = list(job.events())
    assert job.status().state is JobState.COMPLETED
    ids = [e.id for e in events]
    assert ids == sorted(ids, key=_order) and len(set(ids)) == len(ids)
    states = [e.to for e in events if isinstance(e, StateChanged)]
    assert states == [JobState.PENDING, JobState.PROCESSING, JobState.COMPLETED]
    assert isinstance(events[-1], StateChanged)  # the stream ends with the job

    # Every task: queued, then started on an actor, then sampled, then done.
    position = {id(e): i for i, e in enumerate(events)}
    tasks = {e.task for e in events if isinstance(e, TaskQueued)}
    assert len(tasks) == 16
    for task in tasks:
        queued = [e for e in events if isinstance(e, TaskQueued) and e.task == task]
        started = [e for e in events if isinstance(e, TaskStarted) and e.task == task]
        sampled = [e for e in events if isinstance(e, Progress) and e.task == task]
        done = [e for e in events if isinstance(e, TaskDone) and e.task == task]
        assert len(queued) == len(started) == len(done) == 1, task
        assert position[id(queued[0])] < position[id(started[0])] < position[id(done[0])]
        assert all(position[id(started[0])] < position[id(p)] < position[id(done[0])]
                   for p in sampled)  # fmt: skip
        assert all(p.of == 16 and 0 <= p.samples <= 16 for p in sampled)
        d = done[0]
        assert d.device == "CPU" and d.node and d.host and d.actor in (0, 1) and d.seconds > 0
    assert any(isinstance(e, Progress) for e in events)
    frames = sorted(e.frame for e in events if isinstance(e, FrameStored))
    assert frames == [1, 2, 3, 4]


def test_reconnecting_mid_job_loses_and_repeats_nothing(farm, local_farm, small_scene):
    job = farm.submit(small_scene, frames="1-8", tiles="2x2", samples=16)
    url = f"{local_farm.url}/jobs/{job.id}/events"
    first = _sse_ids(url, limit=12)  # disconnect after a dozen events
    assert not job.status().state.is_terminal, "the job finished before the disconnect"
    time.sleep(1.0)  # the job goes on while nobody listens
    rest = _sse_ids(url, last_event_id=first[-1])
    assert job.status().state is JobState.COMPLETED
    everything = _sse_ids(url)
    assert first + rest == everything
    # The SDK resumes the same way from any event id.
    assert [e.id for e in job.events(after=everything[5])] == everything[6:]


def test_logs_and_task_logs(farm, local_farm, small_scene):
    job = completed(farm.submit(small_scene, frames="1-2", tiles="1x2", samples=4))
    text = job.logs()
    lines = text.splitlines()
    assert "PENDING -> PROCESSING" in lines[1] and "PROCESSING -> COMPLETED" in lines[-1]
    assert sum("task_done" in line for line in lines) == 4
    blender = job.logs(task="f0000002t001")
    assert blender.startswith("===== f0000002t001 attempt 1 =====")
    assert "Saved:" in blender  # Blender's own output while writing the tile
    r = httpx.get(f"{local_farm.url}/jobs/{job.id}/logs", params={"format": "json"}, headers=AUTH)
    body = r.json()
    assert len(body["events"]) == len(lines) and body["next"] == body["events"][-1]["id"]
    bad = httpx.get(f"{local_farm.url}/jobs/{job.id}/tasks/../log", headers=AUTH)
    assert bad.status_code in (400, 404)
    missing = httpx.get(f"{local_farm.url}/jobs/{job.id}/tasks/f0000099t000/log", headers=AUTH)
    assert missing.status_code == 404 and "no log" in missing.json()["error"]["message"]
    events = f"{local_farm.url}/jobs/{job.id}/events"
    bad_id = httpx.get(events, headers={**AUTH, "Last-Event-ID": "x"})
    assert bad_id.status_code == 400 and "event id" in bad_id.json()["error"]["message"]
    unknown = httpx.get(f"{local_farm.url}/jobs/{'0' * 16}/events", headers=AUTH)
    assert unknown.status_code == 404


def test_python_drivers_raise_a_warning(farm, make_scene):
    scene = make_scene("--width", "32", "--height", "24", "--samples", "1", "--py-driver")
    job = completed(farm.submit(scene, frames="1"))
    (warning,) = [e for e in job.events() if isinstance(e, SceneWarning)]
    assert "driver(s) use Python expressions" in warning.message
    assert "__import__('math').sin(frame)" in warning.message


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_what_happened(farm, local_farm, small_scene):
    before = _metrics(local_farm.url)
    job = completed(farm.submit(small_scene, frames="1-3", tiles="1x2", samples=4))
    after = _metrics(local_farm.url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("rayfarm_tasks_done_total") == job.tasks_total == 6
    assert delta("rayfarm_frames_stored_total") == 3
    assert delta("rayfarm_jobs_submitted_total") == 1
    assert delta("rayfarm_jobs", state="COMPLETED") == 1
    assert delta("rayfarm_task_render_seconds_count") == 6
    assert delta("rayfarm_task_render_seconds_bucket", le="+Inf") == 6
    assert delta("rayfarm_task_render_seconds_sum") > 0
    assert after[("rayfarm_dispatcher_up", ())] == 1
    actors = {k: v for k, v in after.items() if k[0] == "rayfarm_actors"}
    assert sum(actors.values()) == 2  # RAYFARM_CPU_ACTORS=2
    assert {dict(k[1])["device"] for k in actors} == {"CPU"}
    assert ("rayfarm_queue_depth", ()) in after and ("rayfarm_upload_bytes_total", ()) in after
    workers = farm.health()["workers"]
    assert workers["count"] == 2 and workers["devices"] == {"CPU": 2}
    # Autoscaling off (no RAYFARM_MAX_RENDER_NODES): the farm's size, nothing asked for.
    assert after[("rayfarm_render_slots_up", ())] == 2
    assert after[("rayfarm_render_nodes_up", ())] == 1
    assert after[("rayfarm_render_slots_requested", ())] == 0
    assert after[("rayfarm_render_nodes_requested", ())] == 0


def test_progress_bar_reaches_100_percent(farm, small_scene, capsys):
    job = farm.submit(small_scene, frames="1-3", samples=4)
    status = job.wait(timeout=WAIT_S, progress=True)
    assert status.state is JobState.COMPLETED
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    final = [line for line in bar if line.strip()][-1]
    assert "100%" in final and "3/3" in final and "COMPLETED" in final, final
    assert "tasks 3/3" in final, final


def test_async_sdk_mirrors_the_sync_one(local_farm, small_scene, tmp_path):
    async def go() -> None:
        async with AsyncFarm(local_farm.url) as farm:
            job = await farm.submit(small_scene, frames="1-2", tiles="2x1", samples=4)
            assert isinstance(job, rayfarm.AsyncJob) and job.state is JobState.PENDING
            kinds = [e.kind async for e in job.events()]
            assert kinds[0] == "state" and kinds.count("frame") == 2
            status = await job.wait(timeout=WAIT_S)
            assert status.state is JobState.COMPLETED
            await job.refresh()
            assert job.frames_done == 2 and job.finished_at is not None
            assert [f.frame for f in await job.frames()] == [1, 2]
            paths = await job.download(tmp_path / "frames")
            assert [p.name for p in paths] == ["0001.png", "0002.png"]
            assert "task_done" in await job.logs()
            # Many jobs watched at once on one loop.
            jobs = await asyncio.gather(
                *(farm.submit(small_scene, frames="1", samples=1) for _ in range(3))
            )
            statuses = await asyncio.gather(*(j.wait(timeout=WAIT_S) for j in jobs))
            assert {s.state for s in statuses} == {JobState.COMPLETED}
            pending = await farm.submit(small_scene, frames="1-8", samples=16, priority=0)
            cancelled = await pending.cancel()
            assert cancelled.state is JobState.CANCELLED
            with pytest.raises(rayfarm.InvalidTransition):
                await pending.retry()
            with pytest.raises(rayfarm.JobNotFound):
                await farm.job("0" * 16)

    asyncio.run(go())


def test_cli_watch_and_logs(farm, local_farm, small_scene):
    job = farm.submit(small_scene, frames="1-2", samples=4)
    cli = [PYTHON, "-m", "rayfarm", "--url", local_farm.url]
    watch = subprocess.run([*cli, "watch", job.id], capture_output=True, text=True, timeout=WAIT_S)
    assert watch.returncode == 0, watch.stderr
    assert "100%" in watch.stderr and "COMPLETED" in watch.stdout
    logs = subprocess.run([*cli, "logs", job.id], capture_output=True, text=True, timeout=60)
    assert logs.returncode == 0 and "PROCESSING -> COMPLETED" in logs.stdout
    follow = subprocess.run(
        [*cli, "logs", job.id, "--follow"], capture_output=True, text=True, timeout=60
    )
    assert follow.returncode == 0 and follow.stdout.splitlines()[-1].endswith("-> COMPLETED")
    task = subprocess.run(
        [*cli, "logs", job.id, "--task", "f0000001t000"], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert task.returncode == 0 and "attempt 1" in task.stdout
    both = subprocess.run(
        [*cli, "logs", job.id, "--task", "f0000001t000", "--follow"], capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert both.returncode == 2 and "--follow" in both.stderr
    cancelled = farm.submit(small_scene, frames="1-8", samples=16, priority=0)
    cancelled.cancel()
    watched = subprocess.run([*cli, "watch", cancelled.id], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert watched.returncode == 1 and "CANCELLED" in watched.stdout
