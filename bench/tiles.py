"""Split-frame rendering: one frame whole on one actor vs tiled over the farm's actors.

The bench builds a scene with ``examples/make_scene.py`` (default 960x540, 16
samples, Cycles denoising on: several seconds a frame on one core), starts a local
farm with ``--actors`` CPU render actors (one core each on this 2-core machine), warms
every actor up with the scene, then renders frame 1 as multi-layer EXR three ways,
each ``--repeat`` times:

- whole: ``tiles=1``, one task on one actor while the others idle (the baseline);
- whole x2: frames 1 and 2 whole, one per actor at once: the whole frame's render time
  when the other actors are busy too, as they are while a frame's tiles render (on
  this 2-vCPU machine two renders at once are each slower than one alone);
- 2x2: four tiles over the actors, assembled, denoised and composited once;
- auto: ``tiles="auto"``: the farm picks the split from the frame and the pool.

For each: the wall time from ``farm.submit()`` until the job is COMPLETED (the
time to the first and only frame), its speedup over whole, the summed render
seconds of the tiles over the whole frame's render seconds (the tile overhead; the
whole frame's render includes Cycles' own denoise, so the tiled figure is given
without and with the finish step that denoises, and against both baselines), and
the seam figures: the max abs
difference of the tiled frame's combined pass from the whole frame's, over the
frame, within 4 pixels of a tile border, and away from the borders.

Targets: tile overhead at 2x2 <= 1.10 (render seconds, finish included, against
the whole frame rendered while the other actors work too); tiled wall time < whole
wall time for K > 1 actors.

``--sweep`` also measures the fixed cost of a tile (``bench/tile_sweep.py``: the
frame whole and as 4x4 and 16x16 tiles in one pinned process) and the work per
tile at which that cost is ``MAX_TILE_COST_SHARE`` of the tile's render time, the
bound ``tiles="auto"`` applies to the cost it measures per scene.

    python bench/tiles.py                             # make bench-tiles
    python bench/tiles.py --repeat 3 --sweep --json bench/results/tiles.json

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
from overhead import (  # the sibling bench: process and farm handling
    PYTHON,
    BenchError,
    LocalFarm,
    Processes,
    blender_python,
    machine,
    make_scene,
    run_bench,
)

SWEEP = Path(__file__).resolve().parent / "tile_sweep.py"
JOB_TIMEOUT_S = 3600.0
BAND = 4
TARGET_OVERHEAD = 1.10


@dataclass
class Way:
    name: str
    tiles: int | str
    frames: str = "1"
    walls: list[float] = field(default_factory=list)
    render_s: list[float] = field(default_factory=list)  # summed task render seconds
    task_s: list[float] = field(default_factory=list)  # each task's render seconds
    finish_s: list[float] = field(default_factory=list)
    grid: str = ""
    frame: Path | None = None


def _events(farm: LocalFarm, job_id: str) -> list[dict[str, str]]:
    import redis

    match = re.search(r"redis (redis://\S+?)\)", farm.log.read_text())
    if match is None:
        raise BenchError(f"the farm did not print its Redis URL; see {farm.log}")
    client = redis.Redis.from_url(match[1], decode_responses=True)
    try:
        return [f for _, f in client.xrange(f"rayfarm:job:{job_id}:events")]
    finally:
        client.close()


def _run(farm: LocalFarm, client: rayfarm.Farm, scene: Path, way: Way, out: Path) -> None:
    started = time.perf_counter()
    job = client.submit(scene, frames=way.frames, tiles=way.tiles, format="exr")
    status = job.wait(timeout=JOB_TIMEOUT_S)
    wall = time.perf_counter() - started
    job.refresh()
    if status.state is not rayfarm.JobState.COMPLETED:
        raise BenchError(f"{way.name}: job {job.id} is {status.state}: {job.error}")
    events = _events(farm, job.id)
    way.walls.append(wall)
    tasks = [float(e["seconds"]) for e in events if e["kind"] == "task"]
    way.task_s.extend(tasks)
    way.render_s.append(sum(tasks))
    way.finish_s.append(sum(float(e.get("finish_s", 0)) for e in events if e["kind"] == "frame"))
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


def _sweep(procs: Processes, scene: Path, out: Path, pixel_samples: int) -> list[dict[str, Any]]:
    log = out / "sweep.log"
    procs.run([PYTHON, SWEEP, scene, "4x4", "16x16"], log)
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    for row in rows:
        row["per_tile_s"] = (row["tiles_s"] - row["whole_s"]) / row["tiles"]
        # Work at which the fixed cost is MAX_TILE_COST_SHARE of a tile's render time.
        per_ps = row["whole_s"] / pixel_samples
        row["threshold"] = max(0.0, row["per_tile_s"] / MAX_TILE_COST_SHARE / per_ps)
    return rows


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=960)
    p.add_argument("--height", type=int, default=540)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--heavy", action="store_true", help="the ~2.5M-triangle scene")
    p.add_argument("--actors", type=int, default=2, help="CPU render actors on the farm")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--sweep", action="store_true", help="also measure the per-tile cost")
    p.add_argument("--out", type=Path, help="keep scenes, frames and logs here")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def measure(args: argparse.Namespace, procs: Processes, out: Path) -> dict[str, Any]:
    extra = ["--width", str(args.width), "--height", str(args.height),
             "--samples", str(args.samples), "--frames", "2", "--denoise"]  # fmt: skip
    if args.heavy:
        extra.append("--heavy")
    scene = make_scene(procs, out / "scene.blend", extra)
    result: dict[str, Any] = {"machine": machine(), "args": {**vars(args), "out": str(out)}}
    if args.sweep:
        result["sweep"] = _sweep(procs, scene, out, args.width * args.height * args.samples)

    farm = LocalFarm(procs, out / "farm", out / "farm.log")
    farm.env["RAYFARM_CPU_ACTORS"] = str(args.actors)
    ways = [
        Way("whole", 1),
        Way("whole x2", 1, frames=",".join(map(str, range(1, args.actors + 1)))),
        Way("2x2", "2x2"),
        Way("auto", "auto"),
    ]
    try:
        client = farm.start()
        # Warm-up: every actor imports bpy and opens the scene (one tile each, 1 sample).
        warm = client.submit(scene, frames="2", tiles=f"{args.actors}x1", samples=1)
        if warm.wait(timeout=JOB_TIMEOUT_S).state is not rayfarm.JobState.COMPLETED:
            raise BenchError(f"the warm-up job failed: {warm.refresh().error}")
        for _ in range(args.repeat):
            for way in ways:
                _run(farm, client, scene, way, out)
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
        rows.append({
            "way": way.name, "grid": way.grid, "wall_s": statistics.median(way.walls),
            "walls": way.walls, "speedup": base_wall / statistics.median(way.walls),
            "render_s": render, "finish_s": finish,
            "overhead": render / base_render, "overhead_finish": (render + finish) / base_render,
            "overhead_busy": (render + finish) / busy_render,
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
    head = ("way", "grid", "wall s", "speedup", "tiles render s", "finish s", "overhead",
            "+finish", "+finish vs busy", "max err", "band err", "interior err")  # fmt: skip
    print(" | ".join(head))
    print(" | ".join("-" * len(h) for h in head))
    for r in result["ways"]:
        cells = (r["way"], r["grid"], f"{r['wall_s']:.2f}", f"{r['speedup']:.2f}x",
                 f"{r['render_s']:.2f}", f"{r['finish_s']:.2f}", f"{r['overhead']:.3f}",
                 f"{r['overhead_finish']:.3f}", f"{r['overhead_busy']:.3f}",
                 _f(r["max_err"], ".1e"),
                 _f(r["band_err"], ".1e"), _f(r["interior_err"], ".1e"))  # fmt: skip
        print(" | ".join(cells))
    two = next(r for r in result["ways"] if r["way"] == "2x2")
    whole = next(r for r in result["ways"] if r["way"] == "whole")
    ok = two["overhead_busy"] <= TARGET_OVERHEAD
    print(f"\ntile overhead at 2x2 (finish included, vs the whole frame with every actor "
          f"busy): {two['overhead_busy']:.3f} (target <= {TARGET_OVERHEAD}) "
          f"{'PASS' if ok else 'FAIL'}; alone: {two['overhead_finish']:.3f}")  # fmt: skip
    for r in result["ways"][1:]:
        faster = r["wall_s"] < whole["wall_s"]
        print(f"{r['way']} ({r['grid']}) first frame in {r['wall_s']:.2f} s vs whole "
              f"{whole['wall_s']:.2f} s: {'PASS' if faster else 'FAIL'}")  # fmt: skip
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
