"""Render reference frames directly with bpy, the way an artist's Blender would.

    python render_reference.py SCENE.blend OUT_DIR [--exr32|--exr16] FRAME [FRAME ...]

Writes OUT_DIR/NNNN.png for each frame with the scene's own settings (a plain
``render.render(write_still=True)``), for tests to compare the farm against;
with ``--exr32`` / ``--exr16``, OUT_DIR/NNNN.exr as multi-layer OpenEXR with every
pass, float or half.
"""

import sys
from pathlib import Path

import bpy


def main() -> None:
    scene_path, out_dir, *frames = sys.argv[1:]
    depth = next((f.removeprefix("--exr") for f in frames if f.startswith("--exr")), None)
    exr = depth is not None
    frames = [f for f in frames if not f.startswith("--exr")]
    bpy.ops.wm.open_mainfile(filepath=scene_path, load_ui=False, use_scripts=False)
    scene = bpy.context.scene
    if exr:
        settings = scene.render.image_settings
        settings.media_type = "MULTI_LAYER_IMAGE"
        settings.color_depth = depth
        settings.exr_codec = "ZIP"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for frame in map(int, frames):
        scene.frame_set(frame)
        scene.render.filepath = str(Path(out_dir) / f"{frame:04d}.{'exr' if exr else 'png'}")
        scene.render.use_file_extension = False
        bpy.ops.render.render(write_still=True)


if __name__ == "__main__":
    main()
