"""The TileAssembler: stitches tiles into frames as they arrive, pass by pass.

One per farm, a Ray actor that reserves no CPU. The dispatcher hands it each tile
as soon as the tile is rendered and drops its own reference, so a tile lives in
Ray's object store only until it has been copied into its frame: memory holds
one float buffer per pass for each frame still in flight, never a job's tiles.
When the last tile lands, ``take`` hands the whole frame (every pass) to a render
actor, which denoises, composites and writes it once. No bpy here: numpy only.

Joining is one numpy copy of each tile's rows into its frame's buffer per pass, done
as the tile lands (so it overlaps the other tiles' renders); each copy reads and
writes memory once (milliseconds per pass, even for a tile of a 4K frame), and the
assembler times them (``AssembledFrame.join_s``) so a frame's events say what joining
cost it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from rayfarm.errors import RenderError
from rayfarm.render.tasks import TileRect
from rayfarm.render.worker.parts import Part

__all__ = ["AssembledFrame", "TileAssembler"]


@dataclass
class _Frame:
    width: int
    height: int
    total: int
    parts: dict[str, Part] = field(default_factory=dict)
    received: set[int] = field(default_factory=set)
    join_s: float = 0.0


@dataclass(frozen=True)
class AssembledFrame:
    """A whole frame's passes, joined from its tiles, and the seconds the joining took
    (the copies of every tile into the frame, summed)."""

    parts: dict[str, Part]
    join_s: float = 0.0


class TileAssembler:
    """``add`` tiles, ``take`` a finished frame; ``drop`` what will not finish."""

    def __init__(self) -> None:
        self.frames: dict[tuple[str, int], _Frame] = {}

    def add(
        self,
        job_id: str,
        frame: int,
        total: int,
        size: tuple[int, int],
        rect: TileRect,
        parts: dict[str, Part],
    ) -> int:
        """Copy one tile into its frame; return how many distinct tiles the frame has.

        A tile delivered twice (a retried task whose first attempt also landed) is
        copied again over itself: the count is of distinct tiles.
        """
        started = time.perf_counter()
        width, height = size
        f = self.frames.get((job_id, frame))
        if f is None or (f.width, f.height, f.total) != (width, height, total):
            f = self.frames[(job_id, frame)] = _Frame(width, height, total)
        if f.parts and set(parts) != set(f.parts):
            raise RenderError(
                f"tile {rect.index} has passes {sorted(parts)}, the frame's other tiles "
                f"{sorted(f.parts)}"
            )
        # Blender's tile origin is bottom-left; EXR rows run top to bottom.
        rows = slice(height - rect.y1, height - rect.y0)
        cols = slice(rect.x0, rect.x1)
        for name, part in parts.items():
            if part.pixels.shape[:2] != (rect.height, rect.width):
                raise RenderError(
                    f"tile {rect.index} pass {name!r} is {part.pixels.shape[1]}x"
                    f"{part.pixels.shape[0]} pixels, expected {rect.width}x{rect.height}"
                )
            buf = f.parts.get(name)
            if buf is None:
                nch = part.pixels.shape[2]
                buf = f.parts[name] = Part(
                    part.channels, np.zeros((height, width, nch), dtype=np.float32)
                )
            buf.pixels[rows, cols] = part.pixels
        f.received.add(rect.index)
        f.join_s += time.perf_counter() - started
        return len(f.received)

    def take(self, job_id: str, frame: int) -> AssembledFrame:
        """The finished frame's passes; the assembler forgets the frame."""
        f = self.frames.pop((job_id, frame), None)
        if f is None or len(f.received) < f.total:
            have = 0 if f is None else len(f.received)
            total = 0 if f is None else f.total
            raise RenderError(f"frame {frame} is not assembled ({have} of {total} tiles)")
        return AssembledFrame(f.parts, f.join_s)

    def drop(self, job_id: str, frame: int | None = None) -> None:
        """Forget one frame of a job, or all of it (cancelled, failed, re-queued)."""
        for key in [k for k in self.frames if k[0] == job_id and frame in (None, k[1])]:
            del self.frames[key]

    def stats(self) -> dict[str, int]:
        """Frames in flight and the bytes their buffers hold."""
        return {
            "frames": len(self.frames),
            "bytes": sum(p.pixels.nbytes for f in self.frames.values() for p in f.parts.values()),
        }
