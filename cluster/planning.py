"""The dispatcher's part between the queue and the slots.

Admission reads the queued jobs (owner, project, dependencies, urgency) and asks the
scheduler (``rayfarm.cluster.scheduler``) which may start now, under fair share, quotas
and dependencies; it says why the others wait, and tells the scaler what the queue
needs. A started job's tiling and slices are decided (an actor probes the scene for
``tiles="auto"`` and ``slices="auto"``) and its tasks planned; each round, the
scheduler's plan gives each free slot its next task or batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from rayfarm.cluster.demand import demand
from rayfarm.cluster.dispatch_state import DispatchState, failure_cause, task_fields
from rayfarm.cluster.job_index import is_urgent_score, queue_score
from rayfarm.cluster.pool import actor_died
from rayfarm.cluster.runs import Run, Slot, expand
from rayfarm.cluster.scheduler import Admission, Plan, Queued
from rayfarm.cluster.slicing import auto_slices
from rayfarm.errors import BlenderNotOffered, FarmError, InvalidTransition
from rayfarm.models import JobSpec, JobState, grid_of
from rayfarm.render.inputs import Inputs
from rayfarm.render.tasks import FATAL
from rayfarm.render.tiles import auto_grid

__all__ = ["Planning"]

log = logging.getLogger("rayfarm.dispatcher")

#: Queued jobs looked at per admission round (jobs blocked by a dependency or a quota
#: stay queued: those behind them are looked at too).
QUEUE_SCAN = 200
#: How long what the dispatcher read of a queued job (owner, project, dependencies) is
#: trusted before it is read again (a change through the API also says so: ``notify``).
QUEUED_TTL_S = 5.0


class Planning(DispatchState):
    """Starts queued jobs and hands their tasks to free slots (see the module)."""

    #: Queued jobs as admission sees them (read once per ``QUEUED_TTL_S``) and when.
    _queued: dict[str, Queued]
    _queued_at: float
    #: The reason each waiting job was last said to wait (job id -> reason).
    _waiting: dict[str, str]

    async def _admit(self) -> None:
        """Start the queued jobs the scheduler admits (``Scheduler.admit``), fail those
        whose dependencies failed, and say why the others wait."""
        head = await self.store.queue_head(QUEUE_SCAN)
        queued = await self._queued_jobs(head)
        deps = [d for q in queued for d in q.depends_on]
        states = await self.store.states(deps) if deps else {}
        admission = self.scheduler.admit(queued, states, self.runs.values(), self.slots,
                                         self.policy)  # fmt: skip
        self._scale(queued, admission)
        for job_id, reason in admission.fail.items():
            await self._fail(job_id, reason)
        for job_id in admission.fail:
            self._waiting.pop(job_id, None)
        # Forget reasons of jobs that left the queue (cancelled, deleted) unseen.
        here = {job_id for job_id, _ in head}
        for job_id in [j for j in self._waiting if j not in here and j not in self.runs]:
            del self._waiting[job_id]
        # A job that could start but for the slots the cluster is still adding says so.
        growing = self.scaler.waiting_reason()
        waiting = {
            q.id: admission.wait.get(q.id) or (None if q.id in admission.start else growing)
            for q in queued
            if q.id not in admission.fail
        }
        await self._say_waiting(waiting)
        for job_id in admission.start:
            try:
                await self.store.transition(job_id, JobState.PROCESSING)
            except (InvalidTransition, FarmError):
                continue  # cancelled or gone meanwhile
            self._waiting.pop(job_id, None)  # the transition cleared its detail
            try:
                await self._start_run(job_id)
            except Exception as exc:
                if not isinstance(exc, FarmError):
                    log.exception("could not start job %s", job_id)
                self.runs.pop(job_id, None)
                await self._fail(job_id, f"could not start the job: {exc}")

    def _scale(self, queued: list[Queued], admission: Admission) -> None:
        """The farm's work by pool (runs, and queued jobs that may start) becomes its
        request for render nodes (``rayfarm.cluster.scaler``; a no-op unless autoscaling
        is on, but for the figures ``/metrics`` shows)."""
        startable = [q for q in queued if q.id not in admission.fail
                     and q.id not in admission.wait and q.id not in self.runs]  # fmt: skip
        pools = demand(self.runs.values(), self.slots, startable, self.pool.seen_kind,
                       self.settings.blender[0], self.policy)  # fmt: skip
        nodes = self.scaler.render_nodes() if self.scaler.enabled else len(
            {s.node for s in self.slots if s.node})  # fmt: skip
        self.scaler.update(pools, self.pool.seen_capacity, nodes)

    async def _queued_jobs(self, head: list[tuple[str, float]]) -> list[Queued]:
        """The queue's head as the scheduler sees it: owner, project, priority, tasks and
        dependencies of each job (read once per ``QUEUED_TTL_S``), urgent from its score."""
        now = time.monotonic()
        if now - self._queued_at > QUEUED_TTL_S:
            self._queued.clear()
            self._queued_at = now
        unknown = [job_id for job_id, _ in head if job_id not in self._queued]
        if unknown:
            found = await self.store.fields_of(
                unknown, ["owner", "spec", "tasks_total", "rendered_by"]
            )
            for job_id, (owner, spec_json, tasks, blender) in zip(unknown, found, strict=True):
                if spec_json is None:
                    continue  # deleted meanwhile
                spec = JobSpec.model_validate_json(spec_json)
                self._queued[job_id] = Queued(
                    job_id, owner or "", spec.project or "", spec.priority, int(tasks or 0),
                    depends_on=spec.depends_on or (), blender=blender or None,
                )  # fmt: skip
        queued = []
        for job_id, score in head:
            known = self._queued.get(job_id)
            if known is not None:
                queued.append(replace(known, urgent=is_urgent_score(score)))
        return queued

    async def _say_waiting(self, reasons: dict[str, str | None]) -> None:
        """Say why each job waits (None: it no longer waits for anything but a slot),
        when that changed since it was last said: a ``waiting`` event and its detail."""
        for job_id, reason in reasons.items():
            if self._waiting.get(job_id) == reason:
                continue
            if reason is None:
                self._waiting.pop(job_id, None)
            else:
                self._waiting[job_id] = reason
            await self.store.set_detail(job_id, reason)

    async def _start_run(self, job_id: str) -> None:
        job = await self.store.get(job_id)
        offered = self.settings.blender
        if job.rendered_by is None:  # queued before the farm offered versions: the newest
            job = job.model_copy(update={"rendered_by": offered[0]})
            await self.store.set_fields(job_id, rendered_by=offered[0])
        elif job.rendered_by not in offered:
            raise BlenderNotOffered(
                f"the job renders with Blender {job.rendered_by}, which this farm no longer "
                f"offers (it offers {', '.join(offered)})",
                {"requested": job.rendered_by, "offered": list(offered)},
            )
        inputs = Inputs.from_json(self.settings.storage, await self.store.inputs(job_id))
        run = Run(
            job=job,
            scene_hash=inputs.digest,
            inputs=inputs,
            score=queue_score(job.spec.priority, job.created_at.isoformat()),
            urgent=job.urgent,
        )
        self.runs[job_id] = run
        await self.store.event(job_id, "started")
        # Fixed, or 'auto' decided before a restart; else _schedule sends the scene to an
        # actor to decide 'auto' (_probe).
        grid = grid_of(job.tiles) if job.tiles else job.spec.tile_grid
        slices = job.slices or job.spec.slice_count
        if grid is not None and slices is not None:
            await self._plan(run, grid, slices)
            return
        run.grid, run.slices = grid, slices
        frames = await self._frames_left(run)
        if frames >= len(self.slots):
            # 'auto' needs no look at the scene to say "whole": frames keep every slot busy.
            whole = auto_grid(frames, len(self.slots), 1, 1, 0.0, 0.0)
            one = (1, f"{frames} frames for {len(self.slots)} actors: all samples in one task")
            await self._decide(
                run, whole if grid is None else None, one if slices is None else None
            )

    async def _frames_left(self, run: Run) -> int:
        done = set(await self.store.frames_done(run.id))
        return len([f for f in run.job.spec.frame_list if f not in done])

    async def _decide(
        self,
        run: Run,
        tiles: tuple[tuple[int, int], str] | None,
        slices: tuple[int, str] | None,
    ) -> None:
        """Record what ``tiles="auto"`` (the grid, and why) and ``slices="auto"`` (the
        count, and why) chose (None: the job fixed it) and plan the run with it."""
        grid = tiles[0] if tiles else run.grid
        count = slices[0] if slices else run.slices
        assert grid is not None and count is not None
        nx, ny = grid
        tasks = run.job.frames_total * nx * ny * count
        await self.store.set_fields(
            run.id, tiles=_tiles(grid), slices=str(count), tasks_total=str(tasks)
        )
        if tiles is not None:
            await self.store.event(run.id, "tiles", tiles=_tiles(grid), reason=tiles[1],
                                   tasks=tasks)  # fmt: skip
        if slices is not None:
            await self.store.event(run.id, "slices", slices=count, reason=slices[1],
                                   tasks=tasks)  # fmt: skip
        await self._plan(run, grid, count)

    async def _plan(self, run: Run, grid: tuple[int, int], slices: int = 1) -> None:
        done = set(await self.store.frames_done(run.id))
        run.grid, run.slices = grid, slices
        if run.is_split:
            _ = self.assembler  # started now, while the first parts render
        run.pending.extend(expand(run.job, run.scene_hash, done, grid, slices))
        await self.store.event(
            run.id, "planned", tiles=_tiles(grid), **({"slices": slices} if slices > 1 else {}),
            tasks=len(run.pending),
        )  # fmt: skip
        await self.store.add_events(run.id, "task_queued", [task_fields(t) for t in run.pending])
        if not run.pending:
            await self._complete(run)

    def _schedule(self) -> None:
        """Hand the idle actors what the scheduler chose (``Scheduler.plan``)."""
        plan = self.scheduler.plan(self.runs.values(), self.slots, self.policy)
        for a in plan.assignments:
            self._assign(a.slot, a.run, a.tasks)
            if not a.tasks:
                work = self._probe(a.slot, a.run)
            elif len(a.tasks) == 1:
                work = self._execute(a.slot, a.run, a.tasks[0])
            else:
                work = self._execute_batch(a.slot, a.run, a.tasks)
            asyncio.get_running_loop().create_task(self._guarded(work))
        changed = self._waiting_changes(plan)
        if changed:
            asyncio.get_running_loop().create_task(self._guarded(self._say_waiting(changed)))

    def _waiting_changes(self, plan: Plan) -> dict[str, str | None]:
        """Runs whose reason to wait changed with this plan. Only a plan that left actors
        idle says why each run waits (a quota); while every actor is busy, what was said
        stands (a run capped by its quota takes each slot it frees again: it still
        waits for more, and says so once, not once per task)."""
        changed: dict[str, str | None] = {}
        if plan.idle and (plan.waiting or self._waiting):
            for run_id in self.runs:
                reason = plan.waiting.get(run_id)
                if reason != self._waiting.get(run_id):
                    changed[run_id] = reason
        return changed

    async def _probe(self, slot: Slot, run: Run) -> None:
        """Decide ``tiles="auto"`` and ``slices="auto"`` for a job with fewer frames than
        actors: an actor opens the scene (and keeps it open for the job's tasks) and
        measures the frame's size, render time and per-tile cost; the grid follows from
        those and the pool, then the slices from those, the grid, the slots free for the
        job and the farm's target task time (``slice_target_s``)."""
        assert self._wake is not None
        try:
            info = await slot.handle.inspect.remote(run.template(), run.inputs)
            slot.holds = run.scene_hash
            if run.stopped:
                return
            frames = await self._frames_left(run)
            tiles = None
            if run.grid is None:
                tiles = auto_grid(frames, len(self.slots), info["width"], info["height"],
                                  info["frame_s"], info["tile_cost_s"])  # fmt: skip
            slices = None
            if run.slices is None:
                nx, ny = tiles[0] if tiles else (run.grid or (1, 1))
                # Free for this job: idle slots, and those already working for it.
                free = sum(not s.busy or s.run == run.id for s in self.slots)
                slices = auto_slices(
                    frames, free, nx * ny, info["frame_s"], info["tile_cost_s"],
                    int(info["samples"]), self.settings.slice_target_s,
                )  # fmt: skip
            await self._decide(run, tiles, slices)
        except Exception as exc:
            cause = failure_cause(exc, slot)
            if actor_died(exc, slot) and self.pool.lost(slot, exc):
                return  # the node left: another actor probes
            attempts = await self.store.add_attempt(run.id, "probe")
            fatal = isinstance(cause, FarmError) and bool(cause.detail.get(FATAL))
            if not run.stopped and (fatal or attempts > run.job.spec.max_retries):
                self._stop(run)
                await self._fail(run.id, str(cause))
        finally:
            run.probing = False
            self._releaser(slot, run, [])()


def _tiles(grid: tuple[int, int]) -> str:
    return "1" if grid == (1, 1) else f"{grid[0]}x{grid[1]}"
