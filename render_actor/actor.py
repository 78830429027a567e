"""The RenderActor: one long-lived Blender (bpy) per GPU, or per CPU slot.

It keeps the scene it has open (keyed by the file's content hash) so later
frames and tiles of the same job neither reload the file nor rebuild the BVH
(``render.use_persistent_data``). Scenes open with Python auto-execution off: a
.blend is untrusted input. A file bpy fails to open raises ``SceneOpenError``
— bpy keeps its previous scene after a failed open, and rendering that would
be a silent wrong answer.

Tiles render as cropped render borders with every pass of every view layer, as
float multi-layer EXR, with the compositor and the denoiser off (the denoiser's
input passes on); the assembler stitches them per pass, and ``finish`` then does
once, on the whole frame, what a full-frame render does after sampling:
denoising, the scene's compositor, colour management and dither (see
``rayfarm.render.composite``). Without denoising the result is bit-identical to
bpy's full-frame render; with it, within 1e-5.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np

from rayfarm.errors import RenderError, SceneOpenError
from rayfarm.render.blender import (
    assign,
    captured_output,
    collect_files,
    confine_outputs,
    missing_files,
    pixel_size,
    prepare_assembly,
    script_warnings,
    set_format,
    snapshot,
    tail,
    take,
)
from rayfarm.render.cache import BlobCache
from rayfarm.render.composite import denoise_tree, scene_tree
from rayfarm.render.devices import select
from rayfarm.render.exr import Part, oiio, read_parts, write_parts
from rayfarm.render.inputs import Inputs, materialize
from rayfarm.render.progress import SampleProgress
from rayfarm.render.tasks import FATAL, BatchResult, RenderTask, TaskResult, TileRect, portable
from rayfarm.render.tiles import border_fractions, split

__all__ = ["RenderActor", "SceneInspector"]

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
#: How much of Blender's output per render is kept.
LOG_TAIL_BYTES = 16 * 1024
#: Longer side of a frame's preview (thumbnail), in pixels.
PREVIEW_PIXELS = 512
#: Input folders an actor keeps on local disk for reopening without a fetch.
SCENE_CACHE_FILES = 8


class RenderActor:
    """Renders (frame, tile) tasks with bpy. Create it as a Ray actor:

    ``ray.remote(num_gpus=1)(RenderActor).remote()`` on a GPU node, or with
    ``num_cpus`` and ``threads`` on a CPU node.
    """

    def __init__(
        self, threads: int = 0, slot: int = 0, slots: int = 1, reporter: Any = None
    ) -> None:
        """``slot`` of ``slots`` CPU actors on this node: the actor pins itself to its
        share of the node's cores (``threads`` of them when given), so actors never fight
        over a core and Cycles runs one thread per pinned core. ``reporter`` (the
        dispatcher) receives Cycles' sample progress during renders.

        Pinning also matters alone: an unpinned Cycles process with fewer threads than
        the machine has cores and persistent data spins a core while idle (TBB; measured
        with bpy 5.0.1 on 2 cores: 1 thread unpinned burns a core, pinned it does not).

        A GPU actor (Ray assigned it a GPU) pins itself to its GPU's share of the node's
        cores instead, so the host threads of several GPU actors on one node do not
        oversubscribe its CPU.
        """
        slot, slots = _gpu_share() or (slot, slots)
        self.cores = _pin(slot, slots, threads)
        self.threads = threads or len(self.cores)
        import bpy  # here, not at import time: only render processes load Blender

        self.bpy = bpy
        bpy.context.preferences.filepaths.use_scripts_auto_execute = False
        self.workdir = tempfile.mkdtemp(prefix="rayfarm-actor-")
        self.log_path = os.path.join(self.workdir, "blender.log")
        self.last_log = ""
        self.progress = SampleProgress(bpy, reporter)
        self.warnings: tuple[str, ...] = ()  # about the open scene (scripts off, ...)
        self.cache = BlobCache()  # the node's copy of job inputs, shared by its actors
        self.scenes: OrderedDict[str, str] = OrderedDict()  # content hash -> .blend, LRU
        self.loaded: str | None = None
        self._defaults: dict[str, dict[str, Any]] = {}
        self._chosen: dict[str, str] = {}  # output paths the open file chose (confine_outputs)
        self.device = self._select_device()

    # -- info ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "device": self.device,
            "blender": self.bpy.app.version_string,
            "loaded": self.loaded,
            "cores": self.cores,
            "threads": self.threads,
        }

    def holds(self) -> str | None:
        return self.loaded

    def task_log(self) -> str:
        """Blender's output during the last task (its tail), kept for a failed one."""
        return self.last_log

    def inspect(self, task: RenderTask, inputs: Inputs) -> dict[str, Any]:
        """Open the task's scene (it stays open for the tasks that follow) and measure
        what the dispatcher needs to split its frames (``tiles="auto"``).

        Two tiles render in the middle of the frame, as tiles go (border, every pass,
        EXR out and in) at the job's samples: a 256th and a 64th of the frame. Their
        times, fixed cost plus pixels each, give the fixed cost every tile pays and the
        time per pixel, so the frame's render time. A scene this actor did not have
        open first renders a 16x16 tile at 1 sample, to pay the first sync and BVH
        build outside the measurement (the job's first task would pay it otherwise).
        """
        with self._captured():
            return self._inspect(task, inputs)

    def _inspect(self, task: RenderTask, inputs: Inputs) -> dict[str, Any]:
        held = self.loaded == task.scene_hash
        self._ensure_scene(task, inputs)
        scene = self._prepare(task)
        size = width, height = pixel_size(scene)
        samples = scene.cycles.samples
        if not held:
            assign(scene.cycles, "samples", 1)
            self._render_tile(
                scene, task, _centred(width, height, min(16, width), min(16, height)), size
            )
            assign(scene.cycles, "samples", samples)
        timed = []
        for share in (16, 8):
            rect = _centred(width, height, max(1, width // share), max(1, height // share))
            started = time.perf_counter()
            self._render_tile(scene, task, rect, size)
            timed.append((rect.width * rect.height, time.perf_counter() - started))
        (small, t_small), (large, t_large) = timed
        if large > small:
            per_pixel = max(0.0, (t_large - t_small) / (large - small))
            tile_cost = max(0.0, t_small - per_pixel * small)
        else:  # a frame too small to tell the two apart: too small to split anyway
            per_pixel, tile_cost = 0.0, t_large
        return {
            "scene": scene.name,
            "width": width,
            "height": height,
            "samples": samples,
            "tile_cost_s": tile_cost,
            "frame_s": per_pixel * width * height + tile_cost,
        }

    def catalogue(self, inputs: Inputs) -> dict[str, Any]:
        """What the farm keeps about an uploaded scene (opened with scripts off): the
        Blender that saved it, each scene's cameras, frame range, resolution, engine,
        samples, view layers and passes, and the folder's files (with hashes) and any
        the scene names that are not among them."""
        task = RenderTask(
            job_id="catalogue", scene_hash=inputs.digest, frame=1, tile=0, tiles=(1, 1),
            scene=None, camera=None, samples=None, resolution_percentage=None, format="png",
            color_depth=8, allow_missing=True,
        )  # fmt: skip
        self._ensure_scene(task, inputs)
        bpy = self.bpy
        return {
            "id": inputs.digest,
            "main": inputs.main,
            "saved_by": ".".join(map(str, bpy.data.version)),
            "active_scene": bpy.context.scene.name,
            "scenes": [_describe(scene) for scene in bpy.data.scenes],
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in inputs.files],
            "missing": missing_files(bpy),
        }

    # -- tasks -----------------------------------------------------------------------------

    def render(self, task: RenderTask, inputs: Inputs) -> tuple[TaskResult, Any]:
        """Render one task; call with ``num_returns=2``.

        Returns (result, payload): the payload is the finished image file's bytes for
        a whole frame, or the tile's passes (``{part name: Part}``, every pass of every
        view layer, float) so the dispatcher can hand them to the assembler.
        ``inputs`` is the job's input folder (laid out on this node once). Blender's
        output during the task comes back in the result's ``log``.
        """
        with self._captured(task):
            result, payload = self._render_task(task, inputs)
        warnings = self.warnings + result.warnings
        return replace(result, log=self.last_log, warnings=warnings), payload

    def render_batch(self, tasks: list[RenderTask], inputs: Inputs) -> BatchResult:
        """Render whole-frame ``tasks`` in order, as ``render`` would one by one, in one
        call: the dispatcher batches tasks it measured short, so Ray's per-call cost is
        paid once for the batch. The first task that fails ends the batch: its error
        and log come back with the finished tasks' results; the rest are not started.
        """
        batch = BatchResult()
        for task in tasks:
            try:
                batch.results.append(self.render(task, inputs))
            except Exception as exc:
                batch.error, batch.log = portable(exc), self.last_log
                break
        return batch

    def _render_task(self, task: RenderTask, inputs: Inputs) -> tuple[TaskResult, Any]:
        started = time.perf_counter()
        self._ensure_scene(task, inputs)
        scene = self._prepare(task)
        folder = os.path.join(self.workdir, "files", f"{task.job_id}_{task.frame}_{task.tile}")
        caches = os.path.join(self.workdir, "caches", task.job_id)
        confined = tuple(confine_outputs(self.bpy, folder, caches, self._chosen))
        if not task.is_tiled:
            path = self._write(scene, task.format, task.color_depth, self._path(task))
            preview = self._preview(scene, path, task)
            image = take(path)
            try:
                files = collect_files(folder)
            except ValueError as exc:
                raise RenderError(str(exc), {FATAL: True}) from None
            seconds = time.perf_counter() - started
            result = TaskResult(task.frame, 0, self.device, seconds, preview=preview,
                                warnings=confined, files=files)  # fmt: skip
            return result, image
        shutil.rmtree(folder, ignore_errors=True)  # tiles render without the compositor
        size = pixel_size(scene)
        try:
            rect = split(*size, *task.tiles)[task.tile]
        except ValueError as exc:
            raise RenderError(str(exc), {FATAL: True}) from None
        parts = self._render_tile(scene, task, rect, size)
        seconds = time.perf_counter() - started
        result = TaskResult(task.frame, task.tile, self.device, seconds, rect, size,
                            warnings=confined)  # fmt: skip
        return result, parts

    def finish(
        self, task: RenderTask, inputs: Inputs, parts: dict[str, Part]
    ) -> tuple[TaskResult, bytes]:
        """Finish an assembled frame and write it in the job's format; call with
        ``num_returns=2``.

        What a full-frame render does after sampling happens here, once, on the whole
        frame: denoising (when the scene or the spec asks for it), the scene's
        compositor, colour management and dither. ``exr`` writes every pass, as a
        full-frame multi-layer render does (denoised combined, ``Composite.Combined``
        first when the scene composites).
        """
        with self._captured():
            return self._finish(task, inputs, parts)

    def _finish(
        self, task: RenderTask, inputs: Inputs, parts: dict[str, Part]
    ) -> tuple[TaskResult, bytes]:
        started = time.perf_counter()
        self._ensure_scene(task, inputs)
        scene = self._prepare(task)
        parts = self._denoise(scene, task, dict(parts))
        composites = scene.render.use_compositing and scene.compositing_node_group is not None
        if task.format == "png":
            path = self._composite(scene, task, parts, "png", task.color_depth)
        else:
            out: dict[str, Part] = {}
            if composites:
                path = self._composite(scene, task, parts, "exr1", 32)
                try:
                    (rgba,) = read_parts(path).values()
                finally:
                    os.unlink(path)
                out[_COMPOSITE] = _renamed(rgba, _COMPOSITE)
            out.update(parts)
            path = self._path(task, ext="exr")
            write_parts(path, out, task.color_depth, _exr_attributes(scene, task))
        preview = self._preview(scene, path, task)
        image = take(path)
        seconds = time.perf_counter() - started
        return TaskResult(task.frame, -1, self.device, seconds, preview=preview), image

    # -- scene handling ----------------------------------------------------------------------

    def _ensure_scene(self, task: RenderTask, inputs: Inputs) -> None:
        """Open the task's input folder's main .blend, unless it is open already.

        The folder is laid out on local disk from storage (each blob fetched once),
        so the scene's relative paths resolve; a dependency the scene names but the
        folder lacks fails the task naming it, unless the job allows missing files.
        """
        digest = task.scene_hash
        # A file opened with its scripts is not the same open file as without them.
        opened = f"{digest}+scripts" if task.scripts else digest
        if self.loaded == opened:
            return
        folder = self.scenes.get(digest)
        if folder is not None:
            self.scenes.move_to_end(digest)
        else:
            folder = os.path.join(self.workdir, "inputs", digest)
            self.scenes[digest] = folder
            self._evict()
        path = materialize(inputs, folder, self.cache)
        self.loaded = None
        self._defaults.clear()
        self._chosen.clear()
        # Off unless an admin turned the job's scripts on (the dispatcher never gives this
        # process another job's task afterwards: what the scripts did stays with it).
        self.bpy.context.preferences.filepaths.use_scripts_auto_execute = task.scripts
        try:
            self.bpy.ops.wm.open_mainfile(filepath=path, load_ui=False, use_scripts=task.scripts)
        except RuntimeError as exc:
            message = str(exc).strip().removeprefix("Error: ").strip()
            raise SceneOpenError(
                f"Blender could not open the scene: {message}", {FATAL: True}
            ) from None
        if os.path.realpath(self.bpy.data.filepath) != os.path.realpath(path):
            raise SceneOpenError(
                "Blender could not open the scene (it kept another file open)", {FATAL: True}
            )
        missing = missing_files(self.bpy)
        scripts = (
            ["the file's Python runs for this job (scripts on: an admin's override)"]
            if task.scripts
            else script_warnings(self.bpy)
        )
        self.warnings = tuple(scripts) + (
            (f"rendering without {len(missing)} missing file(s) (allow_missing): "
             + ", ".join(missing[:20]),) if missing else ()
        )  # fmt: skip
        if missing and not task.allow_missing:
            shown = ", ".join(missing[:20]) + (
                f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            )
            raise RenderError(
                f"the scene uses files that were not uploaded with it: {shown} "
                "(pack them with the scene, or submit with allow_missing to render anyway)",
                {FATAL: True, "missing": missing},
            )
        self.loaded = opened

    def _evict(self) -> None:
        """Keep at most SCENE_CACHE_FILES input folders on local disk (least recently
        used go; their blobs stay in the node's cache, which has its own bound)."""
        while len(self.scenes) > SCENE_CACHE_FILES:
            _, folder = self.scenes.popitem(last=False)
            shutil.rmtree(folder, ignore_errors=True)

    def _prepare(self, task: RenderTask) -> Any:
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

    def _path(self, task: RenderTask, suffix: str = "", ext: str | None = None) -> str:
        ext = ext or task.format
        return os.path.join(self.workdir, f"{task.job_id}_{task.frame}_{task.tile}{suffix}.{ext}")

    def _write(self, scene: Any, fmt: str, depth: int, path: str) -> str:
        """Render ``scene`` and write it to ``path`` in ``fmt`` (see ``set_format``)."""
        set_format(scene.render.image_settings, fmt, depth)
        if fmt == "exr1":
            assign(scene.render.image_settings, "color_mode", "RGBA")
        scene.render.filepath = path
        self._render(scene)
        return path

    def _render_tile(
        self, scene: Any, task: RenderTask, rect: TileRect, size: tuple[int, int]
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
        path = self._write(scene, "exr", 32, self._path(task, ext="exr"))
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

    def _preview(self, scene: Any, path: str, task: RenderTask) -> bytes:
        """A PNG of the finished frame at ``path``, at most PREVIEW_PIXELS on its longer
        side: a PNG frame as it is, or scaled down (with OpenImageIO, outside Blender's
        data: adding and removing an image datablock makes the next render re-sync the
        whole scene); an EXR frame's first part (the composite, else the combined pass)
        through the scene's view transform, as Blender shows it."""
        if task.format == "png":
            return _scaled_png(path, self._path(task, "_preview", "png"))
        bpy = self.bpy
        first = next(iter(read_parts(path).values())).pixels
        h, w, nch = first.shape
        rgba = np.ones((h, w, 4), dtype=np.float32)
        rgba[..., : min(nch, 4)] = first[..., :4]
        image = bpy.data.images.new("rayfarm_preview", w, h, alpha=True, float_buffer=True)
        out = self._path(task, "_preview", "png")
        try:
            image.pixels.foreach_set(np.ascontiguousarray(rgba[::-1]).ravel())  # bottom-up
            scale = min(1.0, PREVIEW_PIXELS / max(w, h, 1))
            if scale < 1.0:
                image.scale(max(1, round(w * scale)), max(1, round(h * scale)))
            settings = scene.render.image_settings
            set_format(settings, "png", 8)
            assign(settings, "color_mode", "RGBA")
            image.save_render(out, scene=scene)
            return take(out)
        finally:
            bpy.data.images.remove(image)

    def _render(self, scene: Any) -> None:
        self.bpy.ops.render.render(write_still=True, scene=scene.name)

    @contextmanager
    def _captured(self, task: RenderTask | None = None) -> Iterator[None]:
        """Capture Blender's own output during a task into the task log (its tail is
        kept in ``last_log``, failed or not) instead of streaming it through Ray's log
        monitor, which cost CPU the render needed; with ``task``, report its samples."""
        if task is not None:
            self.progress.start(task)
        try:
            with captured_output(self.log_path):
                yield
        finally:
            self.progress.stop()
            self.last_log = tail(self.log_path, LOG_TAIL_BYTES)

    def _denoise(self, scene: Any, task: RenderTask, parts: dict[str, Part]) -> dict[str, Part]:
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
        self, scene: Any, task: RenderTask, parts: dict[str, Part], fmt: str, depth: int
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
    def _frame_image(self, task: RenderTask, parts: dict[str, Part]) -> Iterator[Any]:
        """The assembled frame as a multi-layer Blender image (written, loaded, removed)."""
        path = self._path(task, "_frame", "exr")
        write_parts(path, parts, 32, {"BlenderMultiChannel": "Blender V2.55.1 and newer"})
        image = self.bpy.data.images.load(path)
        try:
            yield image
        finally:
            self.bpy.data.images.remove(image)
            os.unlink(path)

    def _run_compositor(self, scene: Any, task: RenderTask, tree: Any, fmt: str, depth: int) -> str:
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
            return self._write(comp, fmt, depth, self._path(task, "_comp", fmt[:3]))
        finally:
            bpy.data.scenes.remove(comp)
            bpy.data.node_groups.remove(tree)

    # -- devices -----------------------------------------------------------------------------

    def _select_device(self) -> str:
        """OptiX, then CUDA, then HIP/oneAPI on the GPUs Ray assigned us, verified active
        (see ``rayfarm.render.devices``); else the CPU."""
        import ray

        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        prefs = self.bpy.context.preferences.addons["cycles"].preferences
        return select(prefs, gpu_ids).label

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "workdir", ""), ignore_errors=True)


def _gpu_share() -> tuple[int, int] | None:
    """(this actor's GPU's position, the node's GPU count) for an actor Ray assigned a
    GPU; None for a CPU actor."""
    import ray

    if not ray.is_initialized() or not ray.get_gpu_ids():
        return None
    node_id = ray.get_runtime_context().get_node_id()
    gpus = next(
        (int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["NodeID"] == node_id), 0
    )
    first = ray.get_gpu_ids()[0]
    position = int(first) if str(first).isdigit() else 0
    return (position % gpus, gpus) if gpus > 1 else None


def _pin(slot: int, slots: int, threads: int) -> list[int]:
    """Pin this process's main thread (and every thread it starts, Cycles' included)
    to slot ``slot``'s share of the cores this process may use, at most ``threads`` of
    them when ``threads`` is set; return the cores."""
    available = sorted(os.sched_getaffinity(0))
    slots = max(1, min(slots, len(available)))
    share = available[slot % slots :: slots]
    if 0 < threads < len(share):
        share = share[:threads]
    if share != available:
        os.sched_setaffinity(0, share)
    return share


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


def _exr_attributes(scene: Any, task: RenderTask) -> dict[str, str]:
    return {
        "BlenderMultiChannel": "Blender V2.55.1 and newer",
        "Scene": scene.name,
        "Camera": scene.camera.name,
        "Frame": str(task.frame),
    }


def _centred(width: int, height: int, w: int, h: int) -> TileRect:
    x0, y0 = (width - w) // 2, (height - h) // 2
    return TileRect(0, x0, x0 + w, y0, y0 + h)


class SceneInspector(RenderActor):
    """A RenderActor that only catalogues scenes (``catalogue``): one per farm, reserving
    no CPU, so an inspection never waits behind a render. A class of its own so that
    process lists and Ray's dashboard tell it from the render pool."""


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


def _scaled_png(path: str, out: str) -> bytes:
    """The PNG at ``path`` if it fits PREVIEW_PIXELS, else scaled down to fit."""
    io = oiio()
    buf = io.ImageBuf(path)
    spec = buf.spec()
    scale = PREVIEW_PIXELS / max(spec.width, spec.height, 1)
    if scale >= 1.0:
        with open(path, "rb") as f:
            return f.read()
    w, h = max(1, round(spec.width * scale)), max(1, round(spec.height * scale))
    small = io.ImageBufAlgo.resize(buf, roi=io.ROI(0, w, 0, h, 0, 1, 0, spec.nchannels))
    if not small.write(out):
        raise RenderError(f"cannot write a preview: {small.geterror()}")
    return take(out)
