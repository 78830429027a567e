"""A render actor that renders nothing: every task "finishes" at once with a 1x1 PNG.

For measuring what the farm itself costs per task (``bench/scale.py``: the dispatcher,
Redis, storage and Ray, without Blender) and for dry runs of a pipeline's plumbing;
select it with ``RAYFARM_ACTOR_CLASS=rayfarm.render.noop:NoopActor``. It never
imports bpy.

Two knobs make a dry run look like a real farm, from its constructor or the
environment: ``task_s`` (``RAYFARM_NOOP_TASK_S``) seconds each task takes, and
``faults`` (``RAYFARM_NOOP_FAULTS``), a folder where a file named after a frame
number makes the next task of that frame fail once, on whichever actor takes it
first (the actor removes the file), as a transient render error would.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import zlib
from typing import Any

import ray

from rayfarm.errors import RenderError, WorkerLost
from rayfarm.render.actor import CONTROL
from rayfarm.render.inputs import Inputs
from rayfarm.render.tasks import BatchResult, RenderTask, TaskResult, portable

__all__ = ["NoopActor"]


def _png_1x1() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)  # 1x1 RGBA, 8 bits
    pixels = zlib.compress(b"\x00\x00\x00\x00\xff")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


PNG = _png_1x1()


class NoopActor:
    """Same calls as ``RenderActor``; no rendering, no preview, no log."""

    device = "CPU (no-op)"

    def __init__(
        self,
        threads: int = 0,
        slot: int = 0,
        slots: int = 1,
        reporter: Any = None,
        blender: str | None = None,
        task_s: float | None = None,
        faults: str | None = None,
    ) -> None:
        env_s = os.environ.get("RAYFARM_NOOP_TASK_S")
        self.task_s = task_s if task_s is not None else float(env_s or 0.0)
        self.faults = faults if faults is not None else os.environ.get("RAYFARM_NOOP_FAULTS")
        self.blender = blender
        self._stop = threading.Event()
        self._why = ""

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": self.device,
            "blender": self.blender,
        }

    @ray.method(concurrency_group=CONTROL)
    def interrupt(self, reason: str) -> bool:
        """Stop the task in progress (as a real actor stops its worker)."""
        self._why = reason
        self._stop.set()
        return True

    def render(self, task: RenderTask, inputs: Inputs) -> tuple[TaskResult, Any]:
        self._stop.clear()
        if self.task_s and self._stop.wait(self.task_s):
            raise WorkerLost(self._why, {"stopped": True})
        if self.faults:
            try:
                os.unlink(os.path.join(self.faults, str(task.frame)))
            except FileNotFoundError:
                pass
            else:
                raise RenderError(f"injected fault (a file in {self.faults})")
        return TaskResult(task.frame, task.tile, self.device, self.task_s), PNG

    def render_batch(self, tasks: list[RenderTask], inputs: Inputs) -> BatchResult:
        batch = BatchResult()
        for task in tasks:
            try:
                batch.results.append(self.render(task, inputs))
            except Exception as exc:
                batch.error = portable(exc)
                break
        return batch

    def task_log(self) -> str:
        return ""
