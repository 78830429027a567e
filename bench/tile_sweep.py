"""Per-tile fixed cost of a RenderActor: one frame rendered whole and as finer and finer
grids of tiles, in this process, on one pinned core (as a farm CPU actor renders).

    python bench/tile_sweep.py SCENE.blend GRID [GRID ...]     # GRID: 2x2, 4x4, ...

Prints one JSON line per grid: the tiles' summed render seconds (border render, EXR
out and in, as the farm does it) and the frame's whole render seconds, measured
after a warm-up render so the scene's BVH is built once, as on a farm actor.
Denoising is off for all of it: tiles never denoise (the frame is denoised once, whole).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rayfarm.render.actor import RenderActor
from rayfarm.render.inputs import InputFile, Inputs, blob_key
from rayfarm.render.tasks import RenderTask

#: The Blender to render with (``RAYFARM_BENCH_BLENDER``, as overhead.py).
BLENDER = os.environ.get("RAYFARM_BENCH_BLENDER", "5.0")


def main() -> None:
    scene_path, *grids = sys.argv[1:]
    data = Path(scene_path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    # The scene as a farm stores it (one blob under a file:// root): no Ray needed.
    storage = Path(tempfile.mkdtemp(prefix="rayfarm-sweep-"))
    blob = storage / blob_key(digest)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    inputs = Inputs(storage.as_uri(), "scene.blend", (InputFile("scene.blend", digest, len(data)),))
    actor = RenderActor(threads=1, slot=0, slots=max(1, len(actor_cores())))
    # It renders tiles and finishes no frame: no finisher to start beside the timings.
    actor.workers.node_cores = actor.cores

    def task(tile: int, grid: tuple[int, int]) -> RenderTask:
        # Denoising off: tiles never denoise (the finish step does, once), so a whole
        # frame that did would not be the same work.
        return RenderTask(
            "sweep", inputs.digest, 1, tile, grid, None, None, None, None, "png", 8,
            denoise=False, blender=BLENDER,
        )  # fmt: skip

    actor.render(task(0, (1, 1)), inputs)  # warm-up: open, sync, BVH
    started = time.perf_counter()
    actor.render(task(0, (1, 1)), inputs)
    whole = time.perf_counter() - started
    for spec in grids:
        nx, ny = map(int, spec.split("x"))
        seconds = []
        for tile in range(nx * ny):
            result, _ = actor.render(task(tile, (nx, ny)), inputs)
            seconds.append(result.seconds)
        print(json.dumps({"grid": spec, "tiles": nx * ny, "whole_s": whole,
                          "tiles_s": sum(seconds)}), flush=True)  # fmt: skip
    shutil.rmtree(storage, ignore_errors=True)


def actor_cores() -> list[int]:
    import os

    return sorted(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
