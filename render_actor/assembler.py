"""The TileAssembler: merges the parts of frames (tiles, sample slices, or both) into
whole frames as they arrive, pass by pass.

One per farm, a Ray actor that reserves no CPU. The dispatcher hands it each part as
soon as it is rendered and drops its own reference, so a part lives in Ray's object
store only until it has been merged into its frame: memory holds one float buffer per
pass for each frame still in flight, never a job's parts. When the last part lands,
``take`` hands the whole frame (every pass) to a render actor, which denoises,
composites and writes it once. No bpy here: numpy only.

- A tile is copied into its frame's buffer per pass: one numpy copy of its rows, done as
  it lands (so it overlaps the other parts' renders); each copy reads and writes memory
  once (milliseconds per pass, even for a tile of a 4K frame).
- A sample slice (``samples``: its offset, length and the frame's total) is added into
  its frame's sums as each pass merges (``rayfarm.render.worker.samples``): means
  weighted by the slice's samples, the first-sample passes from the slice that starts
  at sample 0, the light passes divided by their colour as Cycles divides them; a
  pixel's samples merged so far are counted, so ``peek`` shows the merge so far of a
  frame still rendering (its preview), and ``take`` divides once every slice is in.

The assembler times its merging (``AssembledFrame.join_s``) so a frame's events say
what joining cost it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from rayfarm.errors import RenderError
from rayfarm.render.tasks import TileRect
from rayfarm.render.worker.parts import Part
from rayfarm.render.worker.samples import (
    HELPER,
    colour_part,
    divide_even,
    merge_of,
    pass_of,
)

__all__ = ["AssembledFrame", "Peek", "TileAssembler"]


@dataclass
class _Frame:
    width: int
    height: int
    total: int
    parts: dict[str, Part] = field(default_factory=dict)
    received: set[tuple[int, int]] = field(default_factory=set)  # (tile, slice offset)
    names: frozenset[str] = frozenset()  # what every part delivers (helpers included)
    join_s: float = 0.0
    # A sliced frame's: samples merged per pixel, its total samples, and the colour x
    # samples sums that divide each divided light pass.
    weight: np.ndarray | None = None
    samples: int = 0
    colour: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class AssembledFrame:
    """A whole frame's passes, merged from its parts, and the seconds the merging took
    (the copies and sums of every part into the frame, summed)."""

    parts: dict[str, Part]
    join_s: float = 0.0


@dataclass(frozen=True)
class Peek:
    """A sliced frame as merged so far: its first combined pass (``parts``), and the
    share of the frame's samples every pixel has (``fraction``: its worst pixel's)."""

    parts: dict[str, Part]
    fraction: float


class TileAssembler:
    """``add`` parts, ``take`` a finished frame; ``drop`` what will not finish."""

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
        samples: tuple[int, int, int] | None = None,
    ) -> int:
        """Merge one part, the tile ``rect`` of all the frame's samples or (``samples``:
        offset, length, total) of a slice of them, into its frame of ``total`` parts;
        return how many distinct parts the frame has.

        A part delivered twice (a retried task whose first attempt also landed) counts
        once: a tile is copied again over itself, a slice is not added twice.
        """
        started = time.perf_counter()
        width, height = size
        f = self.frames.get((job_id, frame))
        if f is None or (f.width, f.height, f.total) != (width, height, total):
            f = self.frames[(job_id, frame)] = _Frame(width, height, total)
        if f.names and set(parts) != f.names:
            raise RenderError(
                f"tile {rect.index} has passes {sorted(parts)}, the frame's other parts "
                f"{sorted(f.names)}"
            )
        key = (rect.index, samples[0] if samples else 0)
        if samples is not None and key in f.received:
            return len(f.received)
        f.names = frozenset(parts)
        # Blender's tile origin is bottom-left; EXR rows run top to bottom.
        at = (slice(height - rect.y1, height - rect.y0), slice(rect.x0, rect.x1))
        for name, part in parts.items():
            if part.pixels.shape[:2] != (rect.height, rect.width):
                raise RenderError(
                    f"tile {rect.index} pass {name!r} is {part.pixels.shape[1]}x"
                    f"{part.pixels.shape[0]} pixels, expected {rect.width}x{rect.height}"
                )
        if samples is None:
            for name, part in parts.items():
                self._buffer(f, name, part).pixels[at] = part.pixels
        else:
            self._add_slice(f, at, parts, samples)
        f.received.add(key)
        f.join_s += time.perf_counter() - started
        return len(f.received)

    def _add_slice(
        self,
        f: _Frame,
        at: tuple[slice, slice],
        parts: dict[str, Part],
        samples: tuple[int, int, int],
    ) -> None:
        offset, length, f.samples = samples
        if f.weight is None:
            f.weight = np.zeros((f.height, f.width), dtype=np.float32)
        f.weight[at] += length
        for name, part in parts.items():
            if name.startswith(HELPER):
                continue  # only what divides another pass
            merge = merge_of(name)
            buf = self._buffer(f, name, part).pixels
            if merge.kind == "first":
                if offset == 0:
                    buf[at] = part.pixels
            elif merge.kind == "divided":
                colour = colour_part(parts, merge.colour or "")
                if colour is None:
                    raise RenderError(f"slice has pass {name!r} without {merge.colour!r}")
                weighted = colour.pixels * np.float32(length)
                buf[at] += part.pixels * weighted
                sums = f.colour.get(name)
                if sums is None:
                    sums = f.colour[name] = np.zeros_like(buf)
                sums[at] += weighted
            else:
                buf[at] += part.pixels * np.float32(length)

    @staticmethod
    def _buffer(f: _Frame, name: str, part: Part) -> Part:
        buf = f.parts.get(name)
        if buf is None:
            nch = part.pixels.shape[2]
            buf = f.parts[name] = Part(
                part.channels, np.zeros((f.height, f.width, nch), dtype=np.float32)
            )
        return buf

    def take(self, job_id: str, frame: int) -> AssembledFrame:
        """The finished frame's passes; the assembler forgets the frame."""
        f = self.frames.pop((job_id, frame), None)
        if f is None or len(f.received) < f.total:
            have = 0 if f is None else len(f.received)
            total = 0 if f is None else f.total
            what = "parts" if f is not None and f.weight is not None else "tiles"
            raise RenderError(f"frame {frame} is not assembled ({have} of {total} {what})")
        if f.weight is None:
            return AssembledFrame(f.parts, f.join_s)
        started = time.perf_counter()
        parts = {name: _merged(f, name, part) for name, part in f.parts.items()}
        return AssembledFrame(parts, f.join_s + time.perf_counter() - started)

    def peek(self, job_id: str, frame: int) -> Peek:
        """A sliced frame's merge so far (see ``Peek``), as its preview shows it."""
        f = self.frames.get((job_id, frame))
        if f is None or f.weight is None or f.samples <= 0:
            raise RenderError(f"frame {frame} has no slice merged yet")
        name = next((n for n in f.parts if pass_of(n)[1] == "Combined"), next(iter(f.parts)))
        return Peek({name: _merged(f, name, f.parts[name])}, float(f.weight.min()) / f.samples)

    def drop(self, job_id: str, frame: int | None = None) -> None:
        """Forget one frame of a job, or all of it (cancelled, failed, re-queued)."""
        for key in [k for k in self.frames if k[0] == job_id and frame in (None, k[1])]:
            del self.frames[key]

    def stats(self) -> dict[str, int]:
        """Frames in flight and the bytes their buffers hold."""
        return {
            "frames": len(self.frames),
            "bytes": sum(p.pixels.nbytes for f in self.frames.values() for p in f.parts.values())
            + sum(
                (f.weight.nbytes if f.weight is not None else 0)
                + sum(s.nbytes for s in f.colour.values())
                for f in self.frames.values()
            ),
        }


def _merged(f: _Frame, name: str, part: Part) -> Part:
    """Pass ``name`` of sliced frame ``f`` as merged so far: sums over the samples in,
    divided (a pixel no slice reached yet reads 0)."""
    assert f.weight is not None
    kind = merge_of(name).kind
    if kind == "first":
        return part
    if kind == "divided":
        return Part(part.channels, divide_even(part.pixels, f.colour[name]), part.stored)
    return Part(part.channels, _mean(part.pixels, f.weight[..., None]), part.stored)


def _mean(sums: np.ndarray, weight: np.ndarray) -> np.ndarray:
    safe = np.where(weight > 0, weight, 1)
    return np.where(weight > 0, sums / safe, 0).astype(np.float32)
