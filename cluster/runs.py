"""What the dispatcher keeps in memory: its actor slots and the jobs it is running.

Everything here can be rebuilt from Redis (a restarted dispatcher does); the
task list of a run is the job's (frame, tile) grid minus the frames already stored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rayfarm.models import Job
from rayfarm.render.inputs import Inputs
from rayfarm.render.tasks import RenderTask

__all__ = ["Run", "Slot", "expand"]


@dataclass
class Slot:
    """One RenderActor and what the dispatcher knows of it."""

    index: int
    handle: Any
    busy: bool = False
    holds: str | None = None  # content hash of the scene it has open
    node: str | None = None  # Ray node id, host name and device, once the actor has said
    host: str | None = None
    device: str | None = None


@dataclass
class Run:
    """A PROCESSING job inside the dispatcher."""

    job: Job
    scene_hash: str  # the input folder's digest
    inputs: Inputs
    score: float  # queue score: priority, then age
    grid: tuple[int, int] | None = None  # tiles per frame; None until 'auto' is decided
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

    @property
    def id(self) -> str:
        return self.job.id

    def template(self) -> RenderTask:
        """A whole-frame task of the job's first frame (what an actor inspects)."""
        return next(expand(self.job, self.scene_hash, set(), (1, 1)))


def expand(
    job: Job, scene_hash: str, done_frames: set[int], grid: tuple[int, int]
) -> Iterator[RenderTask]:
    """The job's (frame, tile) tasks for a ``grid`` of tiles, in frame order, skipping
    frames already stored."""
    spec = job.spec
    nx, ny = grid
    for frame in spec.frame_list:
        if frame in done_frames:
            continue
        for tile in range(nx * ny):
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
            )
