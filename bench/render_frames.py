"""Render frames of a .blend with bpy in this process: ways (a) and (b) of ``overhead.py``.

    python bench/render_frames.py SCENE OUTDIR FRAME [FRAME ...] [--persistent] [--marks FILE]

Opens SCENE the way the farm does (no UI, Python auto-execution off), renders
each FRAME in order with ``bpy.ops.render.render(write_still=True)`` to
``OUTDIR/NNNN.png`` (8-bit PNG; everything else is the scene's own settings) and
exits. ``--persistent`` sets ``render.use_persistent_data`` so later frames
reuse the first one's synced scene (way (a), the floor); way (b) runs this once
per frame without it.

For the benchmark's breakdown, ``--marks FILE`` gets one JSON line per milestone
with a ``time.time()`` stamp (the driver shares this clock): ``start`` (the
interpreter is up, before bpy), ``imported``, ``opened``, and ``frame`` after
each frame is written. (A file of its own: Blender's C code writes to stdout
with its own buffering, which would split lines.)
"""

from __future__ import annotations

import time

STARTED = time.time()  # first thing: before argparse, json and above all bpy

import argparse  # noqa: E402 - timed from interpreter start
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

_marks: Any = None


def mark(event: str, stamp: float | None = None, **fields: Any) -> None:
    if _marks is not None:
        record = {"event": event, "t": time.time() if stamp is None else stamp, **fields}
        _marks.write(json.dumps(record) + "\n")
        _marks.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scene")
    p.add_argument("outdir")
    p.add_argument("frames", nargs="+", type=int)
    p.add_argument("--persistent", action="store_true", help="render.use_persistent_data")
    p.add_argument("--marks", help="append timing milestones here as JSON lines")
    args = p.parse_args()
    global _marks
    if args.marks:
        _marks = open(args.marks, "a")  # noqa: SIM115 - open until the process exits
    mark("start", STARTED)

    import bpy

    mark("imported", version=bpy.app.version_string)
    bpy.ops.wm.open_mainfile(filepath=os.path.abspath(args.scene), load_ui=False, use_scripts=False)
    scene = bpy.context.scene
    scene.render.use_persistent_data = args.persistent
    image = scene.render.image_settings
    if hasattr(image, "media_type"):  # Blender 5.0: a scene may be set to write video
        image.media_type = "IMAGE"
    image.file_format = "PNG"
    image.color_depth = "8"
    mark("opened")
    os.makedirs(args.outdir, exist_ok=True)
    for frame in args.frames:
        # Like Blender's own `-f`: the render pipeline evaluates the frame itself.
        scene.frame_current = frame
        scene.render.filepath = os.path.join(os.path.abspath(args.outdir), f"{frame:04d}.png")
        bpy.ops.render.render(write_still=True)
        if not os.path.isfile(scene.render.filepath):
            print(f"frame {frame} was not written to {scene.render.filepath}", file=sys.stderr)
            return 1
        mark("frame", frame=frame)
    return 0


if __name__ == "__main__":
    sys.exit(main())
