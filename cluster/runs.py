"""What the dispatcher keeps in memory: its actor slots and the jobs it is running.

Everything here can be rebuilt from Redis (a restarted dispatcher does); the
task list of a run is the job's (frame, tile, slice) grid minus the frames already
stored.

Batching: a run whose whole-frame tasks are measured short (the mean of its recent
render times under ``SHORT_TASK_S``) hands an actor several tasks per call
(``batch_size``, ``take_batch``), so Ray's per-call cost and the dispatcher's per-call
work are paid once for the batch. A batch lasts about ``BATCH_S`` on its actor, holds
at most ``MAX_BATCH`` tasks and never more than a fair share of the run's pending
tasks per actor. Real renders (seconds and more), tiles, retried tasks and tasks of a
batch whose actor died run one per call.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rayfarm.cluster import keys
from rayfarm.cluster.slicing import FrameSamples
from rayfarm.models import JobRecord
from rayfarm.render.inputs import Inputs
from rayfarm.render.tasks import RenderTask

__all__ = ["BATCH_S", "MAX_BATCH", "SHORT_TASK_S", "Run", "Slot", "expand", "task_key"]

#: Whole-frame tasks shorter than this (the mean of a run's recent ones) are batched.
SHORT_TASK_S = 0.5
#: About how long one batch of short tasks keeps its actor busy.
BATCH_S = 0.25
#: The most tasks in one batch.
MAX_BATCH = 32
#: Recent whole-frame render times a run's batch size follows.
MEASURED_TASKS = 16
#: Pending tasks looked at to fill a batch past tasks that must run alone.
BATCH_LOOKAHEAD = 64


@dataclass
class Slot:
    """One RenderActor and what the dispatcher knows of it."""

    index: int
    handle: Any
    busy: bool = False
    holds: str | None = None  # content hash of the scene it has open
    node: str | None = None  # Ray node id, host name, device and pid, once the actor has said
    host: str | None = None
    device: str | None = None
    pid: int | None = None
    run: str | None = None  # the job whose work the actor is doing (None: idle)
    kind: str = "cpu"  # "gpu" or "cpu": what quotas count it as
    # The share (user, project) its work is for, while busy: what fair share and quotas
    # count (kept until the slot is free, even when its run is already forgotten).
    user: str | None = None
    project: str | None = None
    blender: str | None = None  # the Blender version its worker runs (None: none yet)
    sign_at: float = 0.0  # monotonic time of the last sign that the work progresses
    killed: str | None = None  # why the dispatcher stopped its render (a hang, a cancel)
    killed_at: float = 0.0  # monotonic time it was told to stop
    # Monotonic time it last became idle: an autoscaled farm releases actors idle long
    # enough (``Pool.release``) so that their nodes can go.
    idle_at: float = field(default_factory=time.monotonic)


@dataclass
class Run:
    """A PROCESSING job inside the dispatcher."""

    job: JobRecord
    scene_hash: str  # the input folder's digest
    inputs: Inputs
    score: float  # queue score: priority, then age
    grid: tuple[int, int] | None = None  # tiles per frame; None until 'auto' is decided
    slices: int | None = 1  # sample slices per frame; None until 'auto' is decided
    probing: bool = False  # an actor is inspecting the scene to decide 'auto'
    pending: deque[RenderTask] = field(default_factory=deque)
    failed_on: dict[str, set[int]] = field(default_factory=dict)  # task key -> slot indexes
    tries: dict[str, int] = field(default_factory=dict)  # task key -> its current attempt
    node_failures: dict[str, int] = field(default_factory=dict)  # node id -> failed tasks
    blocked: set[str] = field(default_factory=set)  # nodes this job avoids
    warned: set[str] = field(default_factory=set)  # warnings already in the job's events
    render_s: dict[int, float] = field(default_factory=dict)  # frame -> its tiles' seconds
    device_reported: bool = False
    stopped: bool = False
    # Render seconds of recent whole-frame tasks (sizes batches).
    frame_s: deque[float] = field(default_factory=lambda: deque(maxlen=MEASURED_TASKS))
    solo: set[str] = field(default_factory=set)  # task keys that run alone from now on
    urgent: bool = False  # an admin's mark: before every share's work
    # Sliced frames: each one's samples landed so far, the share of its samples its
    # stored preview holds, and how often each slice lost its slot (task key -> losses).
    sampled: dict[int, FrameSamples] = field(default_factory=dict)
    previewed: dict[int, float] = field(default_factory=dict)
    losses: dict[str, int] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def user(self) -> str:
        return self.job.owner

    @property
    def project(self) -> str:
        """The job's project; "" for none (those jobs share as one project)."""
        return self.job.spec.project or ""

    @property
    def priority(self) -> int:
        return self.job.spec.priority

    @property
    def blender(self) -> str | None:
        """The Blender version the job renders with (chosen when it was submitted)."""
        return self.job.rendered_by

    def is_batchable(self, task: RenderTask) -> bool:
        """Whether ``task`` may share an actor call: a whole frame that has not failed
        (a retry runs alone, on another actor) and was not in a batch whose actor died
        (alone, a crash is charged to the task that caused it)."""
        if task.is_part:
            return False
        key = task_key(task)
        return key not in self.failed_on and key not in self.solo

    def batch_size(self, actors: int) -> int:
        """Tasks per call for this run now: 1 until its whole frames are measured short,
        then enough for a batch to last ``BATCH_S``, at most ``MAX_BATCH`` and at most a
        fair share (pending tasks over ``actors``), so no actor waits while another
        holds a long batch."""
        if self.grid != (1, 1) or self.slices != 1 or not self.frame_s:
            return 1
        mean_s = sum(self.frame_s) / len(self.frame_s)
        if mean_s >= SHORT_TASK_S:
            return 1
        size = MAX_BATCH if mean_s * MAX_BATCH <= BATCH_S else int(BATCH_S / mean_s)
        fair = -(-len(self.pending) // max(1, actors))
        return max(1, min(size, fair))

    def take_batch(self, first: RenderTask, size: int) -> list[RenderTask]:
        """Remove ``first`` and up to ``size - 1`` more batchable pending tasks, in queue
        order, and return them; tasks passed over keep their place."""
        self.pending.remove(first)
        batch = [first]
        if size <= 1 or not self.is_batchable(first):
            return batch
        skipped: list[RenderTask] = []
        while self.pending and len(batch) < size and len(skipped) < BATCH_LOOKAHEAD:
            task = self.pending.popleft()
            (batch if self.is_batchable(task) else skipped).append(task)
        self.pending.extendleft(reversed(skipped))
        return batch

    @property
    def is_split(self) -> bool:
        """Whether its frames render in parts (tiles, slices) the assembler merges."""
        return self.grid != (1, 1) or (self.slices or 1) > 1

    def template(self) -> RenderTask:
        """A whole-frame task of the job's first frame (what an actor inspects)."""
        return next(expand(self.job, self.scene_hash, set(), (1, 1)))


def task_key(task: RenderTask) -> str:
    """The key of ``task`` in the job's tasks and events (``keys.task_key``)."""
    return keys.task_key(task.frame, task.tile, task.slice if task.is_sliced else None)


def expand(
    job: JobRecord, scene_hash: str, done_frames: set[int], grid: tuple[int, int], slices: int = 1
) -> Iterator[RenderTask]:
    """The job's (frame, tile, slice) tasks for a ``grid`` of tiles and ``slices`` sample
    slices, in its render order (frame order, or ``order="preview"``'s), skipping frames
    already stored. A frame's tasks go slice by slice (its first slice of every tile, then
    its second, ...), so the frame's first whole preview comes soonest."""
    spec = job.spec
    nx, ny = grid
    for frame in spec.render_order:
        if frame in done_frames:
            continue
        for index, tile in ((i, t) for i in range(slices) for t in range(nx * ny)):
            yield RenderTask(
                job_id=job.id,
                scene_hash=scene_hash,
                frame=frame,
                tile=tile,
                tiles=(nx, ny),
                scene=spec.scene,
                camera=spec.camera,
                samples=spec.samples,
                resolution_percentage=spec.resolution_percentage,
                format=spec.format,
                color_depth=spec.depth,
                denoise=spec.denoise,
                allow_missing=spec.allow_missing,
                scripts=spec.scripts,
                blender=job.rendered_by,
                slice=index,
                slices=slices,
            )
