"""Renders that must be stopped, and Blender workers that die: a render that hangs (its
worker process frozen with SIGSTOP, as a wedged GPU driver or a deadlock leaves it) is
stopped once it shows no progress for the farm's hang timeout and retried; cancelling
a job stops its renders in progress; a worker that is killed or crashes fails its task
alone. In every case only the Blender worker process goes: the render actor (its pid,
its GPU, its place in the pool) stays and starts a new worker.

On a farm of its own, with a short ``RAYFARM_HANG_TIMEOUT_S``."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rayfarm import Farm, JobState

from helpers.blender import pixels, render_reference
from helpers.farms import WAIT_S, completed, farm_processes, run_farm

pytestmark = pytest.mark.slow

#: The hang timeout of this module's farm: well above the longest a render of this
#: module's scenes goes without a Cycles status line on a busy machine (their frames take
#: a few seconds on a quiet core; on a 2-core machine busy with other work, 15 s went by
#: without one: a retried task then "hung" too), short enough for a test. (Cycles in
#: background mode reports about every 30 s while sampling: a farm's timeout must be far
#: above that.)
HANG_S = 30
#: About 3 s a frame on one core.
SCENE = ("--width", "64", "--height", "48", "--samples", "1000", "--frames", "2")


#: How long this module's farm keeps its idle scene inspector (RAYFARM_INSPECTOR_IDLE_S).
INSPECTOR_IDLE_S = 10


@pytest.fixture(scope="module")
def hang_farm(tmp_path_factory, farm_env):
    env = {**farm_env, "RAYFARM_HANG_TIMEOUT_S": str(HANG_S),
           "RAYFARM_INSPECTOR_IDLE_S": str(INSPECTOR_IDLE_S)}  # fmt: skip
    yield from run_farm(tmp_path_factory.mktemp("hangfarm"), env)


@pytest.fixture(scope="module")
def client(hang_farm) -> Iterator[Farm]:
    with Farm(hang_farm.url) as farm:
        yield farm


def _events(farm, job_id: str, kind: str) -> list[dict[str, str]]:
    return [e for e in farm.events(job_id) if e["kind"] == kind]


def _running(farm, job_id: str, kind: str, timeout_s: float = WAIT_S) -> tuple[str, int, int]:
    """(task, pid of the actor rendering it, pid of that actor's Blender worker) once the
    job has an event ``kind`` (a task started, or reporting samples)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = _events(farm, job_id, kind)
        if seen:
            task = seen[0]["task"]
            started = [e for e in _events(farm, job_id, "task_started") if e["task"] == task]
            actor = int(started[-1]["pid"])
            return task, actor, _worker_of(actor)
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} has no {kind} event")


def _worker_of(actor: int, timeout_s: float = 60) -> int:
    """The pid of the Blender worker process render actor ``actor`` renders with (its
    child; not the finisher an actor rendering parts of frames starts beside it, whose
    scratch folder is named for its role)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if (
                ppid == actor and b"rayfarm_worker" in cmdline and b"serve" in cmdline
                and b"-finish" not in cmdline
            ):  # fmt: skip
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"render actor {actor} has no Blender worker")


def _gone(pid: int, timeout_s: float) -> float | None:
    """Seconds until process ``pid`` is gone (or a zombie), None if it outlives the wait."""
    start = time.monotonic()
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return time.monotonic() - start
        if state == "Z":
            return time.monotonic() - start
        if time.monotonic() - start >= timeout_s:
            return None
        time.sleep(0.05)


def _actors(farm) -> set[int]:
    """The pids of the farm's render actors."""
    return {
        pid for pid in farm_processes(farm.mark) - farm.before
        if b"RenderActor" in Path(f"/proc/{pid}/cmdline").read_bytes()
    }  # fmt: skip


def _inspectors(farm) -> set[int]:
    """The pids of the farm's scene inspector (none, or one)."""
    return {
        pid for pid in farm_processes(farm.mark) - farm.before
        if b"SceneInspector" in Path(f"/proc/{pid}/cmdline").read_bytes()
    }  # fmt: skip


def _equal_to_bpy(job, scene: Path, tmp_path: Path) -> None:
    """Each frame stored once, and equal to bpy's own render of it."""
    got = job.download(tmp_path / "farm")
    want = render_reference(scene, tmp_path / "ref", job.spec.frame_list)
    assert sorted(int(p.stem) for p in got) == job.spec.frame_list
    for path in got:
        assert np.array_equal(pixels(path), pixels(want[int(path.stem)])), path.name


def test_a_hung_render_is_stopped_and_retried(client, hang_farm, make_scene, tmp_path):
    scene = make_scene(*SCENE)
    actors = _actors(hang_farm)
    job = client.submit(scene, frames="1-2")
    # Once it samples: the worker is the one rendering the task (not one the actor is
    # replacing with another Blender version's).
    task, actor, victim = _running(hang_farm, job.id, "progress")
    os.kill(victim, signal.SIGSTOP)  # alive, holding its task, and making no progress
    try:
        status = job.wait(timeout=WAIT_S)
        assert _gone(victim, 60) is not None, "the hung worker is still there"
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert status.state is JobState.COMPLETED, status.error
    (failed,) = [e for e in _events(hang_farm, job.id, "task_failed") if e["task"] == task]
    assert failed["error"] == f"no sign of progress for {HANG_S} s (the render hung)"
    assert (failed["retry"], int(failed["pid"])) == ("True", actor)
    done = [e for e in _events(hang_farm, job.id, "task_done") if e["task"] == task]
    assert len(done) == 1 and int(done[0]["worker"]) != victim and done[0]["attempt"] == "2"
    stored = sorted(e["frame"] for e in _events(hang_farm, job.id, "frame"))
    assert stored == ["1", "2"]
    _equal_to_bpy(job, scene, tmp_path)
    assert _actors(hang_farm) == actors  # no actor was lost or replaced


def test_cancel_stops_the_render_in_progress(client, hang_farm, make_scene, small_scene):
    """A render that would take minutes (65 536 samples), far longer than the test waits,
    stops when its job is cancelled; nothing of it is stored, and the farm renders on
    with the same actors."""
    actors = _actors(hang_farm)
    job = client.submit(make_scene(*SCENE), frames="1", samples=65_536)
    _, actor, victim = _running(hang_farm, job.id, "progress")
    assert _gone(victim, 0) is None  # rendering
    job.cancel()
    seconds = _gone(victim, 60)
    assert seconds is not None, "the cancelled render is still running"
    print(f"render process gone {seconds:.2f} s after the cancel answered")
    status = job.status()
    assert status.state is JobState.CANCELLED and status.frames_done == 0
    assert not _events(hang_farm, job.id, "task_done")
    assert not (hang_farm.storage_dir / "jobs" / job.id / "frames").exists()
    assert completed(client.submit(small_scene, frames="1-4")).frames_done == 4
    assert actor in actors and _actors(hang_farm) == actors


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_worker_that_dies_mid_render_costs_its_task_only(
    client, hang_farm, make_scene, tmp_path, sig
):
    """SIGKILL (the kernel's OOM killer, an operator) or SIGSEGV (a bpy crash) of the
    Blender worker in the middle of a render: the task fails naming the signal and
    quoting the worker's last output, is retried, and the job completes with frames equal
    to bpy's; the render actor's process is the same throughout."""
    scene = make_scene(*SCENE)
    actors = _actors(hang_farm)
    job = client.submit(scene, frames="1-2")
    task, actor, victim = _running(hang_farm, job.id, "progress")
    os.kill(victim, sig)
    assert completed(job).frames_done == 2
    (failed,) = [e for e in _events(hang_farm, job.id, "task_failed") if e["task"] == task]
    assert int(failed["pid"]) == actor and failed["retry"] == "True"
    assert f"worker (pid {victim}) died during the task (signal {sig.name})" in failed["error"]
    assert "its last output:" in failed["error"] and "Sample" in failed["error"]
    # The failed attempt's log is the worker's output up to its death.
    assert "Sample" in job.logs(task).split("attempt 2")[0]
    _equal_to_bpy(job, scene, tmp_path)
    assert _actors(hang_farm) == actors


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_bad_hang_timeout_is_refused_by_name(monkeypatch, value):
    from rayfarm.cluster.settings import Settings

    monkeypatch.setenv("RAYFARM_HANG_TIMEOUT_S", value)
    with pytest.raises(ValueError, match="RAYFARM_HANG_TIMEOUT_S must be a"):
        Settings.from_env()


def test_the_hang_timeout_is_read_in_seconds(monkeypatch):
    from rayfarm.cluster.settings import Settings

    monkeypatch.setenv("RAYFARM_HANG_TIMEOUT_S", "90.5")
    assert Settings.from_env().hang_timeout_s == 90.5
    monkeypatch.delenv("RAYFARM_HANG_TIMEOUT_S")
    assert Settings.from_env().hang_timeout_s == 900.0


def test_a_slot_lost_mid_slice_costs_that_slice_alone(client, hang_farm, make_scene, tmp_path):
    """SIGKILL of the Blender worker in the middle of a sample slice (a preempted node,
    the OOM killer): that slice alone renders again, with the same samples, and spends
    no retry (the job allows none); the frame equals bpy's unsliced render."""
    scene = make_scene("--width", "64", "--height", "48", "--samples", "2400", "--frames", "1")
    job = client.submit(scene, frames="1", slices=2, max_retries=0)
    task, _, victim = _running(hang_farm, job.id, "progress")
    os.kill(victim, signal.SIGKILL)
    assert completed(job).frames_done == 1
    (failed,) = _events(hang_farm, job.id, "task_failed")
    assert (failed["task"], failed["lost"], failed["retry"]) == (task, "True", "True")
    assert "SIGKILL" in failed["error"] and "this slice alone renders again" in failed["error"]
    assert [e["task"] for e in _events(hang_farm, job.id, "task_retried")] == [task]
    started = sorted(e["task"] for e in _events(hang_farm, job.id, "task_started"))
    assert started == sorted([task, "f0000001t000s00", "f0000001t000s01"])
    done = {e["task"]: e["subset"] for e in _events(hang_farm, job.id, "task_done")}
    assert done == {"f0000001t000s00": "0-1199 of 2400", "f0000001t000s01": "1200-2399 of 2400"}
    (got,) = job.download(tmp_path / "farm")
    want = render_reference(scene, tmp_path / "ref", [1])[1]
    assert np.abs(pixels(got).astype(int) - pixels(want).astype(int)).max() <= 1


def test_an_idle_scene_inspector_goes_and_a_new_scene_brings_it_back(client, hang_farm, make_scene):
    """The scene inspector (an actor with a Blender worker, cataloguing new scenes) goes
    once idle for RAYFARM_INSPECTOR_IDLE_S, its worker with it; the next new scene is
    catalogued by a new one, and its job renders."""
    tiny = ("--width", "32", "--height", "24", "--samples", "1")
    assert client.inspect(make_scene(*tiny, "--frames", "2"))["active_scene"]
    (inspector,) = _inspectors(hang_farm)  # just catalogued: far from idle long enough
    worker = _worker_of(inspector)
    # Idle for INSPECTOR_IDLE_S, then seen by the dispatcher's next round (each second).
    assert _gone(inspector, INSPECTOR_IDLE_S + WAIT_S) is not None
    assert _gone(worker, 10) is not None  # its Blender follows it (its parent watch)
    second = make_scene(*tiny, "--frames", "3")
    assert client.inspect(second)["active_scene"]
    assert _inspectors(hang_farm) - {inspector}
    assert completed(client.submit(second, frames="1")).frames_done == 1
