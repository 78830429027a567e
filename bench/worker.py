"""The Blender worker boundary: what a render actor's worker process costs against bpy
rendering in its own process, measured in one run.

For each repeat, on one scene (``--scene light|heavy``, built with the bench's Blender):

- **bpy, fresh process** (``render_frames.py``, way (a) of ``overhead.py``): interpreter
  start to bpy imported, scene opened, first frame written, second frame written;
- **cold worker**: a RenderActor (in this process, no Ray: as a farm actor has no worker
  yet, after a crash, a cancel or a switch of Blender version) renders frame 1 then 2:
  the worker's start (interpreter + bpy + hello), the first task (open + render + the
  trip of the image and preview through files), the second task;
- **warm worker**: the same actor renders frames 1 and 2 again (the scene open, as a job's
  later frames find it).

    python bench/worker.py                  # light scene, 3 repeats
    python bench/worker.py --scene heavy

Prints a table of medians; the cold worker's first frame against the fresh bpy process's
is the boundary's cost at a cold start, the warm frames against bpy's second frame its
cost per frame. Exit status: 0 when the measurement ran, 1 when something broke.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import (  # what the benches share
    BLENDER,
    RENDER_FRAMES,
    SCENES,
    Processes,
    add_output_options,
    blender_python,
    machine,
    make_scene,
    run_bench,
)

from rayfarm.render.actor import RenderActor
from rayfarm.render.inputs import InputFile, Inputs, blob_key
from rayfarm.render.tasks import RenderTask


def _bpy_process(procs: Processes, scene: Path, out: Path) -> dict[str, float]:
    """Way (a) for two frames, with its milestones."""
    marks = out / "marks.jsonl"
    marks.unlink(missing_ok=True)
    launched = time.time()
    procs.run([blender_python(), RENDER_FRAMES, scene, out, 1, 2, "--persistent", "--marks",
               marks], out / "log.txt")  # fmt: skip
    at: dict[str, list[float]] = {}
    for line in marks.read_text().splitlines():
        record = json.loads(line)
        at.setdefault(record["event"], []).append(record["t"])
    return {
        "start_s": at["imported"][0] - launched,
        "first_s": at["frame"][0] - launched,
        "second_s": at["frame"][1] - at["frame"][0],
    }


def _inputs(scene: Path, storage: Path) -> Inputs:
    """The scene as a farm stores it: one blob under a ``file://`` root."""
    data = scene.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    blob = storage / blob_key(digest)
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    return Inputs(storage.as_uri(), scene.name, (InputFile(scene.name, digest, len(data)),))


def _worker(inputs: Inputs) -> dict[str, float]:
    actor = RenderActor(threads=0)  # this process's cores, as the bpy process has them

    def task(frame: int) -> RenderTask:
        return RenderTask("bench", inputs.digest, frame, 0, (1, 1), None, None, None, None,
                          "png", 8, blender=BLENDER)  # fmt: skip

    started = time.perf_counter()
    actor.workers.worker(BLENDER)  # the worker's start alone
    start_s = time.perf_counter() - started
    times = []
    for frame in (1, 2, 1, 2):
        t0 = time.perf_counter()
        actor.render(task(frame), inputs)
        times.append(time.perf_counter() - t0)
    actor.workers.close()
    return {"start_s": start_s, "first_s": start_s + times[0], "second_s": times[1],
            "warm_first_s": times[2], "warm_second_s": times[3]}  # fmt: skip


def measure(args: argparse.Namespace, procs: Processes, out: Path) -> dict[str, Any]:
    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu_model']}), Blender {info['bpy']}; "
          f"files in {out}", flush=True)  # fmt: skip
    scene = make_scene(procs, out / f"{args.scene}.blend", [*SCENES[args.scene], "--frames", "2"])
    inputs = _inputs(scene, out / "storage")
    bpy_runs, worker_runs = [], []
    for i in range(args.repeat):
        bpy_runs.append(_bpy_process(procs, scene, out / f"bpy-{i}"))
        worker_runs.append(_worker(inputs))
    med = {
        "bpy": {k: statistics.median(r[k] for r in bpy_runs) for k in bpy_runs[0]},
        "worker": {k: statistics.median(r[k] for r in worker_runs) for k in worker_runs[0]},
    }
    b, w = med["bpy"], med["worker"]
    print()
    print(
        f"{args.scene} scene, median of {args.repeat}        {'bpy process':>12} "
        f"{'worker':>8} {'ratio':>6}"
    )
    rows = [
        ("start (bpy imported / worker said hello)", b["start_s"], w["start_s"]),
        ("first frame from a cold start", b["first_s"], w["first_s"]),
        ("second frame", b["second_s"], w["second_s"]),
        ("warm worker: frame 1 again", b["second_s"], w["warm_first_s"]),
        ("warm worker: frame 2 again", b["second_s"], w["warm_second_s"]),
    ]
    for name, base, got in rows:
        print(f"  {name:42} {base:10.3f} s {got:6.3f} s {got / base:6.2f}")
    return {"machine": info, "scene": args.scene, "runs": {"bpy": bpy_runs,
            "worker": worker_runs}, "median": med}  # fmt: skip


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scene", choices=sorted(SCENES), default="light")
    p.add_argument("--repeat", type=int, default=3)
    add_output_options(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    return run_bench(
        args.out, args.json, "rayfarm-worker-", lambda procs, out: measure(args, procs, out)
    )


if __name__ == "__main__":
    sys.exit(main())
