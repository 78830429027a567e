"""What the dispatcher's parts share. ``Dispatcher`` (``rayfarm.cluster.dispatcher``) is
one Ray actor assembled from parts, each a module a change usually stays inside:

- ``planning.Planning``: from the queue to the slots (admission, tiling and slices,
  the autoscaler's request, why a job waits, which task goes to which free slot);
- ``execution.Execution``: a task or batch on a render actor and what it returns
  (tiles and slices joined, previews, frames stored, the job completed);
- ``failures.Failures``: a task that failed (retried elsewhere, or the job failed);
- ``dispatcher.Dispatcher``: the actor itself, its remote API, its loop, the pool of
  render actors and the hang watch.

``DispatchState`` declares the state ``Dispatcher.__init__`` sets and, for each method
one part calls in another, its signature (the part that defines it is named beside
it), so that each part reads on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ray.exceptions import RayTaskError

from rayfarm.cluster.policy import PolicyStore
from rayfarm.cluster.pool import Pool
from rayfarm.cluster.runs import Run, Slot, task_key
from rayfarm.cluster.scaler import Scaler
from rayfarm.cluster.scheduler import Policy, Scheduler
from rayfarm.cluster.settings import Settings
from rayfarm.cluster.storage import Storage
from rayfarm.cluster.store import JobStore
from rayfarm.errors import RenderError
from rayfarm.render.tasks import RenderTask

__all__ = ["DispatchState", "failure_cause", "slot_fields", "task_fields"]


class DispatchState:
    """The dispatcher's state and the methods its parts call across (see the module)."""

    settings: Settings
    redis: Any
    store: JobStore
    storage: Storage
    pool: Pool
    scaler: Scaler
    scheduler: Scheduler
    policies: PolicyStore
    policy: Policy
    #: The jobs being rendered, by id.
    runs: dict[str, Run]
    #: One preview of a sliced frame stored at a time.
    _previewing: asyncio.Lock
    _assembler: Any
    inspector: Any
    _inspecting: int
    _inspected_at: float
    _wake: asyncio.Event | None
    _full_round: bool
    #: (job, frame, tile, slice) -> the slot rendering it: progress reaches the hang watch.
    _doing: dict[tuple[str, int, int, int], Slot]
    _resync: bool
    _loop: asyncio.Task[None] | None

    def _stop(self, run: Run, halt: str | None = None, spare: Slot | None = None) -> None:
        raise NotImplementedError  # Dispatcher._stop

    @property
    def assembler(self) -> Any:
        raise NotImplementedError  # Dispatcher.assembler

    def _assign(self, slot: Slot, run: Run, tasks: list[RenderTask]) -> None:
        raise NotImplementedError  # Dispatcher._assign

    async def _guarded(self, work: Any) -> None:
        raise NotImplementedError  # Dispatcher._guarded

    @property
    def slots(self) -> list[Slot]:
        raise NotImplementedError  # Dispatcher.slots

    async def _keep_log(self, run: Run, key: str, attempt: int, text: str) -> None:
        raise NotImplementedError  # Execution._keep_log

    async def _complete(self, run: Run) -> None:
        raise NotImplementedError  # Execution._complete

    async def _execute(self, slot: Slot, run: Run, task: RenderTask) -> None:
        raise NotImplementedError  # Execution._execute

    async def _execute_batch(self, slot: Slot, run: Run, tasks: list[RenderTask]) -> None:
        raise NotImplementedError  # Execution._execute_batch

    def _releaser(self, slot: Slot, run: Run, tasks: list[RenderTask]) -> Callable[[], None]:
        raise NotImplementedError  # Execution._releaser

    async def _batch_lost(
        self, slot: Slot, run: Run, tasks: list[RenderTask], exc: Exception
    ) -> None:
        raise NotImplementedError  # Failures._batch_lost

    async def _fail(self, job_id: str, message: str) -> None:
        raise NotImplementedError  # Failures._fail

    async def _requeue_unstarted(self, run: Run, tasks: list[RenderTask]) -> None:
        raise NotImplementedError  # Failures._requeue_unstarted

    async def _task_failed(
        self,
        slot: Slot,
        run: Run,
        task: RenderTask,
        exc: Exception,
        whole_frame: bool = False,
        output: str | None = None,
    ) -> None:
        raise NotImplementedError  # Failures._task_failed


def failure_cause(exc: Exception, slot: Slot) -> Exception:
    """What to report for a failed actor call: why the dispatcher killed the actor, the
    exception raised in the actor, or ``exc`` itself."""
    if slot.killed is not None:
        return RenderError(slot.killed)
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


def slot_fields(slot: Slot) -> dict[str, Any]:
    """Where a task runs, as its events say: actor, node, host, device, process."""
    return {
        "actor": slot.index,
        "node": slot.node or "",
        "host": slot.host or "",
        "device": slot.device or "",
        "pid": slot.pid or 0,
    }


def task_fields(task: RenderTask) -> dict[str, Any]:
    """A task's fields in its events: key, frame, tile, and a sliced frame's slice."""
    named: dict[str, Any] = {"task": task_key(task), "frame": task.frame, "tile": task.tile}
    if task.is_sliced:
        named["slice"] = task.slice
    return named
