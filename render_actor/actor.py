"""The RenderActor: one long-lived Blender (bpy) per GPU, or per CPU slot.

It keeps the scene it has open (keyed by the file's content hash) so later
frames and tiles of the same job neither reload the file nor rebuild the BVH
(``render.use_persistent_data``). Scenes open with Python auto-execution off: a
.blend is untrusted input. A file bpy fails to open raises ``SceneOpenError``
— bpy keeps its previous scene after a failed open, and rendering that would
be a silent wrong answer.

Tiles render as cropped render borders to 32-bit float EXR and come back as
float arrays; ``assemble`` stitches them and converts the frame to its output
format once, through a linked copy of the source scene whose compositor only
passes the stitched image on, so the result goes through exactly the same colour
management and dither as a full-frame render (bit-identical with denoising off).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from rayfarm.errors import RenderError, SceneOpenError
from rayfarm.render.blender import (
    assign,
    captured_output,
    pixel_size,
    prepare_assembly,
    set_format,
    snapshot,
    tail,
    take,
)
from rayfarm.render.tasks import FATAL, RenderTask, TaskResult, TileRect
from rayfarm.render.tiles import border_fractions, split

__all__ = ["RenderActor"]

_GPU_BACKENDS = ("OPTIX", "CUDA", "HIP", "ONEAPI")
_COMP_SCENE = "rayfarm_assemble"
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
#: Scenes an actor keeps on local disk for reopening without a fetch.
SCENE_CACHE_FILES = 8


class RenderActor:
    """Renders (frame, tile) tasks with bpy. Create it as a Ray actor:

    ``ray.remote(num_gpus=1)(RenderActor).remote()`` on a GPU node, or with
    ``num_cpus`` and ``threads`` on a CPU node.
    """

    def __init__(self, threads: int = 0, slot: int = 0, slots: int = 1) -> None:
        """``slot`` of ``slots`` CPU actors on this node: the actor pins itself to its
        share of the node's cores (``threads`` of them when given), so actors never fight
        over a core and Cycles runs one thread per pinned core.

        Pinning also matters alone: an unpinned Cycles process with fewer threads than
        the machine has cores and persistent data spins a core while idle (TBB; measured
        with bpy 5.0.1 on 2 cores: 1 thread unpinned burns a core, pinned it does not).
        """
        self.cores = _pin(slot, slots, threads)
        self.threads = threads or len(self.cores)
        import bpy  # here, not at import time: only render processes load Blender

        self.bpy = bpy
        bpy.context.preferences.filepaths.use_scripts_auto_execute = False
        self.workdir = tempfile.mkdtemp(prefix="rayfarm-actor-")
        self.log_path = os.path.join(self.workdir, "blender.log")
        self.last_log = ""
        self.scenes: OrderedDict[str, str] = OrderedDict()  # content hash -> .blend, LRU
        self.loaded: str | None = None
        self._defaults: dict[str, dict[str, Any]] = {}
        self.device = self._select_device()

    # -- info ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "device": self.device,
            "blender": self.bpy.app.version_string,
            "loaded": self.loaded,
            "cores": self.cores,
            "threads": self.threads,
        }

    def holds(self) -> str | None:
        return self.loaded

    # -- tasks -----------------------------------------------------------------------------

    def render(self, task: RenderTask, scene_data: list[Any]) -> tuple[TaskResult, Any]:
        """Render one task; call with ``num_returns=2``.

        Returns (result, payload): the payload is the finished image file's bytes for
        a whole frame, or the tile's float pixels (h, w, 4), so the dispatcher can
        leave tiles in the object store. ``scene_data`` is ``[ObjectRef]`` to the
        .blend bytes, fetched only when this actor does not hold that scene already.
        """
        started = time.perf_counter()
        self._ensure_scene(task.scene_hash, scene_data)
        scene = self._prepare(task)
        if not task.is_tiled:
            image = self._write_still(scene, task, self._out_path(task, task.format))
            return TaskResult(task.frame, 0, self.device, time.perf_counter() - started), image
        width, height = pixel_size(scene)
        try:
            rect = split(width, height, *task.tiles)[task.tile]
        except ValueError as exc:
            raise RenderError(str(exc), {FATAL: True}) from None
        pixels = self._render_tile(scene, task, rect, width, height)
        result = TaskResult(task.frame, task.tile, self.device, time.perf_counter() - started, rect)
        return result, pixels

    def assemble(
        self, task: RenderTask, scene_data: list[Any], rects: list[TileRect], *tiles: np.ndarray
    ) -> tuple[TaskResult, bytes]:
        """Stitch a frame's tiles and write it in the job's format; call with ``num_returns=2``."""
        started = time.perf_counter()
        self._ensure_scene(task.scene_hash, scene_data)
        scene = self._prepare(task)
        width, height = pixel_size(scene)
        frame = np.zeros((height, width, 4), dtype=np.float32)
        for r, pixels in zip(rects, tiles, strict=True):
            frame[r.y0 : r.y1, r.x0 : r.x1] = pixels
        image = self._convert(scene, task, frame)
        return TaskResult(task.frame, -1, self.device, time.perf_counter() - started), image

    # -- scene handling ----------------------------------------------------------------------

    def _ensure_scene(self, digest: str, scene_data: list[Any]) -> None:
        if self.loaded == digest:
            return
        path = self.scenes.get(digest)
        if path is not None:
            self.scenes.move_to_end(digest)
        else:
            import ray

            data = ray.get(scene_data[0])
            path = os.path.join(self.workdir, f"{digest}.blend")
            with open(path + ".part", "wb") as f:
                f.write(data)
            os.replace(path + ".part", path)
            self.scenes[digest] = path
            self._evict()
        self.loaded = None
        self._defaults.clear()
        try:
            self.bpy.ops.wm.open_mainfile(filepath=path, load_ui=False, use_scripts=False)
        except RuntimeError as exc:
            message = str(exc).strip().removeprefix("Error: ").strip()
            raise SceneOpenError(
                f"Blender could not open the scene: {message}", {FATAL: True}
            ) from None
        if os.path.realpath(self.bpy.data.filepath) != os.path.realpath(path):
            raise SceneOpenError(
                "Blender could not open the scene (it kept another file open)", {FATAL: True}
            )
        self.loaded = digest

    def _evict(self) -> None:
        """Keep at most SCENE_CACHE_FILES scenes on local disk (least recently used go)."""
        while len(self.scenes) > SCENE_CACHE_FILES:
            _, path = self.scenes.popitem(last=False)
            if os.path.exists(path):
                os.unlink(path)

    def _prepare(self, task: RenderTask) -> Any:
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

    def _out_path(self, task: RenderTask, ext: str) -> str:
        return os.path.join(self.workdir, f"{task.job_id}_{task.frame}_{task.tile}.{ext}")

    def _write_still(self, scene: Any, task: RenderTask, path: str) -> bytes:
        set_format(scene.render.image_settings, task.format, task.color_depth)
        scene.render.filepath = path
        self._render(scene)
        return take(path)

    def _render_tile(
        self, scene: Any, task: RenderTask, rect: TileRect, width: int, height: int
    ) -> np.ndarray:
        r = scene.render
        assign(r, "use_border", True)
        assign(r, "use_crop_to_border", True)
        borders = border_fractions(rect, width, height)
        for name, value in zip(_BORDER, borders, strict=True):
            assign(r, name, value)
        path = self._out_path(task, "exr")
        set_format(r.image_settings, "exr", 32)
        r.filepath = path
        self._render(scene)
        try:
            pixels = self._read_exr(path)
        finally:
            os.unlink(path)
        if pixels.shape[:2] != (rect.height, rect.width):
            raise RenderError(
                f"tile {rect.index} rendered {pixels.shape[1]}x{pixels.shape[0]} pixels, "
                f"expected {rect.width}x{rect.height}"
            )
        return pixels

    def _render(self, scene: Any) -> None:
        """Render and write ``scene``, with Blender's own output captured to this actor's
        task log (the tail is kept in ``last_log``) instead of streaming through Ray's
        log monitor: Cycles prints a line per sample batch, and forwarding that cost CPU
        the render needed."""
        with captured_output(self.log_path):
            self.bpy.ops.render.render(write_still=True, scene=scene.name)
        self.last_log = tail(self.log_path, LOG_TAIL_BYTES)

    def _read_exr(self, path: str) -> np.ndarray:
        img = self.bpy.data.images.load(path)
        try:
            w, h = img.size
            buf = np.empty(w * h * 4, dtype=np.float32)
            img.pixels.foreach_get(buf)
        finally:
            self.bpy.data.images.remove(img)
        return buf.reshape(h, w, 4)

    def _convert(self, scene: Any, task: RenderTask, frame: np.ndarray) -> bytes:
        """Write scene-linear ``frame`` in the task's format via a compositor-only copy
        of ``scene``.

        A scene whose compositor has no Render Layers node is not rendered, only
        composited, and its result is written by the same code (view transform, look,
        curves, dither) as a normal render. A copy, not a new scene, so that every
        colour setting is the source's without listing them.
        """
        bpy = self.bpy
        height, width = frame.shape[:2]
        img = bpy.data.images.new("rayfarm_frame", width, height, alpha=True, float_buffer=True)
        img.pixels.foreach_set(frame.ravel())
        comp = scene.copy()  # objects are linked, not copied: cheap
        comp.name = _COMP_SCENE
        tree = bpy.data.node_groups.new(_COMP_SCENE, "CompositorNodeTree")
        try:
            prepare_assembly(comp, width, height)
            tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
            node = tree.nodes.new("CompositorNodeImage")
            node.image = img
            out = tree.nodes.new("NodeGroupOutput")
            tree.links.new(node.outputs["Image"], out.inputs[0])
            comp.compositing_node_group = tree
            comp.render.use_compositing = True
            return self._write_still(comp, task, self._out_path(task, task.format))
        finally:
            bpy.data.scenes.remove(comp)
            bpy.data.node_groups.remove(tree)
            bpy.data.images.remove(img)

    # -- devices -----------------------------------------------------------------------------

    def _select_device(self) -> str:
        """OptiX, then CUDA, then HIP/oneAPI on a GPU Ray assigned us; else the CPU."""
        import ray

        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        if not gpu_ids:
            return "CPU"
        prefs = self.bpy.context.preferences.addons["cycles"].preferences
        for backend in _GPU_BACKENDS:
            try:
                prefs.compute_device_type = backend
            except TypeError:
                continue
            prefs.refresh_devices()
            devices = [d for d in prefs.devices if d.type == backend]
            if not devices:
                continue
            for d in prefs.devices:
                d.use = d.type == backend
            return f"GPU ({backend}: {', '.join(d.name for d in devices)})"
        return "CPU (no usable GPU backend on this node)"

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "workdir", ""), ignore_errors=True)


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
