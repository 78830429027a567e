"""The RenderActor: a thin Ray actor, one per GPU (or CPU slot), that supervises a
Blender worker process and renders (frame, tile) tasks with it.

The actor never imports bpy. It lays each job's input folder out on local disk (blobs
fetched once per node), starts a worker with the Blender environment of the task's
version (``rayfarm.render.environments``: built on the node the first time it is
needed), hands it the task and collects what it wrote: the image, its preview, a
tile's passes, the files of the scene's File Output nodes, and the worker's output as
the task's log. Cycles' status lines come back as progress reports (``SampleProgress``).

A render actor keeps one worker at a time: the scene stays open in it between tasks
of a job (and its BVH with ``use_persistent_data``), and a task of another Blender
version replaces it. An actor pinned to a share of its node's cores finishes tiled
frames (denoise, compositor) in a second worker, the finisher, that may use every
core of the node (see ``finish`` and ``rayfarm.render.workers``). A worker that
crashes, or that the farm stops (``interrupt``: a cancel, a hung render), fails its
task alone; the actor, its GPU and its place in the pool stay, and the next task
starts a fresh worker. A worker that ran a job's own Python (``scripts``) is replaced
before another job's task. Each result says where its seconds went (``steps``).

``SceneInspector`` catalogues uploaded scenes with a worker of the file's own version.
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
from dataclasses import asdict, replace
from typing import Any

import ray

from rayfarm.errors import RenderError
from rayfarm.render.assembler import AssembledFrame, Peek
from rayfarm.render.cache import BlobCache
from rayfarm.render.inputs import Inputs, materialize
from rayfarm.render.progress import SampleProgress
from rayfarm.render.supervisor import WorkerProcess
from rayfarm.render.tasks import FATAL, BatchResult, RenderTask, TaskResult, TileRect, portable
from rayfarm.render.worker.files import collect_files, take
from rayfarm.render.worker.parts import Part, load_parts, save_parts
from rayfarm.render.workers import Workers

__all__ = ["CONTROL", "RenderActor", "SceneInspector"]

#: The actor's concurrency group for ``interrupt``: it must run while a render blocks
#: the default group (create the actor with ``concurrency_groups={CONTROL: 1}``).
CONTROL = "control"
#: How much of Blender's output per task is kept.
LOG_TAIL_BYTES = 16 * 1024
#: Input folders an actor keeps on local disk for reopening without a fetch.
SCENE_CACHE_FILES = 8


class RenderActor:
    """Renders (frame, tile) tasks in a Blender worker. Create it as a Ray actor:

    ``ray.remote(RenderActor).options(num_gpus=1, concurrency_groups={CONTROL: 1})
    .remote(blender="5.3")`` on a GPU node, or with ``num_cpus`` and ``threads`` on a
    CPU node.
    """

    #: Workers (Blender versions) kept running at once.
    KEEP_WORKERS = 1
    #: Finishers (Blender versions) kept running at once.
    KEEP_FINISHERS = 1

    def __init__(
        self,
        threads: int = 0,
        slot: int = 0,
        slots: int = 1,
        reporter: Any = None,
        blender: str | None = None,
    ) -> None:
        """``slot`` of ``slots`` CPU actors on this node: the actor pins itself to its
        share of the node's cores (``threads`` of them when given), so actors never fight
        over a core and Cycles runs one thread per pinned core; its worker inherits the
        pinning. ``reporter`` (the dispatcher) receives Cycles' sample progress during
        renders. ``blender``: the version whose worker starts now, in the background, so
        the first task finds Blender loaded.

        Pinning also matters alone: an unpinned Cycles process with fewer threads than
        the machine has cores and persistent data spins a core while idle (TBB; measured
        with bpy 5.0.1 on 2 cores: 1 thread unpinned burns a core, pinned it does not).

        A GPU actor (Ray assigned it a GPU) pins itself to its GPU's share of the node's
        cores instead, so the host threads of several GPU actors on one node do not
        oversubscribe its CPU.
        """
        node_cores = sorted(os.sched_getaffinity(0))  # before pinning: the node's
        slot, slots = _gpu_share() or (slot, slots)
        self.cores = _pin(slot, slots, threads)
        self.threads = threads or len(self.cores)
        self.workdir = tempfile.mkdtemp(prefix="rayfarm-actor-")
        self.workers = Workers(
            self.workdir, self.threads, self.cores, node_cores,
            list(ray.get_gpu_ids()) if ray.is_initialized() else [],
            self.KEEP_WORKERS, self.KEEP_FINISHERS,
        )  # fmt: skip
        self.progress = SampleProgress(reporter)
        self.cache = BlobCache()  # the node's copy of job inputs, shared by its actors
        self.scenes: OrderedDict[str, str] = OrderedDict()  # input digest -> folder, LRU
        self.tainted: str | None = None  # the job whose Python the worker ran
        self.tainted_version = ""  # ... in a worker of this Blender version
        self.last_log = ""
        if blender:
            self.workers.warm(blender)

    @property
    def device(self) -> str:
        """What this actor renders on ("CPU", "GPU (OPTIX: ...)"), once a worker runs."""
        return self.workers.device

    # -- info ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        worker, finisher = self.workers.latest(), self.workers.latest("finish")
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "device": self.device,
            "blender": worker.blender if worker else None,
            "worker_pid": worker.pid if worker and worker.alive else None,
            "cores": self.cores,
            "threads": self.threads,
            "node_cores": self.workers.node_cores,
            "finisher": {"pid": finisher.pid, "cores": finisher.cores,
                         "threads": finisher.threads, "blender": finisher.blender}
            if finisher is not None and finisher.alive else None,
        }  # fmt: skip

    def task_log(self) -> str:
        """Blender's output during the last task (its tail), kept for a failed one."""
        return self.last_log

    @ray.method(concurrency_group=CONTROL)
    def interrupt(self, reason: str) -> bool:
        """Stop the render in progress now (a cancel, a hung render): its worker is
        stopped, and the call that waits on it fails with ``WorkerLost(reason)``. The
        actor stays; its next task starts a new worker. True if a worker was stopped."""
        return self.workers.interrupt(reason)

    # -- tasks -----------------------------------------------------------------------------

    def render(self, task: RenderTask, inputs: Inputs) -> tuple[TaskResult, Any]:
        """Render one task; call with ``num_returns=2``.

        Returns (result, payload): the payload is the finished image file's bytes for
        a whole frame, or the part's passes (``{part name: Part}``, every pass of every
        view layer, float) for a tile or a slice of the frame's samples, so the
        dispatcher can hand them to the assembler.
        ``inputs`` is the job's input folder (laid out on this node once). Blender's
        output during the task comes back in the result's ``log``.
        """
        started = time.perf_counter()
        if not task.is_part:
            self.workers.close_finishers()  # whole frames again: none to finish soon
        with self._running(task, inputs) as (worker, scene, steps):
            if task.is_part:
                self.workers.warm(worker.version, "finish")  # up when the last tile lands
            stem = os.path.join(
                self.workdir, f"{task.job_id}_{task.frame}_{task.tile}_{task.slice}"
            )
            folder = os.path.join(self.workdir, "files", os.path.basename(stem))
            caches = os.path.join(self.workdir, "caches", task.job_id)
            common = {"task": _message(task), "scene": scene, "folder": folder,
                      "caches": caches}  # fmt: skip
            if not task.is_part:
                out, preview = f"{stem}.{task.format}", f"{stem}_preview.png"
                value = worker.call("render", self.progress.update, out=out, preview=preview,
                                    **common)  # fmt: skip
                collecting = time.perf_counter()
                image, thumbnail = take(out), take(preview)
                try:
                    files = collect_files(folder)
                except ValueError as exc:
                    raise RenderError(str(exc), {FATAL: True}) from None
                steps = _merged(steps, value.get("steps"), write_s=time.perf_counter() - collecting)
                result = TaskResult(
                    task.frame, 0, self.device, time.perf_counter() - started,
                    preview=thumbnail, warnings=tuple(value["warnings"]), files=files,
                    steps=steps,
                )  # fmt: skip
                payload: Any = image
            else:
                parts_dir = f"{stem}_parts"
                value = worker.call("tile", self.progress.update, parts_dir=parts_dir, **common)
                collecting = time.perf_counter()
                try:
                    payload = load_parts(parts_dir, value["parts"])
                finally:
                    shutil.rmtree(parts_dir, ignore_errors=True)
                steps = _merged(steps, value.get("steps"), write_s=time.perf_counter() - collecting)
                samples = value.get("samples")
                result = TaskResult(
                    task.frame, task.tile, self.device, time.perf_counter() - started,
                    TileRect(*value["rect"]), tuple(value["size"]),
                    samples=None if samples is None else tuple(samples),
                    warnings=tuple(value["warnings"]), steps=steps,
                )  # fmt: skip
        return replace(result, log=self.last_log, worker=worker.pid), payload

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

    def finish(
        self, task: RenderTask, inputs: Inputs, frame: AssembledFrame | dict[str, Part]
    ) -> tuple[TaskResult, bytes]:
        """Finish an assembled frame and write it in the job's format; call with
        ``num_returns=2``: denoising, the scene's compositor, colour management and
        dither, once, on the whole frame (see the worker's ``Session.finish``).

        The frame is finished with every core of the node, not just this actor's
        share: an actor pinned to fewer cores than its node has hands it to its
        finisher, a worker of the same Blender whose process may use all of them, with
        as many threads (the render worker cannot widen itself: Blender's thread pool
        takes its size from the cores the process had when bpy loaded, and Cycles'
        persistent session caps it at the render's threads; measured with bpy 5.0.1).
        The finisher starts while the frame's tiles render, and goes when the actor
        renders whole frames again. A job that runs its file's Python finishes in the
        render worker that already ran it. ``steps`` gives ``join_s`` (the
        assembler's copies of the tiles into the frame), ``handoff_s`` (the frame handed
        to the worker), then the worker's ``open_s``, ``denoise_s``, ``composite_s`` and
        ``write_s``.
        """
        started = time.perf_counter()
        if isinstance(frame, AssembledFrame):
            parts, join_s = frame.parts, frame.join_s
        else:
            parts, join_s = frame, 0.0
        with self._running(None, inputs, task, finishing=True) as (worker, scene, steps):
            stem = os.path.join(self.workdir, f"{task.job_id}_{task.frame}_finish")
            parts_dir = f"{stem}_parts"
            out, preview = f"{stem}.{task.format}", f"{stem}_preview.png"
            try:
                handing = time.perf_counter()
                listing = save_parts(parts, parts_dir)
                handoff_s = time.perf_counter() - handing
                value = worker.call("finish", task=_message(task), scene=scene,
                                    parts_dir=parts_dir, listing=listing, out=out,
                                    preview=preview)  # fmt: skip
            finally:
                shutil.rmtree(parts_dir, ignore_errors=True)
            collecting = time.perf_counter()
            image, thumbnail = take(out), take(preview)
            steps = _merged(
                {"join_s": join_s, "handoff_s": handoff_s, **steps}, (value or {}).get("steps"),
                write_s=time.perf_counter() - collecting,
            )  # fmt: skip
        seconds = time.perf_counter() - started
        result = TaskResult(task.frame, -1, self.device, seconds, preview=thumbnail,
                            worker=worker.pid, steps=steps)  # fmt: skip
        return result, image

    def preview(
        self, task: RenderTask, inputs: Inputs, peek: Peek
    ) -> tuple[bytes, float, dict[str, float]]:
        """The PNG preview of a sliced frame still rendering, from ``peek`` (the merge so
        far of its combined pass, ``TileAssembler.peek``) through the scene's view
        transform; the share of the frame's samples it holds; and where the time went.
        Made where the actor finishes frames (its finisher, when it has one: adding an
        image to the render worker's Blender would make its next slice sync the scene
        again)."""
        with self._running(None, inputs, task, finishing=True) as (worker, scene, steps):
            stem = os.path.join(self.workdir, f"{task.job_id}_{task.frame}_preview")
            parts_dir, out = f"{stem}_parts", f"{stem}.png"
            try:
                listing = save_parts(peek.parts, parts_dir)
                value = worker.call("preview", task=_message(task), scene=scene,
                                    parts_dir=parts_dir, listing=listing, out=out)  # fmt: skip
            finally:
                shutil.rmtree(parts_dir, ignore_errors=True)
            image = take(out)
        return image, peek.fraction, _merged(steps, (value or {}).get("steps"))

    def inspect(self, task: RenderTask, inputs: Inputs) -> dict[str, Any]:
        """Open the task's scene (it stays open for the tasks that follow) and measure
        what the dispatcher needs to split its frames (``tiles="auto"``): the frame's
        size, its render time and the fixed cost of a tile (the worker's ``probe``)."""
        with self._running(None, inputs, task) as (worker, scene, _):
            value: dict[str, Any] = worker.call("probe", task=_message(task), scene=scene)
        return value

    # -- workers and scenes ------------------------------------------------------------------

    @contextmanager
    def _running(
        self,
        reported: RenderTask | None,
        inputs: Inputs,
        task: RenderTask | None = None,
        finishing: bool = False,
    ) -> Iterator[tuple[WorkerProcess, dict[str, Any], dict[str, float]]]:
        """The worker for ``task`` (``reported``, whose samples are reported) with its
        scene laid out, and the seconds that took (``start_s``, ``inputs_s``);
        ``finishing``: the finisher where the actor has one (see ``finish``). The
        worker's output during the block becomes ``last_log``."""
        task = task or reported
        assert task is not None
        self.last_log = ""  # a task that fails before its worker runs has no log of its own
        if self.tainted is not None and self.tainted != task.job_id:
            # The worker ran another job's Python: whatever it changed (handlers, modules)
            # must not touch this job.
            self.workers.drop(self.tainted_version)
            self.tainted = None
        clock = time.perf_counter()
        worker = self.workers.worker(task.blender)
        if task.scripts:
            self.tainted, self.tainted_version = task.job_id, worker.version
        elif finishing and self.workers.narrow:
            worker = self.workers.finisher(worker.version)
        steps = {"start_s": time.perf_counter() - clock}
        clock = time.perf_counter()
        scene = self._scene(task, inputs)
        steps["inputs_s"] = time.perf_counter() - clock
        if reported is not None:
            self.progress.start(reported)
        try:
            yield worker, scene, steps
        finally:
            self.progress.stop()
            self.last_log = worker.log(LOG_TAIL_BYTES)

    def _scene(self, task: RenderTask, inputs: Inputs) -> dict[str, Any]:
        """Lay the task's input folder out on local disk (each blob fetched once per
        node; the last ``SCENE_CACHE_FILES`` folders kept) and describe it for the
        worker, which opens it unless it has it open already."""
        digest = task.scene_hash
        folder = self.scenes.get(digest)
        if folder is not None:
            self.scenes.move_to_end(digest)
        else:
            folder = os.path.join(self.workdir, "inputs", digest)
            self.scenes[digest] = folder
            while len(self.scenes) > SCENE_CACHE_FILES:
                _, old = self.scenes.popitem(last=False)
                shutil.rmtree(old, ignore_errors=True)
        path = materialize(inputs, folder, self.cache)
        return {"key": digest, "path": path, "scripts": task.scripts,
                "allow_missing": task.allow_missing}  # fmt: skip

    def __del__(self) -> None:
        workers = getattr(self, "workers", None)
        if workers is not None:
            workers.close()
        shutil.rmtree(getattr(self, "workdir", ""), ignore_errors=True)


class SceneInspector(RenderActor):
    """Catalogues uploaded scenes (``catalogue``), each with a worker of the Blender
    version that will render it: one per farm, reserving no CPU, so an inspection never
    waits behind a render. It keeps a worker per offered version."""

    KEEP_WORKERS = 8

    def catalogue(self, inputs: Inputs, blender: str | None = None) -> dict[str, Any]:
        """What the farm keeps about an uploaded scene, read by Blender ``blender``
        (opened with scripts off): the Blender that saved it, each scene's cameras,
        frame range, resolution, engine, samples, view layers and passes, and the
        folder's files (with hashes) and any the scene names that are not among them."""
        task = RenderTask(
            job_id="catalogue", scene_hash=inputs.digest, frame=1, tile=0, tiles=(1, 1),
            scene=None, camera=None, samples=None, resolution_percentage=None, format="png",
            color_depth=8, allow_missing=True, blender=blender,
        )  # fmt: skip
        with self._running(None, inputs, task) as (worker, scene, _):
            value: dict[str, Any] = worker.call("catalogue", scene=scene)
        return {
            "id": inputs.digest,
            "main": inputs.main,
            "read_by": worker.blender,
            **value,
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in inputs.files],
        }


def _merged(
    steps: dict[str, float], worker: dict[str, float] | None, **more: float
) -> dict[str, float]:
    """The actor's ``steps``, the worker's and ``more``, summed by name, to the ms."""
    total = dict(steps)
    for name, seconds in [*(worker or {}).items(), *more.items()]:
        total[name] = total.get(name, 0.0) + float(seconds)
    return {name: round(seconds, 3) for name, seconds in total.items()}


def _message(task: RenderTask) -> dict[str, Any]:
    """``task`` as the worker's protocol carries it."""
    return asdict(task)


def _gpu_share() -> tuple[int, int] | None:
    """(this actor's GPU's position, the node's GPU count) for an actor Ray assigned a
    GPU; None for a CPU actor."""
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
    """Pin this process's main thread (and every thread and process it starts, its
    Blender worker's Cycles threads included) to slot ``slot``'s share of the cores this
    process may use, at most ``threads`` of them when ``threads`` is set; return the
    cores."""
    available = sorted(os.sched_getaffinity(0))
    slots = max(1, min(slots, len(available)))
    share = available[slot % slots :: slots]
    if 0 < threads < len(share):
        share = share[:threads]
    if share != available:
        os.sched_setaffinity(0, share)
    return share
