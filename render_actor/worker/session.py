"""The worker's Blender session: the scene it has open, and every render step.

It keeps the scene it has open (keyed by the input folder's digest) so later frames
and tiles of the same job neither reload the file nor rebuild the BVH
(``render.use_persistent_data``). Scenes open with Python auto-execution off: a .blend
is untrusted input. A file bpy fails to open raises ``SceneOpenError`` — bpy keeps
its previous scene after a failed open, and rendering that would be a silent wrong
answer.

Tiles render as cropped render borders with every pass of every view layer, as float
multi-layer EXR, with the compositor and the denoiser off (the denoiser's input passes
on); the actor's assembler stitches them per pass, and ``finish`` then does once, on
the whole frame, what a full-frame render does after sampling: denoising, the scene's
compositor, colour management and dither (see ``composite``). Without denoising the
result is bit-identical to bpy's full-frame render; with it, within 1e-5.

Every path a step writes is given by the actor (its work folder); what is written
there — images, previews, a tile's passes as ``.npy`` — is how results travel. Each
answer says where its time went (``"steps"``: open, render, write, ...; see
``stopwatch``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .blender import (
    assign,
    confine_outputs,
    missing_files,
    pixel_size,
    prepare_assembly,
    script_warnings,
    set_format,
    snapshot,
)
from .composite import denoise_tree, scene_tree
from .errors import FATAL, RenderError, SceneOpenError
from .exr import oiio, read_parts, write_parts
from .geometry import TileRect, border_fractions, split
from .parts import Part, load_parts, save_parts
from .slicing import set_slice
from .stopwatch import Stopwatch

__all__ = ["Session", "Task"]

_COMP_SCENE = "rayfarm_assemble"
#: The part a multi-layer render writes the compositor's result to.
_COMPOSITE = "Composite.Combined"
_BORDER = ("border_min_x", "border_max_x", "border_min_y", "border_max_y")
#: Render settings every task starts from (a tile task turns the border on).
_RENDER_FLAGS = {
    "use_border": False,
    "use_crop_to_border": False,
    "use_file_extension": False,
    "use_overwrite": True,
    "use_placeholder": False,
}
#: Longer side of a frame's preview (thumbnail), in pixels.
PREVIEW_PIXELS = 512


@dataclass(frozen=True)
class Task:
    """The part of the actor's ``RenderTask`` a render step needs."""

    job_id: str
    frame: int
    tile: int
    tiles: tuple[int, int]
    scene: str | None
    camera: str | None
    samples: int | None
    resolution_percentage: int | None
    format: str
    color_depth: int
    denoise: bool | None = None
    slice: int = 0  # which of the frame's ``slices`` sample subsets this task renders
    slices: int = 1

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> Task:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["tiles"] = tuple(values["tiles"])
        return cls(**values)

    @property
    def stem(self) -> str:
        return f"{self.job_id}_{self.frame}_{self.tile}_{self.slice}"


class Session:
    """One Blender (bpy) and the scene it has open."""

    def __init__(self, bpy: Any, threads: int, device: str, workdir: str) -> None:
        self.bpy = bpy
        self.threads = threads
        self.device = device  # the label of what Cycles renders on ("CPU", "GPU (OPTIX: ...)")
        self.workdir = workdir
        self.loaded: str | None = None  # the open scene's key (its folder's digest)
        self.warnings: tuple[str, ...] = ()  # about the open scene (scripts off, ...)
        self._defaults: dict[str, dict[str, Any]] = {}
        self._chosen: dict[str, str] = {}  # output paths the open file chose (confine_outputs)

    # -- requests ----------------------------------------------------------------------------

    def render(
        self, task: Task, scene: dict[str, Any], out: str, preview: str, folder: str, caches: str
    ) -> dict[str, Any]:
        """Render a whole frame to ``out`` in the task's format, its PNG preview to
        ``preview``; File Output nodes write under ``folder``, fluid caches under
        ``caches``."""
        clock = Stopwatch()
        self.open(scene)
        clock.lap("open_s")
        bscene = self._prepare(task)
        confined = confine_outputs(self.bpy, folder, caches, self._chosen)
        self._write(bscene, task.format, task.color_depth, out)  # Blender writes it too
        clock.lap("render_s")
        self._preview(bscene, out, task, preview)
        clock.lap("write_s")
        return {"warnings": [*self.warnings, *confined], "steps": clock.rounded()}

    def tile(
        self, task: Task, scene: dict[str, Any], parts_dir: str, folder: str, caches: str
    ) -> dict[str, Any]:
        """Render one part of a frame: a tile of the task's grid, and of a sliced frame
        only the task's subset of its samples (``_slice``); its passes go to
        ``parts_dir``. ``samples`` says which: [offset, length, total] (None: all);
        see ``slicing`` for what a slice changes."""
        clock = Stopwatch()
        self.open(scene)
        clock.lap("open_s")
        bscene = self._prepare(task)
        confined = confine_outputs(self.bpy, folder, caches, self._chosen)
        shutil.rmtree(folder, ignore_errors=True)  # tiles render without the compositor
        size = pixel_size(bscene)
        try:
            rect = split(*size, *task.tiles)[task.tile]
        except ValueError as exc:
            raise RenderError(str(exc), {FATAL: True}) from None
        sliced = set_slice(bscene, task.slice, task.slices, self.bpy.app.version)
        parts = self._render_tile(bscene, task, rect, size)
        if sliced is not None:
            parts = sliced.mark(parts)
        clock.lap("render_s")
        listing = save_parts(parts, parts_dir)
        clock.lap("write_s")
        return {
            "size": list(size),
            "rect": [rect.index, rect.x0, rect.x1, rect.y0, rect.y1],
            "samples": None if sliced is None else list(sliced.samples),
            "parts": listing,
            "warnings": [*self.warnings, *confined, *(sliced.notes if sliced else ())],
            "steps": clock.rounded(),
        }

    def preview(
        self,
        task: Task,
        scene: dict[str, Any],
        parts_dir: str,
        listing: list[dict[str, Any]],
        out: str,
    ) -> dict[str, Any]:
        """Write to ``out`` the PNG preview of a frame still being sampled: the first part
        in ``parts_dir`` (the merge so far of its combined pass) through the scene's
        view transform, as an EXR frame's preview is made. No denoiser, no compositor:
        those run once, on the finished frame."""
        clock = Stopwatch()
        self.open(scene)
        bscene = self._prepare(task)
        parts = load_parts(parts_dir, listing, copy=False)
        self._preview_pixels(bscene, next(iter(parts.values())).pixels, out)
        clock.lap("preview_s")
        return {"steps": clock.rounded()}

    def finish(
        self,
        task: Task,
        scene: dict[str, Any],
        parts_dir: str,
        listing: list[dict[str, Any]],
        out: str,
        preview: str,
    ) -> dict[str, Any]:
        """Finish an assembled frame (its passes in ``parts_dir``) and write it to ``out``
        in the job's format, its preview to ``preview``.

        What a full-frame render does after sampling happens here, once, on the whole
        frame: denoising (when the scene or the spec asks for it), the scene's
        compositor, colour management and dither. ``exr`` writes every pass, as a
        full-frame multi-layer render does (denoised combined, ``Composite.Combined``
        first when the scene composites).

        It runs with the threads its worker was given: the actor finishes frames in a
        worker that may use every core of the node (``RenderActor.finish``).
        """
        clock = Stopwatch()
        self.open(scene)
        clock.lap("open_s")
        bscene = self._prepare(task)
        parts = self._denoise(bscene, task, load_parts(parts_dir, listing, copy=False))
        clock.lap("denoise_s")
        composites = bscene.render.use_compositing and bscene.compositing_node_group is not None
        if task.format == "png":
            path = self._composite(bscene, task, parts, "png", task.color_depth)
            os.replace(path, out)
            clock.lap("composite_s")
        else:
            written: dict[str, Part] = {}
            if composites:
                path = self._composite(bscene, task, parts, "exr1", 32)
                try:
                    (rgba,) = read_parts(path).values()
                finally:
                    os.unlink(path)
                written[_COMPOSITE] = _renamed(rgba, _COMPOSITE)
            clock.lap("composite_s")
            written.update(parts)
            write_parts(out, written, task.color_depth, _exr_attributes(bscene, task))
        self._preview(bscene, out, task, preview)
        clock.lap("write_s")
        return {"steps": clock.rounded()}

    def probe(self, task: Task, scene: dict[str, Any]) -> dict[str, Any]:
        """Open the task's scene (it stays open for the tasks that follow) and measure
        what the dispatcher needs to split its frames (``tiles="auto"``).

        Two tiles render in the middle of the frame, as tiles go (border, every pass,
        EXR out and in) at the job's samples: a 256th and a 64th of the frame. Their
        times, fixed cost plus pixels each, give the fixed cost every tile pays and the
        time per pixel, so the frame's render time. A scene this worker did not have
        open first renders a 16x16 tile at 1 sample, to pay the first sync and BVH
        build outside the measurement (the job's first task would pay it otherwise).
        """
        held = self.loaded == scene["key"]
        self.open(scene)
        bscene = self._prepare(task)
        size = width, height = pixel_size(bscene)
        samples = bscene.cycles.samples
        if not held:
            assign(bscene.cycles, "samples", 1)
            self._render_tile(
                bscene, task, _centred(width, height, min(16, width), min(16, height)), size
            )
            assign(bscene.cycles, "samples", samples)
        timed = []
        for share in (16, 8):
            rect = _centred(width, height, max(1, width // share), max(1, height // share))
            started = time.perf_counter()
            self._render_tile(bscene, task, rect, size)
            timed.append((rect.width * rect.height, time.perf_counter() - started))
        (small, t_small), (large, t_large) = timed
        if large > small:
            per_pixel = max(0.0, (t_large - t_small) / (large - small))
            tile_cost = max(0.0, t_small - per_pixel * small)
        else:  # a frame too small to tell the two apart: too small to split anyway
            per_pixel, tile_cost = 0.0, t_large
        return {
            "scene": bscene.name,
            "width": width,
            "height": height,
            "samples": samples,
            "tile_cost_s": tile_cost,
            "frame_s": per_pixel * width * height + tile_cost,
        }

    def catalogue(self, scene: dict[str, Any]) -> dict[str, Any]:
        """What the farm keeps about an uploaded scene (opened with scripts off): the
        Blender that saved it, each scene's cameras, frame range, resolution, engine,
        samples, view layers and passes, and the files the scene names that are
        missing."""
        self.open({**scene, "scripts": False, "allow_missing": True})
        bpy = self.bpy
        return {
            "saved_by": ".".join(map(str, bpy.data.version)),
            "active_scene": bpy.context.scene.name,
            "scenes": [_describe(s) for s in bpy.data.scenes],
            "missing": missing_files(bpy),
        }

    # -- scene handling ----------------------------------------------------------------------

    def open(self, scene: dict[str, Any]) -> None:
        """Open ``scene["path"]`` (the main .blend of an input folder the actor laid out),
        unless the scene with its ``key`` is open already.

        A dependency the scene names but the folder lacks fails the task naming it,
        unless ``allow_missing``. ``scripts`` (an admin's override) runs the file's
        Python; the actor never gives this process another job's task afterwards.
        """
        scripts = bool(scene.get("scripts"))
        # A file opened with its scripts is not the same open file as without them.
        key = f"{scene['key']}+scripts" if scripts else scene["key"]
        if self.loaded == key:
            return
        bpy, path = self.bpy, scene["path"]
        self.loaded = None
        self._defaults.clear()
        self._chosen.clear()
        bpy.context.preferences.filepaths.use_scripts_auto_execute = scripts
        try:
            bpy.ops.wm.open_mainfile(filepath=path, load_ui=False, use_scripts=scripts)
        except RuntimeError as exc:
            message = str(exc).strip().removeprefix("Error: ").strip()
            raise SceneOpenError(
                f"Blender could not open the scene: {message}", {FATAL: True}
            ) from None
        if os.path.realpath(bpy.data.filepath) != os.path.realpath(path):
            raise SceneOpenError(
                "Blender could not open the scene (it kept another file open)", {FATAL: True}
            )
        missing = missing_files(bpy)
        notes = (
            ["the file's Python runs for this job (scripts on: an admin's override)"]
            if scripts
            else script_warnings(bpy)
        )
        self.warnings = tuple(notes) + (
            (f"rendering without {len(missing)} missing file(s) (allow_missing): "
             + ", ".join(missing[:20]),) if missing else ()
        )  # fmt: skip
        if missing and not scene.get("allow_missing"):
            shown = ", ".join(missing[:20]) + (
                f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            )
            raise RenderError(
                f"the scene uses files that were not uploaded with it: {shown} "
                "(pack them with the scene, or submit with allow_missing to render anyway)",
                {FATAL: True, "missing": missing},
            )
        self.loaded = key

    def _prepare(self, task: Task) -> Any:
        """Select the task's scene and set every setting a task may change, from the
        scene's own values (``snapshot``) plus the task's overrides."""
        bpy = self.bpy
        if task.scene:
            scene = bpy.data.scenes.get(task.scene)
            if scene is None:
                names = ", ".join(s.name for s in bpy.data.scenes)
                raise RenderError(
                    f"the file has no scene {task.scene!r} (it has: {names})", {FATAL: True}
                )
        else:
            scene = bpy.context.scene
        if scene.render.engine != "CYCLES":
            raise RenderError(
                f"scene {scene.name!r} uses the {scene.render.engine} engine; the farm's "
                "headless workers render Cycles only (EEVEE and Workbench need a display)",
                {FATAL: True},
            )
        defaults = self._defaults.setdefault(scene.name, snapshot(scene))
        if task.camera:
            cam = bpy.data.objects.get(task.camera)
            if cam is None or cam.type != "CAMERA":
                cams = ", ".join(o.name for o in bpy.data.objects if o.type == "CAMERA")
                raise RenderError(
                    f"the file has no camera {task.camera!r} (cameras: {cams or 'none'})",
                    {FATAL: True},
                )
            assign(scene, "camera", cam)
        else:
            assign(scene, "camera", defaults["camera"])
        if scene.camera is None:
            raise RenderError(f"scene {scene.name!r} has no camera", {FATAL: True})
        r = scene.render
        assign(scene.cycles, "samples", task.samples or defaults["samples"])
        assign(
            r, "resolution_percentage",
            task.resolution_percentage or defaults["resolution_percentage"],
        )  # fmt: skip
        denoise = defaults["use_denoising"] if task.denoise is None else task.denoise
        assign(scene.cycles, "use_denoising", denoise)
        assign(r, "use_compositing", defaults["use_compositing"])
        for layer in scene.view_layers:
            store = defaults["store_passes"].get(layer.name, False)
            assign(layer.cycles, "denoising_store_passes", store)
            for name, value in defaults["colour_passes"].get(layer.name, {}).items():
                assign(layer, name, value)
        for name, value in defaults["sampling"].items():
            assign(scene.cycles, name, value)
        assign(scene.cycles, "device", "GPU" if self.device.startswith("GPU") else "CPU")
        assign(r, "use_persistent_data", True)
        assign(r, "threads_mode", "FIXED")
        assign(r, "threads", self.threads)
        for name, value in _RENDER_FLAGS.items():
            assign(r, name, value)
        # Like Blender's own `-f N`: the render evaluates the frame; frame_set() would also
        # evaluate the viewport depsgraph first, work no render needs.
        assign(scene, "frame_current", task.frame)
        return scene

    # -- output ------------------------------------------------------------------------------

    def _scratch(self, task: Task, suffix: str, ext: str) -> str:
        return os.path.join(self.workdir, f"{task.stem}{suffix}.{ext}")

    def _write(self, scene: Any, fmt: str, depth: int, path: str, scratch: bool = False) -> str:
        """Render ``scene`` and write it to ``path`` in ``fmt`` (see ``set_format``);
        ``scratch``: a file read back at once, so an EXR is not compressed."""
        set_format(scene.render.image_settings, fmt, depth, "NONE" if scratch else "ZIP")
        if fmt == "exr1":
            assign(scene.render.image_settings, "color_mode", "RGBA")
        scene.render.filepath = path
        self.bpy.ops.render.render(write_still=True, scene=scene.name)
        return path

    def _render_tile(
        self, scene: Any, task: Task, rect: TileRect, size: tuple[int, int]
    ) -> dict[str, Part]:
        """Render one tile with every pass, as floats: the compositor and the denoiser
        off (they run once on the assembled frame), the denoiser's input passes on."""
        r = scene.render
        for layer in _denoised_layers(scene):
            assign(layer.cycles, "denoising_store_passes", True)
        assign(scene.cycles, "use_denoising", False)
        assign(r, "use_compositing", False)
        assign(r, "use_border", True)
        assign(r, "use_crop_to_border", True)
        for name, value in zip(_BORDER, border_fractions(rect, *size), strict=True):
            assign(r, name, value)
        path = self._write(scene, "exr", 32, self._scratch(task, "_tile", "exr"), True)
        try:
            parts = read_parts(path)
        finally:
            os.unlink(path)
        for name, part in parts.items():
            if part.pixels.shape[:2] != (rect.height, rect.width):
                raise RenderError(
                    f"tile {rect.index} pass {name!r} rendered {part.pixels.shape[1]}x"
                    f"{part.pixels.shape[0]} pixels, expected {rect.width}x{rect.height}"
                )
        return parts

    def _preview(self, scene: Any, path: str, task: Task, out: str) -> None:
        """Write to ``out`` a PNG of the finished frame at ``path``, at most
        PREVIEW_PIXELS on its longer side: a PNG frame as it is, or scaled down (with
        OpenImageIO, outside Blender's data: adding and removing an image datablock makes
        the next render re-sync the whole scene); an EXR frame's first part (the
        composite, else the combined pass) through the scene's view transform, as
        Blender shows it."""
        if task.format == "png":
            _scaled_png(path, out)
            return
        self._preview_pixels(scene, next(iter(read_parts(path).values())).pixels, out)

    def _preview_pixels(self, scene: Any, first: np.ndarray, out: str) -> None:
        """Write to ``out`` a PNG of float pixels ``first`` (rows top first) through the
        scene's view transform, at most PREVIEW_PIXELS on its longer side."""
        bpy = self.bpy
        h, w, nch = first.shape
        rgba = np.ones((h, w, 4), dtype=np.float32)
        rgba[..., : min(nch, 4)] = first[..., :4]
        image = bpy.data.images.new("rayfarm_preview", w, h, alpha=True, float_buffer=True)
        try:
            image.pixels.foreach_set(np.ascontiguousarray(rgba[::-1]).ravel())  # bottom-up
            scale = min(1.0, PREVIEW_PIXELS / max(w, h, 1))
            if scale < 1.0:
                image.scale(max(1, round(w * scale)), max(1, round(h * scale)))
            settings = scene.render.image_settings
            set_format(settings, "png", 8)
            assign(settings, "color_mode", "RGBA")
            image.save_render(out, scene=scene)
        finally:
            bpy.data.images.remove(image)

    def _denoise(self, scene: Any, task: Task, parts: dict[str, Part]) -> dict[str, Part]:
        """Denoise each view layer's assembled combined pass that Cycles would have
        denoised, and leave the passes as a full-frame render has them: a denoised layer
        gets its "Noisy Image", and keeps the denoiser's input passes only where the
        scene stores them."""
        layers = [layer.name for layer in _denoised_layers(scene)]
        if not layers:
            return parts
        stored = self._defaults[scene.name]["store_passes"]
        with self._frame_image(task, parts) as image:
            for layer in layers:
                tree = denoise_tree(self.bpy, scene, image, layer, _COMP_SCENE)
                path = self._run_compositor(scene, task, tree, "exr1", 32)
                try:
                    (denoised,) = read_parts(path).values()
                finally:
                    os.unlink(path)
                combined = f"{layer}.Combined"
                noisy = parts[combined]
                parts[combined] = _renamed(denoised, combined)
                parts = _with_noisy(parts, layer, noisy)
                if not stored.get(layer):
                    for name in [n for n in parts if n.startswith(f"{layer}.Denoising ")]:
                        del parts[name]
        return parts

    def _composite(
        self, scene: Any, task: Task, parts: dict[str, Part], fmt: str, depth: int
    ) -> str:
        """Run the scene's compositor (or a plain pass-through) on the assembled frame
        and write the result in ``fmt``; return the file's path."""
        default_layer = next(
            (v.name for v in scene.view_layers if v.use), scene.view_layers[0].name
        )
        with self._frame_image(task, parts) as image:
            tree = scene_tree(self.bpy, scene, image, default_layer, _COMP_SCENE)
            return self._run_compositor(scene, task, tree, fmt, depth)

    @contextmanager
    def _frame_image(self, task: Task, parts: dict[str, Part]) -> Iterator[Any]:
        """The assembled frame as a multi-layer Blender image (written, loaded, removed).
        Uncompressed: Blender reads it back at once, and ZIP costs ten times the write
        (four float passes of a 960x540 frame: 0.05 s against 0.5-0.8 s, noisy pixels)."""
        path = self._scratch(task, "_frame", "exr")
        write_parts(path, parts, 32, {"BlenderMultiChannel": "Blender V2.55.1 and newer"}, "none")
        image = self.bpy.data.images.load(path)
        try:
            yield image
        finally:
            self.bpy.data.images.remove(image)
            os.unlink(path)

    def _run_compositor(self, scene: Any, task: Task, tree: Any, fmt: str, depth: int) -> str:
        """Write ``tree``'s output through a compositor-only copy of ``scene``.

        A scene whose compositor has no Render Layers node is not rendered, only
        composited, and its result is written by the same code (view transform, look,
        curves, dither) as a normal render. A copy, not a new scene, so that every
        colour setting is the source's without listing them. Consumes ``tree``.
        """
        bpy = self.bpy
        width, height = pixel_size(scene)
        comp = scene.copy()  # objects are linked, not copied: cheap
        comp.name = _COMP_SCENE
        try:
            prepare_assembly(comp, width, height)
            comp.compositing_node_group = tree
            comp.render.use_compositing = True
            scratch = fmt != "png"  # an EXR here is read back; a PNG is the frame itself
            return self._write(comp, fmt, depth, self._scratch(task, "_comp", fmt[:3]), scratch)
        finally:
            bpy.data.scenes.remove(comp)
            bpy.data.node_groups.remove(tree)


def on_stats(bpy: Any, report: Callable[[str], None]) -> None:
    """Hand every Cycles status line ("... | Sample 12/64") to ``report`` (the actor
    turns them into progress events and signs of life for the hang watch)."""

    # Persistent: opening a .blend clears every handler not marked so.
    @bpy.app.handlers.persistent
    def handler(stats: Any, *_: Any) -> None:
        report(str(stats))

    bpy.app.handlers.render_stats.append(handler)


def _denoised_layers(scene: Any) -> list[Any]:
    """The view layers Cycles denoises when it renders ``scene`` as it is set now."""
    if not scene.cycles.use_denoising:
        return []
    return [v for v in scene.view_layers if v.use and v.cycles.use_denoising]


def _renamed(part: Part, name: str) -> Part:
    """``part`` with its channels named for part ``name`` (``name.R``, ``name.G``, ...)."""
    return Part(tuple(f"{name}.{c.rsplit('.', 1)[-1]}" for c in part.channels), part.pixels)


def _with_noisy(parts: dict[str, Part], layer: str, noisy: Part) -> dict[str, Part]:
    """Add ``layer``'s noisy image where Blender puts it: before its denoising data."""
    name = f"{layer}.Noisy Image"
    out: dict[str, Part] = {}
    for key, part in parts.items():
        if name not in out and key.startswith(f"{layer}.Denoising "):
            out[name] = _renamed(noisy, name)
        out[key] = part
    out.setdefault(name, _renamed(noisy, name))
    return out


def _exr_attributes(scene: Any, task: Task) -> dict[str, str]:
    return {
        "BlenderMultiChannel": "Blender V2.55.1 and newer",
        "Scene": scene.name,
        "Camera": scene.camera.name,
        "Frame": str(task.frame),
    }


def _centred(width: int, height: int, w: int, h: int) -> TileRect:
    x0, y0 = (width - w) // 2, (height - h) // 2
    return TileRect(0, x0, x0 + w, y0, y0 + h)


def _describe(scene: Any) -> dict[str, Any]:
    r = scene.render
    cycles = scene.cycles if r.engine == "CYCLES" else None
    return {
        "name": scene.name,
        "camera": scene.camera.name if scene.camera else None,
        "cameras": sorted(o.name for o in scene.objects if o.type == "CAMERA"),
        "frame_start": scene.frame_start,
        "frame_end": scene.frame_end,
        "frame_step": scene.frame_step,
        "fps": r.fps / r.fps_base,
        "resolution": [r.resolution_x, r.resolution_y, r.resolution_percentage],
        "engine": r.engine,
        "samples": cycles.samples if cycles else None,
        "denoise": bool(cycles and cycles.use_denoising),
        "compositing": bool(r.use_compositing and scene.compositing_node_group),
        "view_layers": [
            {
                "name": layer.name,
                "use": layer.use,
                "passes": sorted(
                    name.removeprefix("use_pass_")
                    for holder in (layer, getattr(layer, "cycles", None))
                    if holder is not None
                    for name in dir(holder)
                    if name.startswith("use_pass_") and getattr(holder, name) is True
                ),
            }
            for layer in scene.view_layers
        ],
    }


def _scaled_png(path: str, out: str) -> None:
    """Write to ``out`` the PNG at ``path`` if it fits PREVIEW_PIXELS, else scaled down to
    fit."""
    io = oiio()
    buf = io.ImageBuf(path)
    spec = buf.spec()
    scale = PREVIEW_PIXELS / max(spec.width, spec.height, 1)
    if scale >= 1.0:
        shutil.copyfile(path, out)
        return
    w, h = max(1, round(spec.width * scale)), max(1, round(spec.height * scale))
    small = io.ImageBufAlgo.resize(buf, roi=io.ROI(0, w, 0, h, 0, 1, 0, spec.nchannels))
    if not small.write(out):
        raise RenderError(f"cannot write a preview: {small.geterror()}")
