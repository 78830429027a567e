"""The dispatcher: a named, detached, async Ray actor that turns queued jobs into
(frame, tile) tasks and hands them to a pool of RenderActors.

- Which queued job starts and which task goes to which idle actor is the scheduler's
  policy (``rayfarm.cluster.scheduler``: fair share between projects and users, quotas,
  dependencies, urgent jobs, Blender versions, scene affinity, failed-on avoidance);
  this actor does the I/O around its decisions: it reads the queue, the jobs'
  dependencies and the admins' policy (``rayfarm.cluster.policy``) from Redis, starts
  the jobs and the tasks it chose, and says why a job waits (a ``waiting`` event and
  the job's ``detail``). Each job renders with the Blender version chosen when it was
  submitted (``rayfarm.versions``); an actor runs one version at a time in its worker
  process and switches when a task of another version comes.
- Short whole-frame tasks go in batches (``Run.batch_size``): once a job's frames are
  measured short (well under a second), an actor gets several per call, so a farm of
  quick frames is not bound by one actor call, Redis round trip and storage hop per
  task. In a batch, every task's ``task_started`` is written when the batch is handed
  to the actor; the actor renders them in order and stops at the first failure. Tasks
  finished before it are done (one Redis script records them all, with their frames
  stored in one thread hop); the failed task takes the normal failure path (a retry
  on another actor, or the job fails); the tasks after it go back to the queue with a
  ``task_retried`` event and no retry spent. If the actor dies mid-batch, nothing of
  the batch came back: every task gets ``task_failed`` (``retry``) and is queued again
  with no retry spent, to run alone (a second crash is then charged to its task as
  for any task; a node that left spends no retries either way).
- A failed task is retried on another actor up to the job's ``max_retries``;
  then the job is FAILED with the reason. A scene bpy cannot open, or a spec
  the file cannot satisfy, fails the job at once (no retry can fix it).
- ``tiles="auto"``: a job with at least as many frames as actors renders whole
  frames; for a shorter one, an actor first opens the scene and measures its frame
  size, render time and per-tile cost, and ``auto_grid`` picks the tiling.
- Each tile goes to the TileAssembler as soon as it is rendered (and leaves the
  object store once copied into its frame). When a frame's last tile lands, the
  actor that rendered it finishes the frame (denoise, compositor, colour, format)
  and the frame is written to storage whole. The job is COMPLETED when every
  frame is stored.
- Cancel and the hang watch stop a render by stopping the actor's Blender worker
  (``interrupt``); the actor stays. Only an actor that does not answer that within
  ``INTERRUPT_GRACE_S`` is killed (and replaced).
- Its state lives in Redis: a restarted dispatcher rebuilds its runs from there.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from rayfarm.cluster import keys
from rayfarm.cluster import storage as layout
from rayfarm.cluster.demand import demand
from rayfarm.cluster.event_log import now_iso
from rayfarm.cluster.job_index import is_urgent_score, queue_score
from rayfarm.cluster.policy import PolicyStore
from rayfarm.cluster.pool import Pool, actor_died
from rayfarm.cluster.post import encode_video
from rayfarm.cluster.progress import NOT_PROCESSING, Finished
from rayfarm.cluster.runs import Run, Slot, expand, task_key
from rayfarm.cluster.scaler import Scaler
from rayfarm.cluster.scheduler import Admission, Plan, Policy, Queued, Scheduler
from rayfarm.cluster.settings import DISPATCHER_NAME, NAMESPACE, Settings
from rayfarm.cluster.slicing import MAX_SLICE_LOSSES, FrameSamples, auto_slices, lost_slot
from rayfarm.cluster.storage import Storage
from rayfarm.cluster.store import JobStore, connect
from rayfarm.errors import BlenderNotOffered, FarmError, InvalidTransition, RenderError
from rayfarm.models import JobSpec, JobState, grid_of
from rayfarm.render.assembler import TileAssembler
from rayfarm.render.inputs import Inputs, check_path
from rayfarm.render.tasks import FATAL, BatchResult, RenderTask, TaskResult
from rayfarm.render.tiles import auto_grid

__all__ = ["Dispatcher", "get_dispatcher", "start_dispatcher"]

log = logging.getLogger("rayfarm.dispatcher")

POLL_INTERVAL_S = 1.0
#: Queued jobs looked at per admission round (jobs blocked by a dependency or a quota
#: stay queued: those behind them are looked at too).
QUEUE_SCAN = 200
#: How long what the dispatcher read of a queued job (owner, project, dependencies) is
#: trusted before it is read again (a change through the API also says so: ``notify``).
QUEUED_TTL_S = 5.0
#: How long an actor told to stop its render (``interrupt``) has before it is killed.
INTERRUPT_GRACE_S = 10.0


class Dispatcher:
    """Create with ``start_dispatcher``; talk to it with ``notify`` / ``stats``."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings.from_dict(settings)
        self.redis: Any = connect(self.settings.redis_url)
        self.store = JobStore(self.redis)
        self.storage = Storage(self.settings.storage)
        self.pool = Pool(self.settings)
        self.scaler = Scaler(self.settings)
        self.scheduler = Scheduler()
        self.policies = PolicyStore(self.redis)
        self.policy = Policy()
        self.runs: dict[str, Run] = {}
        # Queued jobs as admission sees them (read once per QUEUED_TTL_S), and the reason
        # each waiting job was last said to wait (job id -> reason).
        self._queued: dict[str, Queued] = {}
        self._queued_at = 0.0
        self._waiting: dict[str, str] = {}
        self._previewing = asyncio.Lock()  # one preview of a sliced frame stored at a time
        self._assembler: Any = None  # the TileAssembler, once a split job needs it
        self.inspector: Any = None
        self._inspecting = 0  # catalogue calls in flight
        self._inspected_at = 0.0  # when the last one ended (monotonic)
        self._wake: asyncio.Event | None = None
        self._full_round = True  # reconcile the pool, sync runs and admit next round
        # (job, frame, tile, slice) -> the slot rendering it: progress reports reach the
        # hang watch.
        self._doing: dict[tuple[str, int, int, int], Slot] = {}
        # Redis failed under a run's bookkeeping (restarted, unreachable): once it answers
        # again, every run is rebuilt from what Redis holds, as after a restart.
        self._resync = False
        self._loop: asyncio.Task[None] | None = None
        # Ray runs an async actor's constructor on its event loop: start at once, so a
        # dispatcher that Ray restarted (its process or node died) picks up its jobs
        # without waiting for someone to call it.
        self._ensure_running()

    # -- remote API --------------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        """Start the pool and the loop (idempotent); return ``stats()``."""
        self._ensure_running()
        return await self.stats()

    async def notify(self) -> None:
        """Something changed in Redis (a job queued, cancelled, retried): look now."""
        self._ensure_running()
        assert self._wake is not None
        self._full_round = True
        self._queued.clear()  # a job's dependencies may have changed
        self._wake.set()

    async def inspect(self, inputs: Inputs, blender: str) -> dict[str, Any]:
        """Catalogue an uploaded scene with Blender ``blender``, in an actor kept for this
        (it reserves no CPU and never renders, so an inspection never waits behind
        frames; it keeps a worker per version). The actor goes once it has been idle
        ``inspector_idle_s`` (``_retire_inspector``)."""
        if self.inspector is None:
            from rayfarm.render.actor import CONTROL, SceneInspector

            self.inspector = (
                ray.remote(concurrency_groups={CONTROL: 1})(SceneInspector)  # type: ignore[call-overload]
                .options(num_cpus=0, max_restarts=-1, scheduling_strategy=_here())
                .remote(threads=1)
            )
        self._inspecting += 1  # before any await: the loop never retires it meanwhile
        try:
            result: dict[str, Any] = await self.inspector.catalogue.remote(inputs, blender)
        finally:
            self._inspecting -= 1
            self._inspected_at = time.monotonic()
        return result

    async def progress(
        self, job_id: str, frame: int, tile: int, samples: int, of: int, slice: int = 0
    ) -> None:
        """A render actor's report of Cycles' samples done inside a running task (of a
        sliced frame's: inside its slice ``slice``)."""
        self.alive(job_id, frame, tile, slice)
        run = self.runs.get(job_id)
        if run is None or run.stopped:
            return
        sliced = (run.slices or 1) > 1
        await self.store.event(
            job_id, "progress", task=keys.task_key(frame, tile, slice if sliced else None),
            frame=frame, tile=tile, **({"slice": slice} if sliced else {}), samples=samples,
            of=of,
        )  # fmt: skip

    def alive(self, job_id: str, frame: int, tile: int, slice: int = 0) -> None:
        """A render actor's sign that a task's render goes on (any Cycles status line:
        scene sync, BVH, kernels, samples): the hang watch starts its clock over."""
        slot = self._doing.get((job_id, frame, tile, slice))
        if slot is not None:
            slot.sign_at = time.monotonic()

    async def describe(self) -> dict[str, Any]:
        """The settings this dispatcher runs with (Redis, storage, ...)."""
        return self.settings.to_dict()

    async def stats(self) -> dict[str, Any]:
        """The pool (each actor's index, device, node, host, busy) and the work waiting."""
        self._ensure_running()
        return {
            "actors": [
                {
                    "index": s.index,
                    "busy": s.busy,
                    "blender": s.blender,
                    "kind": s.kind,
                    "user": s.user,
                    "project": s.project,
                    "job": s.run,
                    **_where(s),
                }
                for s in self.slots
            ],
            "pending": sum(len(r.pending) for r in self.runs.values()),
            "runs": {r.id: len(r.pending) for r in self.runs.values()},
            "scaling": self.scaler.status(),
        }

    async def scaling_requests(self) -> list[dict[str, Any]]:
        """Every request for render nodes this dispatcher made (``request_resources``'s
        bundles, with the time), oldest first; none unless autoscaling is on."""
        return list(self.scaler.requests)

    # -- loop --------------------------------------------------------------------------------

    @property
    def slots(self) -> list[Slot]:
        return self.pool.slots

    def _ensure_running(self) -> None:
        if self._loop is not None and not self._loop.done():
            return
        if self._wake is None:
            self._wake = asyncio.Event()
        if not self.slots:
            self.pool.reporter = ray.get_runtime_context().current_actor
            self.pool.reconcile(self.scaler.want)
        self._loop = asyncio.get_running_loop().create_task(self._run())

    @property
    def assembler(self) -> Any:
        """The actor that joins a split frame's parts, started when a split job first
        needs it: a Ray actor's process costs CPU even idle (Ray's core worker wakes its
        main thread every 10 ms), and on a one-machine farm that CPU is the render's
        (bench/cpu.py). Restarted with empty buffers if it dies: frames it held render
        again."""
        if self._assembler is None:
            self._assembler = (
                ray.remote(TileAssembler)
                .options(num_cpus=0, max_restarts=-1, scheduling_strategy=_here())
                .remote()
            )
        return self._assembler

    async def _run(self) -> None:
        assert self._wake is not None
        await self._resume_active()
        last_full = float("-inf")
        while True:
            try:
                if self._resync:
                    await self._rebuild_runs()
                # An actor that finished its task only needs its next one (_schedule);
                # the pool, cancellations and the queue are looked at when told
                # (notify), once a second, and whenever actors would idle.
                now = time.monotonic()
                if self._full_round or now - last_full >= POLL_INTERVAL_S or self._capacity() > 0:
                    self._full_round, last_full = False, now
                    self.pool.reconcile(self.scaler.want)  # actors for nodes that joined
                    self.policy = await self.policies.load()
                    await self._sync_runs()
                    await self._admit()
                    if self.scaler.enabled:  # idle actors go, so that their nodes can
                        self.pool.release(self.scaler.want or 0, now)
                    self._retire_inspector(now)
                self._schedule()
                self._watch()
            except Exception as exc:
                if redis_down(exc):
                    self._resync = True
                    log.warning("dispatcher: Redis is unreachable (%s); waiting for it", exc)
                else:
                    log.exception("dispatcher iteration failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=POLL_INTERVAL_S)
            except TimeoutError:
                pass
            self._wake.clear()

    def _retire_inspector(self, now: float) -> None:
        """Stop the scene inspector once it has been idle ``inspector_idle_s``: a scene is
        catalogued once, beside its first job, and an idle Ray actor still costs CPU
        (Ray's core worker wakes its main thread every 10 ms), which on a one-machine
        farm is the render's. Its Blender workers follow it (their parent watch). The
        next new scene starts it again."""
        if (
            self.inspector is not None
            and not self._inspecting
            and now - self._inspected_at >= self.settings.inspector_idle_s
        ):
            ray.kill(self.inspector, no_restart=True)
            self.inspector = None

    async def _rebuild_runs(self) -> None:
        """After Redis failed mid-run: drop every run (tasks in flight finish unrecorded:
        their runs are stopped) and pick the jobs up again from Redis, which says which
        frames and tasks are done. Raises while Redis is still unreachable."""
        await self.store.ping()
        for run in list(self.runs.values()):
            self._stop(run)
        self._resync = False
        log.warning("dispatcher: Redis answers again; rebuilding the runs from it")
        await self._resume_active()

    async def _guarded(self, work: Any) -> None:
        """Run a task's coroutine. One that raises — Redis failing under its bookkeeping
        (or under its failure's), or a bug — would otherwise lose its task silently and
        leave the job waiting forever: the runs are marked for a rebuild from Redis
        instead (logged with its traceback unless Redis was simply unreachable)."""
        try:
            await work
        except Exception as exc:
            if not redis_down(exc):
                log.exception("dispatcher: a task's coroutine failed")
            self._resync = True
            assert self._wake is not None
            self._wake.set()

    async def _resume_active(self) -> None:
        """After a restart: pick PROCESSING jobs back up from Redis."""
        for job_id in await self.store.active():
            try:
                await self.store.reset_incomplete(job_id)
                await self._start_run(job_id)
            except FarmError as exc:  # it cannot run here any more (its Blender, say)
                self.runs.pop(job_id, None)
                await self._fail(job_id, f"could not resume the job: {exc}")
            except Exception:
                log.exception("could not resume job %s", job_id)

    async def _sync_runs(self) -> None:
        """Drop runs whose job left PROCESSING (cancelled through the API); their renders
        in progress are stopped. Follow an admin's urgent mark."""
        for run in list(self.runs.values()):
            state, urgent = await self.redis.hmget(keys.job(run.id), ["state", "urgent"])
            if state != JobState.PROCESSING:
                self._stop(run, halt=f"the job is {str(state or 'gone').lower()}")
            run.urgent = urgent == "1"

    def _stop(self, run: Run, halt: str | None = None, spare: Slot | None = None) -> None:
        """Forget ``run``: its pending tasks are dropped and what its actors return is not
        recorded. ``halt``: the reason to stop its renders in progress too (cancelled,
        failed), but ``spare``'s (whose task just ended); without it they run to their end
        (a rebuild renders them again)."""
        run.stopped = True
        run.pending.clear()
        self.runs.pop(run.id, None)
        self._waiting.pop(run.id, None)
        if run.is_split and self._assembler is not None:
            self._assembler.drop.remote(run.id)
        if halt is not None:
            for slot in self.slots:
                if slot.busy and slot.run == run.id and slot is not spare:
                    self._kill(slot, halt)

    def _watch(self) -> None:
        """Stop the renders that showed no sign of progress for ``hang_timeout_s`` (their
        calls then fail, and the tasks are retried as for a crash); kill the actors that
        did not stop a render within ``INTERRUPT_GRACE_S`` of being told (the actor
        itself is stuck: its call fails as an actor death, which replaces it)."""
        limit = self.settings.hang_timeout_s
        now = time.monotonic()
        for slot in self.slots:
            if not slot.busy or slot.run is None:
                continue
            if slot.killed is None and now - slot.sign_at > limit:
                self._kill(slot, f"no sign of progress for {limit:g} s (the render hung)")
            elif slot.killed is not None and 0 < slot.killed_at < now - INTERRUPT_GRACE_S:
                log.warning("render actor %d (pid %s on %s) did not stop its render; killing it",
                            slot.index, slot.pid, slot.host)  # fmt: skip
                slot.killed_at = 0.0  # once
                ray.kill(slot.handle, no_restart=True)

    def _kill(self, slot: Slot, reason: str) -> None:
        """Stop ``slot``'s render now. bpy cannot be interrupted from inside, so the actor
        stops its Blender worker process (``interrupt``); the call on it fails with
        ``WorkerLost`` and, from ``slot.killed``, says why. The actor, its GPU and its
        place in the pool stay."""
        if slot.killed is not None:
            return
        slot.killed, slot.killed_at = reason, time.monotonic()
        log.warning("render actor %d (pid %s on %s): %s; stopping its render",
                    slot.index, slot.pid, slot.host, reason)  # fmt: skip
        slot.handle.interrupt.remote(reason)

    def _assign(self, slot: Slot, run: Run, tasks: list[RenderTask]) -> None:
        """Mark ``slot`` busy with ``tasks`` of ``run`` (none: probing its scene); its
        worker runs the run's Blender version from now on. (An actor whose worker ran
        another job's Python replaces that worker itself.)"""
        slot.busy, slot.run, slot.sign_at = True, run.id, time.monotonic()
        slot.user, slot.project = run.user, run.project
        slot.blender = run.blender or slot.blender
        for task in tasks:
            self._doing[(run.id, task.frame, task.tile, task.slice)] = slot

    def _capacity(self) -> int:
        idle = sum(not s.busy for s in self.slots)
        waiting = sum(len(r.pending) for r in self.runs.values())
        return idle - waiting

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
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in unknown:
                    pipe.hmget(keys.job(job_id), ["owner", "spec", "tasks_total", "rendered_by"])
                found = await pipe.execute()
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
        await self.store.add_events(run.id, "task_queued", [_named(t) for t in run.pending])
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
            cause = _cause(exc, slot)
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

    # -- tasks ---------------------------------------------------------------------------------

    def _releaser(self, slot: Slot, run: Run, tasks: list[RenderTask]) -> Callable[[], None]:
        """A call that frees ``slot`` once (later calls do nothing): the actor's part is
        done, so it takes its next task or batch while this one's frames are stored, and
        never idles on storage or Redis between them."""
        assert self._wake is not None
        wake = self._wake
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                slot.killed, slot.killed_at = None, 0.0  # its worker is stopped; it goes on
                slot.busy, slot.run, slot.user, slot.project = False, None, None, None
                slot.idle_at = time.monotonic()
                for task in tasks:
                    key = (run.id, task.frame, task.tile, task.slice)
                    if self._doing.get(key) is slot:  # not already the task's next attempt
                        del self._doing[key]
                wake.set()

        return release

    async def _execute(self, slot: Slot, run: Run, task: RenderTask) -> None:
        release = self._releaser(slot, run, [task])
        try:
            await self._started(slot, run, [task])
            meta_ref, payload_ref = slot.handle.render.options(num_returns=2).remote(
                task, run.inputs
            )
            meta: TaskResult = await meta_ref
            slot.holds = task.scene_hash
            if run.stopped:
                return
            if not task.is_part:
                release()
                await self._report_device(run, meta)
                image = await payload_ref
                run.frame_s.append(meta.seconds)
                for failed, error, log_text in await self._record(run, slot, [(task, meta, image)]):
                    await self._task_failed(slot, run, failed, error, output=log_text)
                return
            await self._report_device(run, meta)
            try:
                have = await self.assembler.add.remote(
                    run.id, task.frame, task.parts, meta.size, meta.rect, payload_ref,
                    meta.samples,
                )  # fmt: skip
            except RayActorError as exc:  # restarted empty: the frame's other parts are gone
                release()
                await self._task_failed(slot, run, task, exc, whole_frame=True)
                return
            del payload_ref  # the assembler has merged the part: let the object store free it
            run.render_s[task.frame] = run.render_s.get(task.frame, 0.0) + meta.seconds
            _landed(run, task, meta)
            await self._record(run, slot, [(task, meta, None)])
            if run.stopped:
                return
            if have < task.parts:
                if task.is_sliced:
                    await self._preview(slot, run, task)
                return
            try:
                # Finishing (denoise, compositor) reports no samples: the watch counts anew.
                slot.sign_at = time.monotonic()
                frame_ref = self.assembler.take.remote(run.id, task.frame)
                meta_ref, image_ref = slot.handle.finish.options(num_returns=2).remote(
                    task, run.inputs, frame_ref
                )
                meta = await meta_ref
                image = await image_ref
                release()
                if not run.stopped:
                    for _, error, _ in await self._record(run, slot, [(task, meta, image)], True):
                        raise error
                    if task.is_sliced:
                        await self._forget_preview(run, task.frame)
            except Exception as exc:
                await self._task_failed(slot, run, task, exc, whole_frame=True)
        except Exception as exc:
            await self._task_failed(slot, run, task, exc)
        finally:
            release()

    async def _preview(self, slot: Slot, run: Run, task: RenderTask) -> None:
        """A slice of a frame landed: when every pixel of the frame now has more of its
        samples than its stored preview shows, ``slot`` (whose actor holds the scene)
        makes a new one from the assembler's merge so far (``TileAssembler.peek``), and
        it is stored with a ``preview`` event saying the share of samples it holds. A
        preview that cannot be made is logged, never a failure of the job."""
        sampled = run.sampled.get(task.frame)
        if sampled is None or sampled.everywhere <= run.previewed.get(task.frame, 0.0):
            return
        try:
            slot.sign_at = time.monotonic()  # previewing reports no samples
            peek = self.assembler.peek.remote(run.id, task.frame)
            image, fraction, steps = await slot.handle.preview.remote(task, run.inputs, peek)
        except Exception:
            log.warning("job %s: no preview of frame %d", run.id, task.frame, exc_info=True)
            return
        async with self._previewing:  # a slower, older preview never overwrites a newer
            if run.stopped or fraction <= run.previewed.get(task.frame, 0.0):
                return
            run.previewed[task.frame] = fraction
            key = layout.preview_key(run.id, task.frame)
            await asyncio.to_thread(self.storage.put_bytes, key, image)
            await self.store.set_preview_share(run.id, task.frame, fraction)
        await self.store.event(
            run.id, "preview", frame=task.frame, fraction=f"{fraction:.4f}",
            preview_s=f"{steps.get('preview_s', 0.0):.3f}", **_where(slot),
        )  # fmt: skip

    async def _forget_preview(self, run: Run, frame: int) -> None:
        """A sliced frame is stored whole: its preview in progress goes (the frame's own
        thumbnail replaces it), and no preview still being made is stored after."""
        async with self._previewing:
            run.previewed[frame] = 1.0
            run.sampled.pop(frame, None)
            await self.store.forget_preview(run.id, frame)
            await asyncio.to_thread(self.storage.delete, layout.preview_key(run.id, frame))

    async def _execute_batch(self, slot: Slot, run: Run, tasks: list[RenderTask]) -> None:
        """Render a batch of short whole-frame tasks in one actor call (see the module's
        docstring for what a failure inside it does)."""
        release = self._releaser(slot, run, tasks)
        try:
            try:
                await self._started(slot, run, tasks)
                batch: BatchResult = await slot.handle.render_batch.remote(tasks, run.inputs)
            except Exception as exc:
                await self._batch_lost(slot, run, tasks, exc)
                return
            slot.holds = run.scene_hash
            release()
            if run.stopped:
                return
            finished = len(batch.results)
            if finished:
                await self._report_device(run, batch.results[0][0])
                run.frame_s.extend(meta.seconds for meta, _ in batch.results)
                items = [
                    (t, meta, image) for t, (meta, image) in zip(tasks, batch.results, strict=False)
                ]
                for failed, error, log_text in await self._record(run, slot, items):
                    await self._task_failed(slot, run, failed, error, output=log_text)
            if batch.error is None:
                return
            cause = batch.error if isinstance(batch.error, Exception) else RuntimeError(batch.error)
            await self._task_failed(slot, run, tasks[finished], cause, output=batch.log)
            await self._requeue_unstarted(run, tasks[finished + 1 :])
        except Exception:
            log.exception("job %s: a batch of %d tasks failed to record", run.id, len(tasks))
            try:  # render again what is not recorded as done
                done = await self.store.tasks_done(run.id)
                await self._requeue_unstarted(run, [t for t in tasks if task_key(t) not in done])
            except Exception:
                log.exception("job %s: could not queue a failed batch again", run.id)
        finally:
            release()

    async def _batch_lost(
        self, slot: Slot, run: Run, tasks: list[RenderTask], exc: Exception
    ) -> None:
        """A batch's call failed as a whole (its actor died, or its node left): nothing
        of it came back, and which task was running is unknown. Every task is queued
        again with no retry spent; unless the node left, each runs alone from now on,
        where a crash is charged to the task that caused it."""
        place, host = _where(slot), slot.host or slot.node  # before a replaced actor's reset
        killed, cause = slot.killed, _cause(exc, slot)  # before the actor's replacement
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

    async def _started(self, slot: Slot, run: Run, tasks: list[RenderTask]) -> None:
        """Learn the actor's node and device (once; it answers after loading Blender)
        and log the tasks' start (a batch's all at once, when it is handed over)."""
        if slot.node is None:
            info = await slot.handle.info.remote()
            slot.node, slot.host, slot.device = info["node_id"], info["host"], info["device"]
            slot.pid = info.get("pid")
            slot.sign_at = time.monotonic()  # the hang watch does not count its start-up
        named = [(task_key(t), t.frame, t.tile, *((t.slice,) if t.is_sliced else ()))
                 for t in tasks]  # fmt: skip
        attempts = await self.store.start_tasks(run.id, named, **_where(slot))
        run.tries.update((str(t[0]), n) for t, n in zip(named, attempts, strict=True))

    async def _record(
        self,
        run: Run,
        slot: Slot,
        items: list[tuple[RenderTask, TaskResult, bytes | None]],
        finishing: bool = False,
    ) -> list[tuple[RenderTask, Exception, str]]:
        """Record what an actor call finished, in one thread hop to storage and one Redis
        script: whole frames (task done, frame stored), a tile (``image`` None: task done)
        or, ``finishing``, a tiled frame (stored). Each task's log is kept in storage.
        Returns the (task, error, log) of frames that could not be stored, for the
        caller's failure path; the rest are recorded."""
        put = self.storage.put_bytes

        def write() -> list[tuple[str, int, float] | Exception]:
            outcomes: list[tuple[str, int, float] | Exception] = []
            for task, meta, image in items:
                key = task_key(task)
                if meta.log and not finishing:
                    where = layout.task_log_key(run.id, key, run.tries.get(key, 1))
                    try:
                        put(where, meta.log.encode())
                    except Exception:
                        log.warning("job %s: could not store the log of %s", run.id, key,
                                    exc_info=True)  # fmt: skip
                if image is None:
                    outcomes.append(("", 0, 0.0))
                    continue
                try:
                    storing = time.perf_counter()
                    if meta.preview:
                        put(layout.thumbnail_key(run.id, task.frame), meta.preview)
                    put(layout.frame_key(run.id, task.frame, run.job.spec.extension), image)
                    for name, data in meta.files.items():
                        put(layout.file_output_key(run.id, task.frame, check_path(name)), data)
                    digest = hashlib.sha256(image).hexdigest()
                    outcomes.append((digest, len(image), time.perf_counter() - storing))
                except Exception as exc:
                    outcomes.append(exc)
            return outcomes

        outcomes = await asyncio.to_thread(write)
        failures: list[tuple[RenderTask, Exception, str]] = []
        records: list[Finished] = []
        for (task, meta, image), outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, Exception):
                failures.append((task, outcome, meta.log))
                continue
            key = task_key(task)
            done: dict[str, Any] = {}
            # Where the actor's seconds went (open, render, write, ...; bench/overhead.py).
            steps = {name: f"{seconds:.3f}" for name, seconds in meta.steps.items()}
            if not finishing:
                done = {"frame": task.frame, "tile": task.tile, "attempt": run.tries.get(key, 1),
                        **_where(slot), "worker": meta.worker, **steps,
                        **_slice_fields(run, task, meta)}  # fmt: skip
            stored: dict[str, Any] = {}
            if image is not None:
                # Render seconds of the frame: its task, or its tiles and the finish step.
                seconds = run.render_s.pop(task.frame, 0.0) + meta.seconds
                sha256, size, store_s = outcome
                stored = {
                    "object_key": layout.frame_key(run.id, task.frame, run.job.spec.extension),
                    "meta": {"sha256": sha256, "size": size, "render_s": round(seconds, 3),
                             "device": meta.device},
                    # A tiled frame's finish (denoise, compositor, format) is timed on its own.
                    "frame_event": {
                        **({"finish_s": f"{meta.seconds:.3f}", **steps} if finishing else {}),
                        "store_s": f"{store_s:.3f}",
                    },
                }  # fmt: skip
            records.append(Finished(
                task.frame, None if finishing else key, meta.seconds, done, **stored
            ))  # fmt: skip
        if not records:
            return failures
        count = await self.store.finish_tasks(run.id, records)
        if count == NOT_PROCESSING:
            return []  # cancelled or failed meanwhile: nothing more to do for these
        for task, meta, _ in items:
            for warning in meta.warnings:
                if warning not in run.warned:
                    run.warned.add(warning)
                    key = task_key(task)
                    await self.store.event(run.id, "warning", message=warning, task=key)
        if count >= run.job.frames_total and not run.stopped:
            await self._complete(run)
        return failures

    async def _keep_log(self, run: Run, key: str, attempt: int, text: str) -> None:
        """Store Blender's output for one attempt at a task (``GET .../tasks/{key}/log``)."""
        if not text:
            return
        where = layout.task_log_key(run.id, key, attempt)
        try:
            await asyncio.to_thread(self.storage.put_bytes, where, text.encode())
        except Exception:
            log.warning("job %s: could not store the log of %s", run.id, key, exc_info=True)

    async def _complete(self, run: Run) -> None:
        """Every frame is stored: post-process (video), write the manifest, COMPLETED.
        A post-processing failure fails the job with its message; the frames stay."""
        frames = await self.store.frames_done(run.id)
        meta = await self.store.frame_meta(run.id)
        outputs: dict[str, str] = {}
        video = run.job.spec.post.video if run.job.spec.post else None
        if video is not None and not run.stopped:
            await self.store.event(run.id, "post", step="video", frames=len(frames))
            try:
                key, count, seconds = await asyncio.to_thread(
                    encode_video, self.storage, run.id, frames, video
                )
            except Exception as exc:
                log.warning("job %s: video encoding failed: %s", run.id, exc)
                self._stop(run)
                await self._fail(run.id, f"video encoding failed (frames kept): {exc}")
                return
            outputs["video"] = key
            await self.store.event(
                run.id, "output", name="video", key=key, frames=count, seconds=f"{seconds:.2f}"
            )
        manifest = {
            "job": run.id,
            "spec": run.job.spec.model_dump(mode="json"),
            "frames": {str(k): frames[k] for k in sorted(frames)},
            "files": {
                frames[k]: meta.get(k, {}) for k in sorted(frames)
            },  # key -> {"sha256", "size", "render_s", "device"}
            "outputs": outputs,
            "completed_at": now_iso(),
        }
        await asyncio.to_thread(
            self.storage.put_bytes,
            layout.manifest_key(run.id),
            json.dumps(manifest, indent=2).encode(),
        )
        try:
            await self.store.transition(run.id, JobState.COMPLETED)
        except InvalidTransition:
            pass  # cancelled at the last moment: the cancel stands
        self._stop(run)

    async def _report_device(self, run: Run, meta: TaskResult) -> None:
        if run.device_reported:
            return
        run.device_reported = True
        await self.store.set_fields(run.id, device=meta.device)
        await self.store.event(run.id, "device", device=meta.device)

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
        cause = _cause(exc, slot)
        key = task_key(task)
        place = _where(slot)
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
                run.id, "task_failed", **_named(task), attempt=attempt,
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
                run.id, "task_failed", **_named(task), attempt=attempt,
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
            run.id, "task_failed", **_named(task), attempt=attempt, error=str(cause),
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
        await self.store.event(run.id, "task_retried", **_named(task), attempt=attempt + 1)
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


def _cause(exc: Exception, slot: Slot) -> Exception:
    """What to report for a failed actor call: why the dispatcher killed the actor, the
    exception raised in the actor, or ``exc`` itself."""
    if slot.killed is not None:
        return RenderError(slot.killed)
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


def _where(slot: Slot) -> dict[str, Any]:
    """Where a task runs, as its events say: actor, node, host, device, process."""
    return {
        "actor": slot.index,
        "node": slot.node or "",
        "host": slot.host or "",
        "device": slot.device or "",
        "pid": slot.pid or 0,
    }


def _landed(run: Run, task: RenderTask, meta: TaskResult) -> None:
    """Count a landed slice's samples in its frame's (``FrameSamples``)."""
    if not task.is_sliced or meta.samples is None or meta.rect is None or meta.size is None:
        return
    nx, ny = task.tiles
    sampled = run.sampled.setdefault(task.frame, FrameSamples(nx * ny))
    width, height = meta.size
    area = meta.rect.width * meta.rect.height / max(1, width * height)
    sampled.land(task.tile, area, meta.samples)


def _slice_fields(run: Run, task: RenderTask, meta: TaskResult) -> dict[str, Any]:
    """A slice's fields in its ``task_done`` event: which slice, its samples (``subset``:
    first-last of the frame's) and the share of the frame's samples landed now."""
    if not task.is_sliced:
        return {}
    fields: dict[str, Any] = {"slice": task.slice, "slices": task.slices}
    if meta.samples is not None:
        offset, length, total = meta.samples
        fields["subset"] = f"{offset}-{offset + length - 1} of {total}"
        sampled = run.sampled.get(task.frame)
        after = None if sampled is None else sampled.after.get((task.tile, offset))
        if after is not None:
            fields["fraction"] = f"{after:.4f}"
    return fields


def _named(task: RenderTask) -> dict[str, Any]:
    """A task's fields in its events: key, frame, tile, and a sliced frame's slice."""
    named: dict[str, Any] = {"task": task_key(task), "frame": task.frame, "tile": task.tile}
    if task.is_sliced:
        named["slice"] = task.slice
    return named


def _tiles(grid: tuple[int, int]) -> str:
    return "1" if grid == (1, 1) else f"{grid[0]}x{grid[1]}"


#: Ray's resource that only the head node has; the farm's control plane asks for a sliver
#: of it, as Serve's controller does, so it stays on the head while workers come and go.
ON_HEAD = {"node:__internal_head__": 0.001}


def redis_down(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis could not be reached (refused, reset, timed out)."""
    import redis.exceptions

    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)


def _here() -> Any:
    """Place an actor on this process's node, and only there.

    The control plane (dispatcher, assembler, inspector) reserves no CPU, so Ray would
    put it on any node, a GPU worker included, and lose it with that worker (a soft
    affinity was seen to land the assembler on a worker). The farm's dispatcher is
    pinned to the head (``ON_HEAD``) and creates the assembler and the inspector beside
    itself; a private dispatcher (``render_job``) stays by its driver, whose own Redis
    listens on that node's loopback.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def start_dispatcher(settings: Settings, private: bool = False) -> Any:
    """Create (or find) the farm's detached dispatcher actor, on the head node, and
    start it.

    ``private``: a dispatcher of the calling driver instead (``rayfarm.cluster.render_job``
    without a running service): unnamed, not detached (it and its render actors end with
    the driver), and only on the driver's node, where the driver's own Redis listens.
    """
    options: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1, "max_concurrency": 1000}
    if private:
        options.update(scheduling_strategy=_here())
    else:
        options.update(
            resources=ON_HEAD, name=DISPATCHER_NAME, namespace=NAMESPACE, lifetime="detached",
            get_if_exists=True,
        )  # fmt: skip
    actor: Any = ray.remote(Dispatcher).options(**options).remote(settings.to_dict())
    ray.get(actor.start.remote())
    return actor


def get_dispatcher() -> Any:
    return ray.get_actor(DISPATCHER_NAME, namespace=NAMESPACE)
