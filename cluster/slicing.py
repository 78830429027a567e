"""Sample-sliced frames, the dispatcher's side: how many slices ``slices="auto"`` picks,
how much of a frame's samples has landed, and which failures lost a slot rather than
failed a slice. Pure: no Ray, no Redis.

A frame split into sample slices renders as one task per (tile, slice); each slice
renders a subset of the frame's samples (``rayfarm.render.worker.samples``) and the
assembler merges them exactly. The dispatcher follows each frame's landed samples
(``FrameSamples``) for its events (``fraction``) and its previews: a new one each time
every pixel of the frame has more samples than the last preview showed.

**Preemption.** A slot lost in the middle of a slice (its node left, its render actor
died, or its Blender worker was killed from outside: SIGKILL from the kernel's OOM
killer or an operator, SIGTERM from a node being reclaimed) costs that slice alone: it
renders again, with the same samples, and spends none of the job's retries, whatever
its ``max_retries``. A worker that crashed on its own (SIGSEGV, SIGABRT: Blender's
fault, maybe the scene's) is a failure like any other. So that a slice whose render
keeps getting killed (one that runs the node out of memory, say) cannot loop forever,
its ``MAX_SLICE_LOSSES``-th loss counts as a failure too.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field

from rayfarm.errors import WorkerLost
from rayfarm.models import MAX_SLICES

__all__ = ["MAX_SLICE_LOSSES", "FrameSamples", "auto_slices", "lost_slot"]

#: Losses of its slot one slice may have before a loss counts as a failed attempt.
MAX_SLICE_LOSSES = 8
#: Signals that end a worker from outside it (a preempted node, the OOM killer, an
#: operator), as opposed to a crash of its own.
_KILLED = {-signal.SIGKILL: "SIGKILL", -signal.SIGTERM: "SIGTERM"}


def auto_slices(
    frames: int,
    free: int,
    tiles: int,
    frame_s: float,
    task_cost_s: float,
    samples: int,
    target_s: float,
) -> tuple[int, str]:
    """The slices ``slices="auto"`` picks per frame, and why.

    ``frame_s``: a frame's render time on one actor at its samples, measured from the
    scene (``RenderActor.inspect``, as for ``tiles="auto"``); ``task_cost_s``: what every
    task pays on top of its samples. A task of a frame split into ``tiles`` tiles and N
    slices renders its share of the samples in ``(frame_s - task_cost_s) / (tiles x N)
    + task_cost_s``: N is the fewest slices that keep it under ``target_s``, but never
    more than the ``free`` slots can run at once for ``frames`` frames (slices beyond
    those finish no sooner, and each pays the task cost), nor more than the frame's
    ``samples``, nor ``MAX_SLICES``.
    """
    work_s = max(0.0, frame_s - task_cost_s) / max(1, tiles)
    if work_s <= 0:
        want = 1  # all of the task's time is its cost: slices would only add more
    elif target_s <= task_cost_s:
        want = MAX_SLICES  # no count meets the target: as many as the slots can run
    else:
        want = max(1, math.ceil(work_s / (target_s - task_cost_s)))
    usable = max(1, free // max(1, frames * tiles))
    count = max(1, min(want, usable, samples, MAX_SLICES))
    per_task = f"a task ~{work_s + task_cost_s:.1f} s unsliced, target {target_s:g} s"
    if count == want:
        reason = f"{count} slice(s) keep every task under the target ({per_task})"
    elif count == usable:
        reason = (
            f"{count} slice(s): {want} would keep every task under the target ({per_task}), "
            f"but {free} free slot(s) run at most {usable} for {frames} frame(s) of "
            f"{tiles} tile(s)"
        )
    else:
        reason = f"{count} slice(s): a frame has {samples} samples ({per_task})"
    return count, reason


@dataclass
class FrameSamples:
    """The samples of one sliced frame that have landed, tile by tile."""

    tiles: int
    total: int = 0  # the frame's samples
    area: dict[int, float] = field(default_factory=dict)  # tile -> its share of the frame
    merged: dict[int, int] = field(default_factory=dict)  # tile -> its samples landed
    seen: set[tuple[int, int]] = field(default_factory=set)  # (tile, offset)
    # (tile, offset) -> the frame's share landed once that slice was counted: what its
    # event says, whatever lands while the event is being written.
    after: dict[tuple[int, int], float] = field(default_factory=dict)

    def land(self, tile: int, area: float, samples: tuple[int, int, int]) -> bool:
        """Count a slice's samples (offset, length, total) over ``tile`` (``area``: its
        share of the frame's pixels); False if they were counted already."""
        offset, length, self.total = samples
        if (tile, offset) in self.seen:
            return False
        self.seen.add((tile, offset))
        self.area[tile] = area
        self.merged[tile] = self.merged.get(tile, 0) + length
        self.after[(tile, offset)] = self.fraction
        return True

    @property
    def fraction(self) -> float:
        """The share of the frame's samples landed (over its pixels)."""
        if not self.total:
            return 0.0
        return sum(self.area[t] * n for t, n in self.merged.items()) / self.total

    @property
    def everywhere(self) -> float:
        """The share of its samples every pixel of the frame has (its preview's)."""
        if not self.total or len(self.merged) < self.tiles:
            return 0.0
        return min(self.merged.values()) / self.total


def lost_slot(cause: BaseException, died: bool) -> str | None:
    """How a failed slice lost its slot (its render actor died, or its worker was killed
    from outside), or None when the slice itself failed (see the module's docstring)."""
    if died:
        return "its render actor died"
    if isinstance(cause, WorkerLost) and not cause.detail.get("stopped"):
        code = cause.detail.get("exit")
        name = _KILLED.get(code) if isinstance(code, int) else None
        if name is not None:
            return f"its Blender worker was killed ({name})"
    return None
