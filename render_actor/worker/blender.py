"""Small helpers over Blender's data for the worker's session (no bpy import: they take
bpy objects as arguments)."""

from __future__ import annotations

import os
import re
from typing import Any

from .samples import COLOUR_SWITCHES

#: Cycles' sample subset settings (a slice renders samples offset .. offset + length of
#: the total).
SUBSET = ("use_sample_subset", "sample_offset", "sample_subset_length")

__all__ = [
    "SUBSET",
    "assign",
    "confine_outputs",
    "missing_files",
    "pixel_size",
    "prepare_assembly",
    "safe_name",
    "script_warnings",
    "set_format",
    "snapshot",
]


#: ID collections whose items may name an external file, and how a file-less one says so.
_FILE_USERS = ("images", "libraries", "sounds", "fonts", "movieclips", "volumes", "cache_files")


def missing_files(bpy: Any) -> list[str]:
    """Paths the open file names that do not exist (packed data and generated images
    excluded), as the file names them. UDIM images count as missing when no tile is."""
    missing = []
    for collection in _FILE_USERS:
        for item in getattr(bpy.data, collection):
            filepath = getattr(item, "filepath", "")
            if not filepath or getattr(item, "packed_file", None) is not None:
                continue
            if collection == "images" and item.source not in ("FILE", "SEQUENCE", "TILED"):
                continue
            if collection == "fonts" and filepath == "<builtin>":
                continue
            if getattr(item, "library", None) is not None:
                continue  # linked data: its library is checked instead
            path = bpy.path.abspath(filepath)
            if collection == "images" and item.source in ("SEQUENCE", "TILED"):
                import glob
                import re

                pattern = re.sub(r"<UDIM>|<UVTILE>|\d+(?=\.[^.]+$)", "*", path)
                if glob.glob(pattern):
                    continue
            elif os.path.exists(path):
                continue
            missing.append(filepath)
    return sorted(set(missing))


def pixel_size(scene: Any) -> tuple[int, int]:
    r = scene.render
    return (
        r.resolution_x * r.resolution_percentage // 100,
        r.resolution_y * r.resolution_percentage // 100,
    )


def snapshot(scene: Any) -> dict[str, Any]:
    """The scene's own values of everything a task may change, taken when the file opens:
    each task sets them from here, so no task inherits another's overrides."""
    return {
        "camera": scene.camera,
        "samples": scene.cycles.samples,
        "resolution_percentage": scene.render.resolution_percentage,
        "use_denoising": scene.cycles.use_denoising,
        "use_compositing": scene.render.use_compositing,
        "store_passes": {v.name: v.cycles.denoising_store_passes for v in scene.view_layers},
        # What a sample slice changes (``Session._slice``): adaptive sampling, the sample
        # subset, and the colour passes a divided light pass needs to be merged.
        "sampling": {
            name: getattr(scene.cycles, name)
            for name in ("use_adaptive_sampling", *SUBSET)
            if hasattr(scene.cycles, name)
        },
        "colour_passes": {
            v.name: {name: getattr(v, name) for name in COLOUR_SWITCHES.values()}
            for v in scene.view_layers
        },
    }


def assign(target: Any, name: str, value: Any) -> None:
    """Set an RNA property only when it changes. Every assignment runs the property's
    update callback, and some (the scene camera, for one) tag the depsgraph so that the
    next render re-syncs the scene: measured at +0.1-0.2 s a frame on a 2.5M-triangle
    scene with persistent data, for values that had not changed at all."""
    if getattr(target, name) != value:
        setattr(target, name, value)


def set_format(settings: Any, fmt: str, depth: int, codec: str = "ZIP") -> None:
    """``png``; ``exr`` (multi-layer: every pass of every view layer, one part each); or
    ``exr1`` (single-layer RGBA, the composited image alone). ``codec``: an EXR's
    compression (``"NONE"`` for a scratch file read back at once; lossless either way)."""
    # 5.0: a scene may ask for video; we write images (multi-layer ones for exr).
    assign(settings, "media_type", "MULTI_LAYER_IMAGE" if fmt == "exr" else "IMAGE")
    if fmt == "png":
        assign(settings, "file_format", "PNG")
    else:
        assign(settings, "file_format", "OPEN_EXR_MULTILAYER" if fmt == "exr" else "OPEN_EXR")
        assign(settings, "exr_codec", codec)
        assign(settings, "use_exr_interleave", False)  # one part per pass
    assign(settings, "color_depth", str(depth))
    if settings.color_mode not in ("RGB", "RGBA", "BW"):
        settings.color_mode = "RGBA"


def prepare_assembly(scene: Any, width: int, height: int) -> None:
    """Turn ``scene`` (a copy of the source scene, so every colour management setting,
    curves and looks included, is the source's) into one that writes a ``width`` x
    ``height`` frame from its compositor alone."""
    r = scene.render
    r.resolution_x, r.resolution_y, r.resolution_percentage = width, height, 100
    r.use_border = False
    r.use_crop_to_border = False
    r.use_sequencer = False  # a strip edit would replace the compositor's output
    r.use_compositing = True
    r.use_file_extension = False
    r.use_overwrite = True
    # The copy renders nothing: keep its stamp metadata from claiming otherwise.
    for name in ("use_stamp_scene", "use_stamp_render_time", "use_stamp_memory"):
        setattr(r, name, False)


def script_warnings(bpy: Any) -> list[str]:
    """What running with Python auto-execution off changes in the open file: drivers
    whose expressions need Python (Blender evaluates those to 0 and says so only on
    its console) and registered text blocks that will not run."""
    drivers = []
    for collection in ("objects", "meshes", "materials", "scenes", "shape_keys", "node_groups",
                       "cameras", "lights", "worlds", "armatures", "curves"):  # fmt: skip
        for item in getattr(bpy.data, collection, []):
            anim = getattr(item, "animation_data", None)
            for fcurve in anim.drivers if anim is not None else []:
                d = fcurve.driver
                if d.type == "SCRIPTED" and not d.is_simple_expression:
                    drivers.append(f"{item.name}.{fcurve.data_path}: {d.expression}")
    warnings = []
    if drivers:
        more = len(drivers) - 5
        shown = "; ".join(drivers[:5]) + (f"; and {more} more" if more > 0 else "")
        warnings.append(
            f"{len(drivers)} driver(s) use Python expressions, which the farm does not run "
            f"(scripts are off for untrusted files): they evaluate to 0. {shown}"
        )
    scripts = [t.name for t in bpy.data.texts if getattr(t, "use_module", False)]
    if scripts:
        warnings.append(
            f"registered script(s) not run (scripts are off): {', '.join(scripts[:10])}"
        )
    return warnings


#: Path separators, parent references, Blender 5's path templates (``{scene_name}``
#: expands to a name the file chose) and what storage keys refuse (``check_path``), in
#: a name that becomes part of a path.
_UNSAFE = re.compile(r'[/\\{}:*?"<>|\x00-\x1f]|\.\.')


def safe_name(name: str, fallback: str) -> str:
    """``name`` as one path component that cannot leave its folder."""
    cleaned = _UNSAFE.sub("_", name).strip()
    return cleaned if cleaned not in ("", ".") else fallback


def confine_outputs(bpy: Any, folder: str, caches: str, originals: dict[str, str]) -> list[str]:
    """Point every place a render of the open file could write a file into the job's
    own folders, so that an untrusted .blend cannot write elsewhere on a worker.

    - Compositor File Output nodes (in any compositor node tree) write under ``folder``,
      each into a subfolder named after the node; their file and item names lose path
      separators, parent references and path templates.
    - Fluid simulation caches that lie outside the scene's own folder (a replay cache
      is written while frames render) move under ``caches``.

    The render's own output path is set by the actor for every task. ``originals``
    keeps the paths the file chose (the first call after the file is opened fills it;
    later calls redirect again, for another task's folder, and read it). Returns what
    was redirected, as messages for the job's warnings."""
    changed = []
    scene_dir = os.path.realpath(os.path.dirname(bpy.data.filepath))
    used: set[str] = set()
    for tree in bpy.data.node_groups:
        if tree.bl_idname != "CompositorNodeTree":
            continue
        for node in tree.nodes:
            if node.bl_idname != "CompositorNodeOutputFile":
                continue
            sub = safe_name(node.name, "File Output")
            if sub in used:
                sub = f"{safe_name(tree.name, 'tree')}.{sub}"
            used.add(sub)
            before = originals.setdefault(f"node:{tree.name}:{node.name}", node.directory)
            node.directory = os.path.join(folder, sub) + os.sep
            node.file_name = safe_name(node.file_name, "")
            for item in node.file_output_items:
                item.name = safe_name(item.name, "Image")
            changed.append(
                f"compositor File Output node {node.name!r} writes into the job's outputs "
                f"(files/<frame>/{sub}/), not {before!r}"
            )
    for obj in bpy.data.objects:
        for mod in obj.modifiers:
            if mod.type != "FLUID" or mod.fluid_type != "DOMAIN":
                continue
            domain = mod.domain_settings
            before = originals.setdefault(f"fluid:{obj.name}:{mod.name}", domain.cache_directory)
            where = os.path.realpath(bpy.path.abspath(before))
            if where == scene_dir or where.startswith(scene_dir + os.sep):
                continue
            target = os.path.join(caches, safe_name(obj.name, "fluid"))
            changed.append(
                f"fluid cache of {obj.name!r} is written under the job's scratch folder, "
                f"not {before!r} (outside the scene's folder)"
            )
            domain.cache_directory = target
    return changed
