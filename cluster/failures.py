"""The dispatcher's part for a task that failed: retried on another actor up to the
job's ``max_retries`` (a frame that failed to assemble: all its parts), with no retry
spent when its node left or a slice's slot was lost, a node blocked for a job once it
failed it ``node_failure_limit`` times, what a lost batch held queued again, and the
job FAILED with the reason once retries are spent or the error is fatal.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from rayfarm.cluster.dispatch_state import DispatchState, failure_cause, slot_fields, task_fields
from rayfarm.cluster.pool import actor_died
from rayfarm.cluster.runs import Run, Slot, task_key
from rayfarm.cluster.slicing import MAX_SLICE_LOSSES, lost_slot
from rayfarm.errors import FarmError, InvalidTransition
from rayfarm.models import JobState
from rayfarm.render.tasks import FATAL, RenderTask

__all__ = ["Failures"]

log = logging.getLogger("rayfarm.dispatcher")


class Failures(DispatchState):
    """Retries a failed task or fails its job (see the module)."""

    async def _batch_lost(
        self, slot: Slot, run: Run, tasks: list[RenderTask], exc: Exception
    ) -> None:
        """A batch's call failed as a whole (its actor died, or its node left): nothing
        of it came back, and which task was running is unknown. Every task is queued
        again with no retry spent; unless the node left, each runs alone from now on,
        where a crash is charged to the task that caused it."""
        place, host = slot_fields(slot), slot.host or slot.node  # before a replaced actor's reset
        killed, cause = slot.killed, failure_cause(exc, slot)  # before the actor's replacement
        died = actor_died(exc, slot)
        node_left = died and self.pool.lost(slot, exc)
        if run.stopped:
            return
        if node_left:
            why = f"its node {host} left the cluster"
        elif killed:
            why = f"{killed} during a batch of {len(tasks)} tasks; they run again alone"
        elif died:
            why = f"its actor died during a batch of {len(tasks)} tasks; it runs again alone"
        else:
            why = f"a batch of {len(tasks)} tasks failed ({cause}); it runs again alone"
        failed = []
        for task in tasks:
            key = task_key(task)
            if not node_left:
                run.solo.add(key)
            failed.append({"task": key, "frame": task.frame, "tile": task.tile,
                           "attempt": run.tries.get(key, 1), "error": f"frame {task.frame}: {why}",
                           "retry": True, **place})  # fmt: skip
        await self.store.add_events(run.id, "task_failed", failed)
        await self._requeue_unstarted(run, tasks)

    async def _requeue_unstarted(self, run: Run, tasks: list[RenderTask]) -> None:
        """Put tasks of a batch that did not run back at the front of the queue, in
        order, with a ``task_retried`` event each and no retry spent."""
        if run.stopped or not tasks:
            return
        await self.store.add_events(
            run.id, "task_retried",
            [{"task": key, "frame": t.frame, "tile": t.tile, "attempt": run.tries.get(key, 1) + 1}
             for t in tasks for key in (task_key(t),)],
        )  # fmt: skip
        run.pending.extendleft(reversed(tasks))

    async def _task_failed(
        self,
        slot: Slot,
        run: Run,
        task: RenderTask,
        exc: Exception,
        whole_frame: bool = False,
        output: str | None = None,
    ) -> None:
        """Retry the task (or, when a frame failed to assemble, all its tiles) elsewhere,
        or fail the job once its retries are spent or the error is fatal. ``output``:
        Blender's output during the task when the caller has it (else the actor is
        asked for its last task's)."""
        cause = failure_cause(exc, slot)
        key = task_key(task)
        place = slot_fields(slot)
        died = actor_died(exc, slot)
        stopped_by_us = slot.killed is not None  # a hang or a cancel: not a lost slot
        if output is not None and not run.stopped:
            await self._keep_log(run, key, run.tries.get(key, 1), output)
        elif not died and not run.stopped:
            try:
                text = await asyncio.wait_for(slot.handle.task_log.remote(), 10)
                await self._keep_log(run, key, run.tries.get(key, 1), text)
            except Exception:
                pass  # the log is a courtesy; the failure is reported either way
        node_left = died and self.pool.lost(slot, exc)
        if run.stopped:
            return
        where = f"frame {task.frame}" + (f" tile {task.tile}" if task.is_tiled else "")
        if task.is_sliced:
            where += f" slice {task.slice + 1} of {task.slices}"
        attempt = run.tries.get(key, 1)
        if node_left:
            # Not the task's fault: it runs again elsewhere, and no retry is spent.
            await self.store.event(
                run.id, "task_failed", **task_fields(task), attempt=attempt,
                error=f"{where}: its node {slot.host or slot.node} left the cluster",
                retry=True, **place,
            )  # fmt: skip
            await self._requeue(run, task, attempt, whole_frame)
            return
        lost = None
        if task.is_sliced and not whole_frame and not stopped_by_us:
            lost = lost_slot(cause, died)
        if lost is not None and run.losses.get(key, 0) < MAX_SLICE_LOSSES - 1:
            # Preemption (rayfarm.cluster.slicing): the slice alone renders again, with
            # the same samples, whatever the job's max_retries.
            run.losses[key] = run.losses.get(key, 0) + 1
            await self.store.event(
                run.id, "task_failed", **task_fields(task), attempt=attempt,
                error=f"{where}: {lost}, so its slot was lost mid-slice: this slice alone "
                "renders again, with the same samples, and no retry is spent",
                retry=True, lost=True, **place,
            )  # fmt: skip
            await self._requeue(run, task, attempt, whole_frame=False)
            return
        message = f"{where}: {cause}"
        fatal = isinstance(cause, FarmError) and bool(cause.detail.get(FATAL))
        attempts = await self.store.add_attempt(run.id, key)
        run.failed_on.setdefault(key, set()).add(slot.index)
        retry = not fatal and attempts <= run.job.spec.max_retries
        await self.store.count(tasks_failed_total=1)
        await self.store.event(
            run.id, "task_failed", **task_fields(task), attempt=attempt, error=str(cause),
            retry=retry, **place,
        )  # fmt: skip
        if not fatal and slot.node:
            await self._count_node_failure(run, slot)
        if not retry:
            if not fatal:
                message += f" (failed {attempts} times)"
            self._stop(run, halt="the job failed", spare=slot)
            await self._fail(run.id, message)
            return
        await self._requeue(run, task, attempt, whole_frame)

    async def _count_node_failure(self, run: Run, slot: Slot) -> None:
        """Block a node for this job once its actors failed it ``node_failure_limit``
        times (a bad driver, a full disk: the node, not the task)."""
        assert slot.node is not None
        failures = run.node_failures[slot.node] = run.node_failures.get(slot.node, 0) + 1
        if failures == self.settings.node_failure_limit:
            run.blocked.add(slot.node)
            await self.store.event(
                run.id, "warning", message=f"node {slot.host} ({slot.node[:12]}) failed "
                f"{failures} tasks of this job; the job avoids it from now on",
            )  # fmt: skip

    async def _requeue(self, run: Run, task: RenderTask, attempt: int, whole_frame: bool) -> None:
        """Put a failed task (or, when a frame failed to assemble, all its parts) at the
        front of the queue."""
        await self.store.event(run.id, "task_retried", **task_fields(task), attempt=attempt + 1)
        if whole_frame:
            # A frame that failed to merge or store: its parts are gone or suspect, so
            # every part of it renders again (its preview so far stays until a newer one).
            nx, ny = task.tiles
            parts = [replace(task, tile=t, slice=s) for s in range(task.slices)
                     for t in range(nx * ny)]  # fmt: skip
            self.assembler.drop.remote(run.id, task.frame)
            run.sampled.pop(task.frame, None)
            await self.store.forget_tasks(run.id, [task_key(p) for p in parts])
            run.pending.extendleft(reversed(parts))
        else:
            run.pending.appendleft(task)

    async def _fail(self, job_id: str, message: str) -> None:
        try:
            await self.store.transition(job_id, JobState.FAILED, error=message)
        except InvalidTransition:
            pass
