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

This module is the actor itself: its remote API, its loop, the pool of render actors
and the hang watch. Its parts, a module each: ``planning`` (from the queue to the
slots), ``execution`` (a task on an actor and what it returns), ``failures`` (retries
and failed jobs), and ``dispatch_state``, what they share.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from rayfarm.cluster import keys
from rayfarm.cluster.dispatch_state import slot_fields
from rayfarm.cluster.execution import Execution
from rayfarm.cluster.failures import Failures
from rayfarm.cluster.planning import Planning
from rayfarm.cluster.policy import PolicyStore
from rayfarm.cluster.pool import Pool
from rayfarm.cluster.runs import Run, Slot
from rayfarm.cluster.scaler import Scaler
from rayfarm.cluster.scheduler import Policy, Queued, Scheduler
from rayfarm.cluster.settings import DISPATCHER_NAME, NAMESPACE, Settings
from rayfarm.cluster.storage import Storage
from rayfarm.cluster.store import JobStore, connect
from rayfarm.errors import FarmError
from rayfarm.models import JobState
from rayfarm.render.assembler import TileAssembler
from rayfarm.render.inputs import Inputs
from rayfarm.render.tasks import RenderTask

__all__ = ["Dispatcher", "get_dispatcher", "start_dispatcher"]

log = logging.getLogger("rayfarm.dispatcher")

POLL_INTERVAL_S = 1.0
#: How long an actor told to stop its render (``interrupt``) has before it is killed.
INTERRUPT_GRACE_S = 10.0


class Dispatcher(Planning, Execution, Failures):
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
                    **slot_fields(s),
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
        runs = list(self.runs.values())
        found = await self.store.fields_of([run.id for run in runs], ["state", "urgent"])
        for run, (state, urgent) in zip(runs, found, strict=True):
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
