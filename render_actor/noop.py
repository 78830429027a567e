"""A render actor that renders nothing: every task "finishes" at once with a 1x1 PNG.

For measuring what the farm itself costs per task (``bench/scale.py``: the dispatcher,
Redis, storage and Ray, without Blender) and for dry runs of a pipeline's plumbing;
select it with ``RAYFARM_ACTOR_CLASS=rayfarm.render.noop:NoopActor``. It never
imports bpy.
"""

from __future__ import annotations

import os
import socket
import struct
import zlib
from typing import Any

from rayfarm.render.inputs import Inputs
from rayfarm.render.tasks import RenderTask, TaskResult

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

    def __init__(self, threads: int = 0, slot: int = 0, slots: int = 1, reporter: Any = None):
        pass

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": self.device,
        }

    def render(self, task: RenderTask, inputs: Inputs) -> tuple[TaskResult, Any]:
        return TaskResult(task.frame, task.tile, self.device, 0.0), PNG

    def task_log(self) -> str:
        return ""
