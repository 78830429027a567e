"""Split-frame rendering: one frame whole on one actor vs tiled over the farm's actors.

The bench builds a scene with ``examples/make_scene.py`` (default 960x540, 16
samples, Cycles denoising on: several seconds a frame on one core; ``--4k``:
3840x2160 in 16 tiles), starts a local farm with ``--actors`` CPU render actors (one
core each on this 2-core machine), warms every actor up with the scene, then renders
frame 1 as multi-layer EXR three ways, each ``--repeat`` times:

- whole: ``tiles=1``, one task on one actor while the others idle (the baseline);
- whole x2: frames 1 and 2 whole, one per actor at once: the whole frame's render time
  when the other actors are busy too, as they are while a frame's tiles render (on
  this 2-vCPU machine two renders at once are each slower than one alone);
- the grid (``--grid``, 2x2; 4x4 with ``--4k``): tiles over the actors, joined,
  denoised and composited once;
- auto: ``tiles="auto"``: the farm picks the split from the frame and the pool.

For each: the wall time from ``farm.submit()`` until the job is COMPLETED (the
time to the first and only frame), its speedup over whole, the summed render
seconds of the tiles over the whole frame's render seconds (the tile overhead; the
whole frame's render includes Cycles' own denoise, so the tiled figure is given
without and with the finish step that denoises, and against both baselines), and
the seam figures: the max abs
difference of the tiled frame's combined pass from the whole frame's, over the
frame, within 4 pixels of a tile border, and away from the borders.

A tiled frame's own costs are shown apart, from its events: the join (``join s``:
the assembler's copies of the tiles into the frame, and the frame handed to the
worker that finishes it) and the finish (``finish s``: denoise, compositor, format
and preview, on every core of the node), each with its share of the frame's work
(tiles' render seconds + join + finish).

Targets: tile overhead at 2x2 <= 1.10 (render seconds, finish included, against
the whole frame rendered while the other actors work too); tiled wall time < whole
wall time for K > 1 actors.

``--sweep`` also measures the fixed cost of a tile (``bench/tile_sweep.py``: the
frame whole and as 4x4 and 16x16 tiles, or ``--sweep-grids``, in one pinned process)
and the work per
tile at which that cost is ``MAX_TILE_COST_SHARE`` of the tile's render time, the
bound ``tiles="auto"`` applies to the cost it measures per scene.

    python bench/tiles.py                             # make bench-tiles
    python bench/tiles.py --repeat 3 --sweep --json bench/results/tiles.json
    python bench/tiles.py --4k                        # 3840x2160 in 4x4 tiles
    python bench/tiles.py --width 64 --height 48 --samples 1 --sweep --sweep-grids 2x2

Exit status: 0 when the measurement ran (the table says PASS or FAIL), 1 when
something broke, 130 on Ctrl-C. Every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import rayfarm
from rayfarm.render.supervisor import BOOT, PACKAGE_DIR
from rayfarm.render.tiles import MAX_TILE_COST_SHARE, border_band

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # what the benches share
    PYTHON,
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

SWEEP = Path(__file__).resolve().parent / "tile_sweep.py"
JOB_TIMEOUT_S = 3600.0
BAND = 4
TARGET_OVERHEAD = 1.10
#: The finish's steps, from its frame event: waiting for the finisher to start, the
#: scene laid out and opened there, then the work.
FINISH_STEPS = ("start_s", "inputs_s", "open_s", "denoise_s", "composite_s", "write_s")


@dataclass
class Way:
    name: str
    tiles: int | str
    frames: str = "1"
    walls: list[float] = field(default_factory=list)
    render_s: list[float] = field(default_factory=list)  # summed task render seconds
    task_s: list[float] = field(default_factory=list)  # each task's render seconds
    finish_s: list[float] = field(default_factory=list)  # finishing tiled frames
    join_s: list[float] = field(default_factory=list)  # joining their tiles, handing over
    finish_steps: list[dict[str, float]] = field(default_factory=list)  # the finish's steps
    grid: str = ""
    frame: Path | None = None


def _events(job: rayfarm.Job) -> list[dict[str, Any]]:
    """The finished job's events (its execution log), as the API gives them."""
    return [e.model_dump(mode="json", by_alias=True) for e in job.events()]


def _run(client: rayfarm.Farm, scene: Path, way: Way, out: Path) -> None:
    started = time.perf_counter()
    job = client.submit(scene, frames=way.frames, tiles=way.tiles, format="exr")
    status = job.wait(timeout=JOB_TIMEOUT_S)
    wall = time.perf_counter() - started
    job.refresh()
    if status.state is not rayfarm.JobState.COMPLETED:
        raise BenchError(f"{way.name}: job {job.id} is {status.state}: {job.error}")
    events = _events(job)
    way.walls.append(wall)
    tasks = [float(e["seconds"]) for e in events if e["kind"] == "task_done"]
    if not tasks:
        raise BenchError(f"{way.name}: job {job.id} has no task_done events")
    way.task_s.extend(tasks)
    way.render_s.append(sum(tasks))
    frames = [e for e in events if e["kind"] == "frame"]
    # The finish call's seconds include handing the frame over: that is joining.
    handoff = sum(float(e.get("handoff_s", 0)) for e in frames)
    way.finish_s.append(sum(float(e.get("finish_s", 0)) for e in frames) - handoff)
    way.join_s.append(sum(float(e.get("join_s", 0)) for e in frames) + handoff)
    way.finish_steps.append(
        {name: sum(float(e.get(name) or 0) for e in frames) for name in FINISH_STEPS}
    )
    way.grid = job.tiles or "?"
    way.frame = job.download(out / way.name.replace(" ", "_") / str(len(way.walls)))[0]


def _combined(procs: Processes, path: Path, log: Path) -> np.ndarray:
    npz = path.with_suffix(".npz")
    procs.run([blender_python(), "-I", "-c", BOOT, PACKAGE_DIR, "dump-exr", path, npz], log)
    with np.load(npz) as data:
        names = [str(n) for n in data["names"]]
        return np.asarray(data[f"pixels{names.index('ViewLayer.Combined')}"])


def _band(w: int, h: int, grid: str) -> np.ndarray:
    if grid in ("1", "?"):
        return np.zeros((h, w), dtype=bool)
    nx, ny = map(int, grid.split("x"))
    return border_band(w, h, nx, ny, BAND)


def _sweep(
    procs: Processes, scene: Path, out: Path, pixel_samples: int, grids: list[str]
) -> list[dict[str, Any]]:
    log = out / "sweep.log"
    procs.run([PYTHON, SWEEP, scene, *grids], log)
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    for row in rows:
        row["per_tile_s"] = (row["tiles_s"] - row["whole_s"]) / row["tiles"]
        # Work at which the fixed cost is MAX_TILE_COST_SHARE of a tile's render time.
        per_ps = row["whole_s"] / pixel_samples
        row["threshold"] = max(0.0, row["per_tile_s"] / MAX_TILE_COST_SHARE / per_ps)
    return rows


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, help="frame width (960; 3840 with --4k)")
    p.add_argument("--height", type=int, help="frame height (540; 2160 with --4k)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--grid", help="the tiled way's grid, NxM (2x2; 4x4 with --4k)")
    p.add_argument("--4k", dest="uhd", action="store_true",
                   help="a 4K frame (3840x2160) in 16 tiles (4x4)")  # fmt: skip
    p.add_argument("--heavy", action="store_true", help="the ~2.5M-triangle scene")
    p.add_argument("--actors", type=int, default=2, help="CPU render actors on the farm")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--sweep", action="store_true", help="also measure the per-tile cost")
    p.add_argument("--sweep-grids", default="4x4,16x16",
                   help="the grids --sweep renders, comma-separated (4x4,16x16)")  # fmt: skip
    add_output_options(p, "keep scenes, frames and logs here")
    args = p.parse_args(argv)
    args.width = args.width or (3840 if args.uhd else 960)
    args.height = args.height or (2160 if args.uhd else 540)
    args.grid = args.grid or ("4x4" if args.uhd else "2x2")
    args.sweep_list = [g.strip() for g in args.sweep_grids.split(",") if g.strip()]
    for grid in [args.grid, *args.sweep_list]:
        if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", grid):
            p.error(f"{grid!r} is not a grid (NxM, e.g. 2x2)")
    if min(args.width, args.height, args.samples, args.actors, args.repeat) < 1:
        p.error("--width, --height, --samples, --actors and --repeat must be at least 1")
    return args


def measure(args: argparse.Namespace, procs: Processes, out: Path) -> dict[str, Any]:
    extra = ["--width", str(args.width), "--height", str(args.height),
             "--samples", str(args.samples), "--frames", "2", "--denoise"]  # fmt: skip
    if args.heavy:
        extra.append("--heavy")
    scene = make_scene(procs, out / "scene.blend", extra)
    result: dict[str, Any] = {"machine": machine(), "args": {**vars(args), "out": str(out)}}
    if args.sweep:
        pixel_samples = args.width * args.height * args.samples
        result["sweep"] = _sweep(procs, scene, out, pixel_samples, args.sweep_list)

    farm = LocalFarm(procs, out / "farm", out / "farm.log")
    farm.env["RAYFARM_CPU_ACTORS"] = str(args.actors)
    ways = [
        Way("whole", 1),
        Way("whole x2", 1, frames=",".join(map(str, range(1, args.actors + 1)))),
        Way(args.grid, args.grid),
        Way("auto", "auto"),
    ]
    try:
        client = farm.start()
        # Warm-up: every actor imports bpy and opens the scene (one tile each, 1 sample),
        # and finishes a frame (a frame per actor: likely one finish on each).
        frames = f"1-{args.actors}"
        warm = client.submit(scene, frames=frames, tiles=f"{args.actors}x1", samples=1)
        if warm.wait(timeout=JOB_TIMEOUT_S).state is not rayfarm.JobState.COMPLETED:
            raise BenchError(f"the warm-up job failed: {warm.refresh().error}")
        for _ in range(args.repeat):
            for way in ways:
                _run(client, scene, way, out)
    finally:
        farm.stop()

    whole = ways[0]
    assert whole.frame is not None
    reference = _combined(procs, whole.frame, out / "exr.log")
    base_wall = statistics.median(whole.walls)
    base_render = statistics.median(whole.render_s)
    busy_render = statistics.median(ways[1].task_s)
    result["whole_render_s"] = base_render
    result["whole_render_busy_s"] = busy_render
    rows = []
    for way in ways:
        if way.name == "whole x2":
            continue
        assert way.frame is not None
        error = np.abs(_combined(procs, way.frame, out / "exr.log") - reference).max(axis=2)
        band = _band(args.width, args.height, way.grid)
        render, finish = statistics.median(way.render_s), statistics.median(way.finish_s)
        join = statistics.median(way.join_s)
        work = render + join + finish
        rows.append({
            "way": way.name, "grid": way.grid, "wall_s": statistics.median(way.walls),
            "walls": way.walls, "speedup": base_wall / statistics.median(way.walls),
            "render_s": render, "join_s": join, "finish_s": finish,
            "join_share": join / work, "finish_share": finish / work,
            "finish_steps": {name: statistics.median(s[name] for s in way.finish_steps)
                             for name in FINISH_STEPS},
            "overhead": render / base_render,
            "overhead_finish": (render + join + finish) / base_render,
            "overhead_busy": (render + join + finish) / busy_render,
            "max_err": float(error.max()),
            "band_err": float(error[band].max()) if band.any() else None,
            "interior_err": float(error[~band].max()),
        })  # fmt: skip
    result["ways"] = rows
    return result


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def report(result: dict[str, Any]) -> None:
    a = result["args"]
    m = result["machine"]
    print(f"\none frame, {a['width']}x{a['height']}, {a['samples']} samples, denoised, "
          f"multi-layer EXR; {a['actors']} CPU actors; median of {a['repeat']}")  # fmt: skip
    print(f"{m['nproc']} CPUs ({m['cpu_model']}), bpy {m['bpy']}, ray {m['ray']}\n")
    print(f"whole frame's render: {result['whole_render_s']:.2f} s alone, "
          f"{result['whole_render_busy_s']:.2f} s with every actor rendering\n")  # fmt: skip
    head = ("way", "grid", "wall s", "speedup", "tiles render s", "join s", "join share",
            "finish s", "finish share", "overhead", "+join+finish", "+join+finish vs busy",
            "max err", "band err", "interior err")  # fmt: skip
    print_pipe_table(head, [
        (r["way"], r["grid"], f"{r['wall_s']:.2f}", f"{r['speedup']:.2f}x",
         f"{r['render_s']:.2f}", f"{r['join_s']:.3f}", f"{r['join_share']:.1%}",
         f"{r['finish_s']:.2f}", f"{r['finish_share']:.1%}", f"{r['overhead']:.3f}",
         f"{r['overhead_finish']:.3f}", f"{r['overhead_busy']:.3f}", _f(r["max_err"], ".1e"),
         _f(r["band_err"], ".1e"), _f(r["interior_err"], ".1e"))
        for r in result["ways"]
    ])  # fmt: skip
    grid = a["grid"]
    tiled = next(r for r in result["ways"] if r["way"] == grid)
    whole = next(r for r in result["ways"] if r["way"] == "whole")
    ok = tiled["overhead_busy"] <= TARGET_OVERHEAD
    print(f"\ntile overhead at {grid} (join and finish included, vs the whole frame with "
          f"every actor busy): {tiled['overhead_busy']:.3f} (target <= {TARGET_OVERHEAD}) "
          f"{pass_fail(ok)}; alone: {tiled['overhead_finish']:.3f}")  # fmt: skip
    print(f"joining {grid} tiles: {tiled['join_s']:.3f} s ({tiled['join_share']:.1%} of the "
          f"frame's work); finishing: {tiled['finish_s']:.2f} s "
          f"({tiled['finish_share']:.1%}): "
          + ", ".join(f"{name.removesuffix('_s')} {seconds:.2f}"
                      for name, seconds in tiled["finish_steps"].items()))  # fmt: skip
    for r in result["ways"][1:]:
        faster = r["wall_s"] < whole["wall_s"]
        print(f"{r['way']} ({r['grid']}) first frame in {r['wall_s']:.2f} s vs whole "
              f"{whole['wall_s']:.2f} s: {pass_fail(faster)}")  # fmt: skip
    for row in result.get("sweep", []):
        print(f"sweep {row['grid']}: {row['tiles_s']:.2f} s in {row['tiles']} tiles vs "
              f"{row['whole_s']:.2f} s whole: {1000 * row['per_tile_s']:.1f} ms per tile; "
              f"{MAX_TILE_COST_SHARE:.0%} of a tile's time at {row['threshold']:,.0f} "
              "pixel-samples")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)

    def work(procs: Processes, out: Path) -> dict[str, Any]:
        result = measure(args, procs, out)
        report(result)
        return result

    return run_bench(args.out, args.json, "rayfarm-tiles-", work)


if __name__ == "__main__":
    sys.exit(main())
