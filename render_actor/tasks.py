"""What the dispatcher sends to a RenderActor and what comes back. Plain data, no bpy.

A ``RenderTask`` crosses to the Blender worker as JSON (``dataclasses.asdict``): keep
its fields JSON-able."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

from rayfarm.render.worker.errors import FATAL
from rayfarm.render.worker.geometry import TileRect

__all__ = ["FATAL", "BatchResult", "RenderTask", "TaskResult", "TileRect", "portable"]


@dataclass(frozen=True)
class RenderTask:
    """One (frame, tile, slice) of a job. ``tiles`` is the grid; (1, 1) renders the whole
    frame. ``slices`` splits the frame's samples into that many subsets, ``slice`` being
    this task's (``rayfarm.render.worker.samples``)."""

    job_id: str
    scene_hash: str
    frame: int
    tile: int
    tiles: tuple[int, int]
    scene: str | None
    camera: str | None
    samples: int | None
    resolution_percentage: int | None
    format: str
    color_depth: int
    denoise: bool | None = None  # None: as the scene says
    allow_missing: bool = False  # render even when the scene's files were not all uploaded
    scripts: bool = False  # run the file's Python (an admin's override, audited)
    blender: str | None = None  # the Blender version that renders it ("5.3")
    slice: int = 0
    slices: int = 1

    @property
    def is_tiled(self) -> bool:
        return self.tiles != (1, 1)

    @property
    def is_sliced(self) -> bool:
        return self.slices > 1

    @property
    def is_part(self) -> bool:
        """Whether the task renders a part of its frame (a tile, a slice of its samples,
        or both) that the assembler merges and an actor then finishes."""
        return self.is_tiled or self.is_sliced

    @property
    def parts(self) -> int:
        """How many tasks render the task's frame."""
        return self.tiles[0] * self.tiles[1] * self.slices


@dataclass(frozen=True)
class TaskResult:
    """What a finished task reports (its image or pixels travel separately)."""

    frame: int
    tile: int
    device: str
    seconds: float
    rect: TileRect | None = None
    size: tuple[int, int] | None = None  # a tile's frame, width x height in pixels
    # A slice's samples: (offset, length, total) of the frame's; None: all of them.
    samples: tuple[int, int, int] | None = None
    preview: bytes | None = None  # a finished frame's PNG thumbnail
    log: str = ""  # Blender's output during the task (its tail)
    warnings: tuple[str, ...] = ()  # about the scene as the farm opened it (scripts off, ...)
    # Files the scene's compositor File Output nodes wrote for this frame, by path
    # (``<node>/<file>``), confined to the task's folder on the worker.
    files: dict[str, bytes] = field(default_factory=dict)
    worker: int = 0  # the pid of the Blender worker process that did it
    # Where ``seconds`` went, by step (seconds): ``start_s`` (a worker started),
    # ``inputs_s`` (the job's files laid out on the node), ``open_s`` (the scene
    # opened), ``render_s``, ``write_s`` (the image, preview or passes written and read
    # back); a finished tiled frame has ``join_s`` (its tiles copied into it),
    # ``handoff_s`` (handed to the worker), ``denoise_s``, ``composite_s``.
    steps: dict[str, float] = field(default_factory=dict)


@dataclass
class BatchResult:
    """What ``render_batch`` returns for a batch of whole-frame tasks run in order.

    ``results`` holds (result, image bytes) for the tasks that finished, the batch's
    first ones; when a task failed, ``error`` is its exception (the task at index
    ``len(results)``) and ``log`` Blender's output during it, and the tasks after it
    were not started. An error is returned, not raised, so the finished tasks' images
    survive the failure.
    """

    results: list[tuple[TaskResult, Any]] = field(default_factory=list)
    error: BaseException | None = None
    log: str = ""


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (to cross a Ray actor boundary in a result), else
    a ``RenderError`` with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        from rayfarm.errors import RenderError

        return RenderError(f"{type(exc).__name__}: {exc}")
    return exc
