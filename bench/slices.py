"""Sample-sliced frames: one high-sample frame whole on one actor vs its samples split
into 2 and 4 slices over the farm's actors.

The bench builds a scene with ``examples/make_scene.py`` (default 480x270, 512
samples, denoising off: a long frame for its size), starts a local farm with
``--actors`` CPU render actors, warms every actor up with the scene, then renders
frame 1 as multi-layer EXR once per way, each ``--repeat`` times:

- ``--slices`` (2 and 4 by default): the frame's samples split into that many slices
  over the actors, merged by the assembler and finished once;
- whole: ``slices=1``, one task on one actor while the others idle (the baseline).

Each way's repeats run back to back, the sliced ways first: an actor closes its
finisher when it renders whole frames again, so a sliced way run after the whole one
would also time the finisher's start (the warm-up, sliced, starts it).

For each way, from the job's events (one clock: the farm's): the time to the final
frame (the job's creation to its ``frame`` event), the time to the first full-frame
preview (to its first ``preview`` event: the merge so far of every pixel; for the whole
frame, the frame itself), the merge cost (the assembler's ``join_s`` of the frame, every
slice added into the frame's sums and divided once), the summed render seconds of its
tasks, the speedup over whole, and the max abs difference of every pass of its frame
from the whole frame's (the exactness the merge promises: within 1e-4).

Target: 2 slices on two actors bring the final frame at least 1.7x sooner than whole.

    python bench/slices.py                               # make bench-slices
    python bench/slices.py --repeat 3 --json bench/results/slices.json
    python bench/slices.py --width 32 --height 24 --samples 8   # does it run

Exit status: 0 when the measurement ran (the table says PASS or FAIL), 1 when
something broke, 130 on Ctrl-C. Every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

import rayfarm
from rayfarm.render.supervisor import BOOT, PACKAGE_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # what the benches share
    BenchError,
    LocalFarm,
    Processes,
    add_output_options,
    blender_python,
    machine,
    make_scene,
    run_bench,
)
from _report import pass_fail, print_pipe_table

JOB_TIMEOUT_S = 3600.0
#: 2 slices on two actors against one whole task: the final frame this much sooner.
TARGET_SPEEDUP = 1.7


@dataclass
class Way:
    name: str
    slices: int
    final_s: list[float] = field(default_factory=list)  # job created -> frame stored
    preview_s: list[float] = field(default_factory=list)  # -> first full-frame preview
    merge_s: list[float] = field(default_factory=list)  # the assembler's join_s
    render_s: list[float] = field(default_factory=list)  # summed task render seconds
    frame: Path | None = None


def _at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["at"]))


def _run(client: rayfarm.Farm, scene: Path, way: Way, out: Path) -> None:
    job = client.submit(scene, frames="1", slices=way.slices, format="exr")
    status = job.wait(timeout=JOB_TIMEOUT_S)
    job.refresh()
    if status.state is not rayfarm.JobState.COMPLETED:
        raise BenchError(f"{way.name}: job {job.id} is {status.state}: {job.error}")
    events = [e.model_dump(mode="json", by_alias=True) for e in job.events()]
    created = _at(events[0])
    (stored,) = [e for e in events if e["kind"] == "frame"]
    previews = [e for e in events if e["kind"] == "preview"]
    way.final_s.append((_at(stored) - created).total_seconds())
    first = previews[0] if previews else stored  # unsliced: the frame is its preview
    way.preview_s.append((_at(first) - created).total_seconds())
    way.merge_s.append(float(stored.get("join_s") or 0.0))
    tasks = [float(e["seconds"]) for e in events if e["kind"] == "task_done"]
    if len(tasks) != way.slices:
        raise BenchError(f"{way.name}: job {job.id} has {len(tasks)} tasks done")
    way.render_s.append(sum(tasks))
    way.frame = job.download(out / way.name.replace(" ", "_") / str(len(way.final_s)))[0]


def _passes(procs: Processes, path: Path, log: Path) -> dict[str, np.ndarray]:
    npz = path.with_suffix(".npz")
    procs.run([blender_python(), "-I", "-c", BOOT, PACKAGE_DIR, "dump-exr", path, npz], log)
    with np.load(npz) as data:
        names = [str(n) for n in data["names"]]
        return {name: np.asarray(data[f"pixels{i}"]) for i, name in enumerate(names)}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=270)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--slices", default="2,4", help="the sliced ways, comma-separated (2,4)")
    p.add_argument("--actors", type=int, default=2, help="CPU render actors on the farm")
    p.add_argument("--repeat", type=int, default=1)
    add_output_options(p, "keep scenes, frames and logs here")
    args = p.parse_args(argv)
    try:
        args.slice_list = [int(s) for s in args.slices.split(",") if s.strip()]
    except ValueError:
        p.error(f"--slices {args.slices!r}: whole numbers, comma-separated (2,4)")
    if min(args.width, args.height, args.samples, args.actors, args.repeat) < 1:
        p.error("--width, --height, --samples, --actors and --repeat must be at least 1")
    if not all(2 <= n <= args.samples for n in args.slice_list):
        p.error("each of --slices must be from 2 to --samples")
    return args


def measure(args: argparse.Namespace, procs: Processes, out: Path) -> dict[str, Any]:
    extra = ["--width", str(args.width), "--height", str(args.height),
             "--samples", str(args.samples), "--frames", "1"]  # fmt: skip
    scene = make_scene(procs, out / "scene.blend", extra)
    result: dict[str, Any] = {"machine": machine(), "args": {**vars(args), "out": str(out)}}
    farm = LocalFarm(procs, out / "farm", out / "farm.log")
    farm.env["RAYFARM_CPU_ACTORS"] = str(args.actors)
    ways = [*(Way(f"{n} slices", n) for n in args.slice_list), Way("whole", 1)]
    try:
        client = farm.start()
        # Warm-up: every actor opens the scene and a finisher merges a frame (1 sample a
        # slice).
        warm = client.submit(scene, frames="1", slices=args.actors, samples=args.actors)
        if warm.wait(timeout=JOB_TIMEOUT_S).state is not rayfarm.JobState.COMPLETED:
            raise BenchError(f"the warm-up job failed: {warm.refresh().error}")
        for way in ways:
            for _ in range(args.repeat):
                _run(client, scene, way, out)
        ways.insert(0, ways.pop())  # the whole frame first in the table
    finally:
        farm.stop()

    assert ways[0].frame is not None
    reference = _passes(procs, ways[0].frame, out / "exr.log")
    base = statistics.median(ways[0].final_s)
    rows = []
    for way in ways:
        assert way.frame is not None
        got = _passes(procs, way.frame, out / "exr.log")
        if list(got) != list(reference):
            raise BenchError(f"{way.name}: passes {list(got)}, whole {list(reference)}")
        error = max(float(np.abs(got[n] - reference[n]).max()) for n in reference)
        final = statistics.median(way.final_s)
        rows.append({
            "way": way.name, "slices": way.slices, "final_s": final, "finals": way.final_s,
            "preview_s": statistics.median(way.preview_s), "speedup": base / final,
            "merge_s": statistics.median(way.merge_s),
            "render_s": statistics.median(way.render_s), "max_err": error,
        })  # fmt: skip
    result["ways"] = rows
    return result


def report(result: dict[str, Any]) -> None:
    a, m = result["args"], result["machine"]
    print(f"\none frame, {a['width']}x{a['height']}, {a['samples']} samples, multi-layer "
          f"EXR; {a['actors']} CPU actors; median of {a['repeat']}")  # fmt: skip
    print(f"{m['nproc']} CPUs ({m['cpu_model']}), bpy {m['bpy']}, ray {m['ray']}\n")
    head = ("way", "final frame s", "speedup", "first full preview s", "merge s",
            "tasks render s", "max err vs whole")  # fmt: skip
    print_pipe_table(head, [(
        r["way"], f"{r['final_s']:.2f}", f"{r['speedup']:.2f}x", f"{r['preview_s']:.2f}",
        f"{r['merge_s']:.3f}", f"{r['render_s']:.2f}", f"{r['max_err']:.1e}",
    ) for r in result["ways"]])  # fmt: skip
    two = next((r for r in result["ways"] if r["slices"] == 2), None)
    if two is not None:
        ok = two["speedup"] >= TARGET_SPEEDUP
        print(f"\n2 slices: final frame {two['speedup']:.2f}x sooner than whole (target >= "
              f"{TARGET_SPEEDUP}x) {pass_fail(ok)}")  # fmt: skip
    exact = all(r["max_err"] <= 1e-4 for r in result["ways"])
    print(f"every pass within 1e-4 of the whole frame: {pass_fail(exact)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)

    def work(procs: Processes, out: Path) -> dict[str, Any]:
        result = measure(args, procs, out)
        report(result)
        return result

    return run_bench(args.out, args.json, "rayfarm-slices-", work)


if __name__ == "__main__":
    sys.exit(main())
