"""Stopping renders: how soon a cancel stops a render in progress, how soon a hung
render is found and stopped, and what a crashed Blender worker costs.

bpy cannot be interrupted, so the farm stops a render by stopping the Blender worker
process of its render actor (SIGTERM, then SIGKILL); the actor stays. The bench starts
a local farm (two CPU render actors, ``--hang`` seconds of hang timeout) and a small
scene, and measures:

1. **baseline**: one frame rendered to its end at ``--baseline-samples`` — what a
   cancel cost while running tasks ran to their end (the render's own length);
2. **cancel**: ``--cancels`` times, a frame at 65 536 samples (minutes of rendering) is
   cancelled once it reports samples; the time from sending the cancel to the render
   process being gone;
3. **hang**: ``--hangs`` times, a render's Blender worker is frozen with SIGSTOP as soon
   as it reports samples; the time from the freeze to the task's ``task_failed`` (hung), next
   to the configured timeout, and the job must still complete;
4. **crash**: ``--crashes`` times, a render's worker is sent SIGSEGV (a bpy crash) once
   it reports samples; the time from the crash to its task's ``task_failed``, and to
   the job's completion (the task retried).

Every case must leave the render actors' processes as they were (same pids).

    python bench/stop.py                 # make bench-stop; ~5 minutes

Exit status: 0 when the measurement ran, 1 when something broke, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BenchError,
    LocalFarm,
    Processes,
    add_output_options,
    machine,
    make_scene,
    run_bench,
)
from _report import print_columns

LONG_SAMPLES = 65_536
WAIT_S = 300.0


def _events(farm: LocalFarm, job_id: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{farm.url}/jobs/{job_id}/logs",
        params={"format": "json"},
        headers=farm.auth,
        timeout=30,
    )
    r.raise_for_status()
    events: list[dict[str, Any]] = r.json()["events"]
    return events


def _worker_of(actor: int) -> int:
    """The pid of render actor ``actor``'s Blender worker process (its child)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == actor and b"rayfarm_worker" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except (OSError, ValueError, IndexError):
                continue
        time.sleep(0.02)
    raise BenchError(f"render actor {actor} has no Blender worker")


def _actors(pids: set[int]) -> set[int]:
    """Which of ``pids`` still run (the render actors must outlive every stop)."""
    return {p for p in pids if not _gone(p)}


def _first(farm: LocalFarm, job_id: str, kind: str) -> dict[str, Any]:
    """The job's first event of ``kind``, with the pid of the actor that started its task
    and of that actor's Blender worker."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        events = _events(farm, job_id)
        seen = [e for e in events if e["kind"] == kind]
        if seen:
            task = seen[0]["task"]
            started = [e for e in events if e["kind"] == "task_started" and e["task"] == task]
            actor = int(started[-1]["pid"])
            return {**seen[0], "pid": actor, "worker": _worker_of(actor)}
        time.sleep(0.02)
    raise BenchError(f"job {job_id} had no {kind} event in {WAIT_S:.0f} s")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def _until_gone(pid: int) -> float:
    start = time.perf_counter()
    while not _gone(pid):
        if time.perf_counter() - start > WAIT_S:
            raise BenchError(f"process {pid} still there after {WAIT_S:.0f} s")
        time.sleep(0.005)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, procs: Processes, out: Path) -> dict[str, Any]:
    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu_model']}); files in {out}", flush=True)
    scene = make_scene(
        procs, out / "stop.blend",
        ["--width", "64", "--height", "48", "--samples", "1000", "--frames", "2"],
    )  # fmt: skip
    farm = LocalFarm(procs, out / "farm", out / "farm.log")
    farm.env = {"RAYFARM_CPU_ACTORS": "2", "RAYFARM_HANG_TIMEOUT_S": str(args.hang)}
    client = farm.start()
    try:
        warm = client.submit(scene, frames="1-2")
        if warm.wait(timeout=WAIT_S).state.value != "COMPLETED":
            raise BenchError(f"the warm-up job did not complete: {warm.refresh().error}")
        started = time.perf_counter()
        base = client.submit(scene, frames="1", samples=args.baseline_samples)
        if base.wait(timeout=WAIT_S).state.value != "COMPLETED":
            raise BenchError(f"the baseline job did not complete: {base.refresh().error}")
        baseline_s = time.perf_counter() - started
        actors = {int(e["pid"]) for e in _events(farm, warm.id) if e["kind"] == "task_started"}

        cancels = []
        for _ in range(args.cancels):
            job = client.submit(scene, frames="1", samples=LONG_SAMPLES)
            victim = _first(farm, job.id, "progress")["worker"]
            sent = time.perf_counter()
            job.cancel()
            answered = time.perf_counter() - sent
            cancels.append((answered, answered + _until_gone(victim)))
            if job.status().frames_done:
                raise BenchError(f"cancelled job {job.id} stored a frame")

        hangs = []
        for _ in range(args.hangs):
            job = client.submit(scene, frames="1")
            first = _first(farm, job.id, "progress")
            frozen = time.perf_counter()
            os.kill(first["worker"], signal.SIGSTOP)
            try:
                while not any(
                    e["kind"] == "task_failed" and "hung" in e.get("error", "")
                    for e in _events(farm, job.id)
                ):
                    if time.perf_counter() - frozen > args.hang + WAIT_S:
                        raise BenchError(f"job {job.id}: the frozen render was never found hung")
                    time.sleep(0.05)
                found = time.perf_counter() - frozen
                killed = found + _until_gone(first["worker"])
            finally:
                if not _gone(first["worker"]):
                    os.kill(first["worker"], signal.SIGCONT)
            if job.wait(timeout=WAIT_S).state.value != "COMPLETED":
                raise BenchError(f"job {job.id} did not complete after its hung render")
            hangs.append((found, killed))

        crashes = []
        for _ in range(args.crashes):
            job = client.submit(scene, frames="1")
            victim = _first(farm, job.id, "progress")["worker"]
            crashed = time.perf_counter()
            os.kill(victim, signal.SIGSEGV)
            while not any(e["kind"] == "task_failed" for e in _events(farm, job.id)):
                if time.perf_counter() - crashed > WAIT_S:
                    raise BenchError(f"job {job.id}: the crash was never reported")
                time.sleep(0.01)
            failed = time.perf_counter() - crashed
            if job.wait(timeout=WAIT_S).state.value != "COMPLETED":
                raise BenchError(f"job {job.id} did not complete after its worker crashed")
            crashes.append((failed, time.perf_counter() - crashed))
        kept = _actors(actors)
    finally:
        farm.stop()
    outcome = {
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "out")},
        "baseline_render_s": round(baseline_s, 2),
        "cancel_answer_s": [round(a, 3) for a, _ in cancels],
        "cancel_stopped_s": [round(s, 3) for _, s in cancels],
        "hang_found_s": [round(f, 2) for f, _ in hangs],
        "hang_killed_s": [round(k, 2) for _, k in hangs],
        "crash_failed_s": [round(f, 3) for f, _ in crashes],
        "crash_completed_s": [round(c, 2) for _, c in crashes],
        "actors": sorted(actors),
        "actors_kept": sorted(kept),
    }
    report(outcome)
    if kept != actors:
        raise BenchError(f"render actors were lost: {sorted(actors - kept)}")
    return outcome


def report(o: dict[str, Any]) -> None:
    hang = o["config"]["hang"]
    print()
    rows = [
        (f"baseline: a render run to its end ({o['config']['baseline_samples']} spp)",
         [o["baseline_render_s"]]),
        ("cancel: answered", o["cancel_answer_s"]),
        ("cancel: sent -> render process gone", o["cancel_stopped_s"]),
        (f"hang ({hang:g} s timeout): frozen -> task_failed", o["hang_found_s"]),
        ("hang: frozen -> process gone", o["hang_killed_s"]),
        ("crash (SIGSEGV): crash -> task_failed", o["crash_failed_s"]),
        ("crash: crash -> job completed (retried)", o["crash_completed_s"]),
    ]  # fmt: skip
    columns = (("", "44"), ("median s", ">9.3f"), ("max s", ">9.3f"), ("n", ">3d"))
    figures = [(name, statistics.median(v), max(v), len(v)) for name, v in rows if v]
    print_columns(columns, figures, indent="")
    if o["cancel_stopped_s"]:
        ratio = o["baseline_render_s"] / max(statistics.median(o["cancel_stopped_s"]), 1e-9)
        print(f"\na cancel stops a render {ratio:.0f}x sooner than letting this one finish")
    same = o["actors"] == o["actors_kept"]
    print(f"render actors: {'the same processes throughout' if same else 'LOST'} "
          f"(pids {o['actors']})")  # fmt: skip


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cancels", type=int, default=5, help="cancelled renders")
    p.add_argument("--hangs", type=int, default=2, help="frozen renders")
    p.add_argument("--crashes", type=int, default=3, help="crashed workers (SIGSEGV)")
    # Above the longest a render here goes without a Cycles status line: the baseline's
    # 8 000 samples on one core went more than 15 s without one (2026-12-03), and the
    # watch then stopped it as hung. Cycles in background mode reports every ~30 s at most.
    p.add_argument("--hang", type=float, default=60.0, help="the farm's hang timeout, seconds")
    p.add_argument("--baseline-samples", type=int, default=8000, help="the baseline's samples")
    add_output_options(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    return run_bench(
        args.out, args.json, "rayfarm-stop-", lambda procs, out: measure(args, procs, out)
    )


if __name__ == "__main__":
    sys.exit(main())
