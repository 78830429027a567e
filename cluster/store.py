"""The job store: job state in Redis, every state change atomic.

State changes run ``lua/transition.lua`` (a compare-and-set on the state field
with the queue and event stream updated in the same script), with the allowed
source states taken from the SDK's ``TRANSITIONS`` table, so a cancel racing a
completion leaves exactly one answer.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from rayfarm.cluster import keys
from rayfarm.cluster.blobs import BlobIndex, blobs_of
from rayfarm.errors import InvalidTransition, JobNotFound
from rayfarm.models import Job, JobSpec, JobState, JobStatus, check_transition, sources_of

__all__ = [
    "CHANGES_MAXLEN",
    "EVENTS_MAXLEN",
    "NOT_PROCESSING",
    "RENDER_S_BUCKETS",
    "Finished",
    "JobStore",
    "connect",
    "is_urgent_score",
    "now_iso",
    "outranks",
    "queue_score",
]

#: Default approximate cap on each job's event stream (its execution log), in events.
EVENTS_MAXLEN = 100_000
#: Entries the farm-wide changes stream keeps (about): its followers read from its end.
CHANGES_MAXLEN = 10_000
#: Upper bounds (seconds) of the render-time histogram's buckets (+Inf is implied).
RENDER_S_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: A Redis command that takes longer than this is a dead connection.
SOCKET_TIMEOUT_S = 10.0
#: Redis connections one process's store opens at most (redis-py's default pool size).
MAX_CONNECTIONS = 100
#: The version of the owner and project indexes (``build_indexes``).
INDEXES = "1"
_LUA = resources.files("rayfarm.cluster").joinpath("lua")
_TRANSITION_LUA = _LUA.joinpath("transition.lua").read_text()
_START_TASKS_LUA = _LUA.joinpath("start_tasks.lua").read_text()
_FINISH_TASKS_LUA = _LUA.joinpath("finish_tasks.lua").read_text()
_SET_DETAIL_LUA = _LUA.joinpath("set_detail.lua").read_text()


#: What ``finish_tasks`` answers when the job left PROCESSING (nothing was recorded).
NOT_PROCESSING = -1


@dataclass(frozen=True)
class Finished:
    """One finished task and/or stored frame, as ``JobStore.finish_tasks`` records it.

    ``task`` (a task key) marks the task done with its ``task_done`` event (``seconds``
    and the ``done`` fields: frame, tile, attempt, actor, node, host, device);
    ``object_key`` records the frame stored there with its ``meta`` (sha256, size,
    render_s, device) and its ``frame`` event (``frame_event``: finish_s for a tiled
    frame). A whole frame has both; a tile only the task; a tiled frame's finish only
    the frame.
    """

    frame: int
    task: str | None = None
    seconds: float = 0.0
    done: dict[str, Any] = field(default_factory=dict)
    object_key: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    frame_event: dict[str, Any] = field(default_factory=dict)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


#: Queue score distance between two priorities: larger than any epoch in ms (until 2286).
PRIORITY_STEP = 1e13
#: The priority an urgent job is queued with: above the highest a job may ask for (100).
URGENT_PRIORITY = 101


def queue_score(priority: int, created_at: str, urgent: bool = False) -> float:
    """Higher priority first, then older first: (100 - priority) * PRIORITY_STEP + epoch ms;
    an urgent job (an admin's mark) as if its priority were above every other's."""
    ms = datetime.fromisoformat(created_at).timestamp() * 1000.0
    return (100 - (URGENT_PRIORITY if urgent else priority)) * PRIORITY_STEP + ms


def is_urgent_score(score: float) -> bool:
    """Whether a queue score is an urgent job's (``queue_score``)."""
    return score < 0


def outranks(score: float, other: float) -> bool:
    """True if the job scored ``score`` has a strictly higher priority than ``other``'s
    (age alone never outranks)."""
    return score < other - PRIORITY_STEP / 2


def connect(url: str, socket_timeout_s: float = SOCKET_TIMEOUT_S) -> aioredis.Redis:
    """The asyncio Redis client one process shares between its stores (the job store,
    accounts, limits, ...): one connection pool, closed by whoever made it."""
    # A blocking pool: a burst of requests (hundreds of event streams opening at
    # once) waits for a free connection instead of failing with "Too many
    # connections" past max_connections.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=socket_timeout_s,
        decode_responses=True,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
    )
    return aioredis.Redis.from_pool(pool)


class JobStore:
    """Jobs in Redis. One instance per process; safe for concurrent coroutines.

    It works over a client it is given (``connect``), shared with the process's other
    stores; ``from_url`` makes one of its own, which ``close`` closes."""

    def __init__(
        self,
        redis: aioredis.Redis,
        events_maxlen: int = EVENTS_MAXLEN,
        owns_client: bool = False,
    ) -> None:
        # Typed as Any: redis-py's stubs return bytes | str unions even with
        # decode_responses=True, which would bury the logic in casts.
        self._redis: Any = redis
        self._owns_client = owns_client
        self.events_maxlen = events_maxlen
        self._transition = redis.register_script(_TRANSITION_LUA)
        self._start_tasks = redis.register_script(_START_TASKS_LUA)
        self._finish_tasks = redis.register_script(_FINISH_TASKS_LUA)
        self._set_detail = redis.register_script(_SET_DETAIL_LUA)
        self.blobs = BlobIndex(redis)

    @classmethod
    def from_url(
        cls,
        url: str,
        socket_timeout_s: float = SOCKET_TIMEOUT_S,
        events_maxlen: int = EVENTS_MAXLEN,
    ) -> JobStore:
        """A store with a client of its own (a tool, a test); ``close`` closes it."""
        return cls(connect(url, socket_timeout_s), events_maxlen=events_maxlen, owns_client=True)

    async def close(self) -> None:
        """Close the client when this store made it (``from_url``); a shared one is
        its maker's to close."""
        if self._owns_client:
            await self._redis.aclose()

    async def ping(self) -> None:
        """Raise when Redis does not answer (a health check)."""
        await self._redis.ping()

    # -- create and read ---------------------------------------------------------------

    async def create(
        self,
        job: Job,
        inputs: str,
        scene_hash: str,
        warnings: Sequence[str] = (),
        webhook: str | None = None,
    ) -> None:
        """Store a new PENDING job and queue it, in one MULTI/EXEC. ``inputs`` is the
        input folder's listing (``Inputs.to_json``), ``scene_hash`` its digest; the job
        keeps the blobs it lists (``BlobIndex.link``) from the same MULTI on.
        ``warnings`` (the Blender it renders with is not the one that saved it, ...)
        become the job's first ``warning`` events; ``webhook``: the URL its end is sent to
        (kept apart from its spec)."""
        created = job.created_at.isoformat()
        fields = {
            "id": job.id,
            "state": str(job.state),
            "owner": job.owner,
            "spec": job.spec.model_dump_json(),
            "scene_file": job.scene_file,
            "inputs": inputs,
            "scene_hash": scene_hash,
            "frames_total": job.frames_total,
            "tasks_total": job.tasks_total,
            "tiles": job.tiles or "",
            "slices": str(job.slices or ""),
            "saved_by": job.saved_by or "",
            "rendered_by": job.rendered_by or "",
            "created_at": created,
            **({"webhook": webhook} if webhook else {}),
        }
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.job(job.id), mapping=fields)
            pipe.zadd(keys.all_jobs(), {job.id: job.created_at.timestamp()})
            pipe.zadd(keys.jobs_in(str(job.state)), {job.id: job.created_at.timestamp()})
            pipe.zadd(keys.jobs_of(job.owner), {job.id: job.created_at.timestamp()})
            if job.spec.project is not None:
                pipe.zadd(
                    keys.jobs_in_project(job.spec.project), {job.id: job.created_at.timestamp()}
                )
            pipe.zadd(keys.queue(), {job.id: queue_score(job.spec.priority, created)})
            pipe.hincrby(keys.metrics(), "jobs_submitted_total", 1)
            pipe.xadd(
                keys.events(job.id),
                {"kind": "state", "from": "", "to": str(job.state), "at": created},
                maxlen=self.events_maxlen,
            )
            for warning in warnings:
                note = {"kind": "warning", "message": warning, "at": created}
                pipe.xadd(keys.events(job.id), note, maxlen=self.events_maxlen)
            pipe.xadd(keys.changes(), _change(job.id, job.owner, job.spec.project, job.state),
                      maxlen=CHANGES_MAXLEN)  # fmt: skip
            await self.blobs.link(pipe, job.id, job.owner, blobs_of(inputs))
            await pipe.execute()

    async def get(self, job_id: str) -> Job:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.job(job_id))
            pipe.hlen(keys.frames(job_id))
            pipe.hlen(keys.tasks(job_id))
            data, frames_done, tasks_done = await pipe.execute()
        if not data:
            raise JobNotFound(f"no job {job_id}", {"job_id": job_id})
        return _job_from_hash(data, frames_done, tasks_done)

    async def field(self, job_id: str, name: str) -> str | None:
        value: str | None = await self._redis.hget(keys.job(job_id), name)
        return value

    async def owner(self, job_id: str) -> tuple[str, str | None] | None:
        """The job's (owner, project), None when there is no such job."""
        owner, spec = await self._redis.hmget(keys.job(job_id), "owner", "spec")
        if owner is None:
            return None
        project = json.loads(spec).get("project") if spec else None
        return owner, project

    async def specs(self, job_ids: Sequence[str]) -> list[str | None]:
        """Each job's spec as JSON (None: no such job), in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "spec")
            found: list[str | None] = await pipe.execute()
        return found

    async def replace_pending_spec(self, job_id: str, spec: JobSpec) -> None:
        """Store ``spec`` as the job's while it is still PENDING (``InvalidTransition``
        otherwise): a WATCH on the job, so a dispatcher starting it meanwhile wins and
        the change is refused."""
        while True:
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(keys.job(job_id))
                    state = await pipe.hget(keys.job(job_id), "state")
                    if state is None:
                        raise JobNotFound(f"no job {job_id}", {"job_id": job_id})
                    if state != JobState.PENDING:
                        raise InvalidTransition(
                            f"job {job_id} is {state}: only a queued (PENDING) job's "
                            "dependencies change",
                            {"job_id": job_id, "state": state},
                        )
                    pipe.multi()
                    pipe.hset(keys.job(job_id), "spec", spec.model_dump_json())
                    await pipe.execute()
                    return
                except WatchError:
                    continue  # the job changed meanwhile: look again

    async def status(self, job_id: str) -> JobStatus:
        """The compact status, in one round trip; ``event`` is the job's newest event id."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(
                keys.job(job_id), ["state", "frames_total", "tasks_total", "error", "detail"]
            )
            pipe.hlen(keys.frames(job_id))
            pipe.hlen(keys.tasks(job_id))
            pipe.xrevrange(keys.events(job_id), count=1)
            fields, frames_done, tasks_done, last = await pipe.execute()
        state, frames_total, tasks_total, error, detail = fields
        if state is None:
            raise JobNotFound(f"no job {job_id}", {"job_id": job_id})
        return JobStatus(
            id=job_id,
            state=JobState(state),
            frames_done=frames_done,
            frames_total=int(frames_total),
            tasks_done=tasks_done,
            tasks_total=int(tasks_total),
            error=error or None,
            detail=detail or None,
            event=last[0][0] if last else None,
        )

    async def list_jobs(
        self,
        state: JobState | None = None,
        offset: int = 0,
        limit: int = 50,
        *,
        owner: str | None = None,
        among: Sequence[tuple[str, str]] | None = None,
    ) -> tuple[list[Job], int]:
        """Jobs newest first, and how many match: only those in ``state``, of ``owner``,
        and (``among``, a non-admin's view) owned by one of ``among``'s users or in one
        of its projects (``("user", name)`` / ``("project", name)`` pairs; empty: none).

        Each filter is an index kept since submission, so a listing reads only the jobs
        on its page: one index is read as it is, several are combined in Redis (a union
        of ``among``'s, intersected with the state's and the owner's) into a scratch key
        that lives for this call."""
        sets = [keys.jobs_in(str(state))] if state is not None else []
        if owner is not None:
            sets.append(keys.jobs_of(owner))
        union: list[str] = []
        if among is not None:
            union = [keys.jobs_of(n) if kind == "user" else keys.jobs_in_project(n)
                     for kind, n in among]  # fmt: skip
            if not union:
                return [], 0
        scratch: list[str] = []
        async with self._redis.pipeline(transaction=True) as pipe:
            if len(union) == 1:
                sets.append(union[0])
            elif union:
                merged = keys.scratch(f"union:{uuid.uuid4().hex}")
                pipe.zunionstore(merged, union, aggregate="MAX")
                scratch.append(merged)
                sets.append(merged)
            if not sets:
                index = keys.all_jobs()
            elif len(sets) == 1:
                index = sets[0]
            else:
                # Every index scores a job by its creation time: MAX keeps it.
                index = keys.scratch(f"inter:{uuid.uuid4().hex}")
                pipe.zinterstore(index, sets, aggregate="MAX")
                scratch.append(index)
            pipe.zcard(index)
            pipe.zrevrange(index, offset, offset + limit - 1)
            if scratch:
                pipe.delete(*scratch)
            replies = await pipe.execute()
        total, ids = replies[len(scratch) : len(scratch) + 2]
        found = []
        for job_id in ids:
            try:
                found.append(await self.get(job_id))
            except JobNotFound:
                total -= 1  # removed between the two reads
        return found, total

    async def build_indexes(self) -> int:
        """Index by owner and project the jobs stored before those indexes existed
        (once per store: ``keys.indexes`` records it; idempotent, so replicas racing
        here do no harm). Returns how many jobs it indexed."""
        if await self._redis.get(keys.indexes()) == INDEXES:
            return 0
        indexed = 0
        cursor = 0
        while True:
            cursor, page = await self._redis.zscan(keys.all_jobs(), cursor, count=1000)
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id, _ in page:
                    pipe.hmget(keys.job(job_id), "owner", "spec")
                found = await pipe.execute()
            async with self._redis.pipeline(transaction=False) as pipe:
                for (job_id, score), (owner, spec) in zip(page, found, strict=True):
                    if owner is None:
                        continue
                    pipe.zadd(keys.jobs_of(owner), {job_id: score})
                    project = json.loads(spec).get("project") if spec else None
                    if project:
                        pipe.zadd(keys.jobs_in_project(project), {job_id: score})
                    indexed += 1
                await pipe.execute()
            if cursor == 0:
                break
        await self._redis.set(keys.indexes(), INDEXES)
        return indexed

    async def scene_info(self, scene_id: str) -> dict[str, Any] | None:
        text = await self._redis.get(keys.scene(scene_id))
        return None if text is None else dict(json.loads(text))

    async def set_scene_info(self, scene_id: str, info: dict[str, Any]) -> None:
        await self._redis.set(keys.scene(scene_id), json.dumps(info))

    async def inputs(self, job_id: str) -> str:
        """The job's input folder listing (``Inputs.to_json``)."""
        text = await self._redis.hget(keys.job(job_id), "inputs")
        if text is None:
            raise JobNotFound(f"no job {job_id}", {"job_id": job_id})
        return str(text)

    # -- state changes ---------------------------------------------------------------------

    async def transition(
        self, job_id: str, target: JobState, error: str | None = None, **fields: str
    ) -> JobState:
        """Move the job to ``target`` if the table allows it from its current state.

        Returns the previous state. Raises ``JobNotFound`` or ``InvalidTransition``.
        Timestamps and the queue follow the target: PROCESSING sets ``started_at``;
        terminal states set ``finished_at``; PENDING (retry) re-queues and clears the error.
        """
        now = now_iso()
        queue_action, score = "", "0"
        pairs: dict[str, str] = dict(fields)
        pairs.setdefault("detail", "")  # what held the job back is past (a waiter sets anew)
        if target is JobState.PROCESSING:
            pairs["started_at"] = now
            queue_action = "rem"
        elif target.is_terminal:
            pairs["finished_at"] = now
            queue_action = "rem"
            if error is not None:
                pairs["error"] = error
        elif target is JobState.PENDING:
            spec, created, urgent = await self._redis.hmget(
                keys.job(job_id), ["spec", "created_at", "urgent"]
            )
            if spec is not None:
                priority = JobSpec.model_validate_json(spec).priority
                score = repr(queue_score(priority, created, urgent == "1"))
                queue_action = "add"
            pairs.update({"error": "", "finished_at": "", "started_at": ""})
        argv: list[str] = [
            job_id,
            str(target),
            ",".join(sorted(sources_of(target))),
            queue_action,
            score,
            str(self.events_maxlen),
            now,
            ",".join(JobState),
            error or "",
            str(CHANGES_MAXLEN),
        ]
        for name, value in pairs.items():
            argv += [name, value]
        ok, previous = await self._transition(
            keys=[
                keys.job(job_id),
                keys.queue(),
                keys.events(job_id),
                keys.all_jobs(),
                keys.changes(),
                *(keys.jobs_in(str(s)) for s in JobState),
            ],
            args=argv,
        )
        if ok == 0:
            raise JobNotFound(f"no job {job_id}", {"job_id": job_id})
        if ok == -1:
            check_transition(job_id, JobState(previous), target)
            raise InvalidTransition(f"job {job_id}: {previous} -> {target} refused")
        return JobState(previous)

    async def reset_incomplete(self, job_id: str) -> None:
        """Before a retry: forget tile tasks of frames that were not stored."""
        done_frames = set(await self._redis.hkeys(keys.frames(job_id)))
        task_keys = await self._redis.hkeys(keys.tasks(job_id))
        stale = [k for k in task_keys if str(int(k[1:8])) not in done_frames]
        async with self._redis.pipeline(transaction=True) as pipe:
            if stale:
                pipe.hdel(keys.tasks(job_id), *stale)
            pipe.delete(keys.attempts(job_id))
            await pipe.execute()

    # -- progress ------------------------------------------------------------------------

    async def frames_done(self, job_id: str) -> dict[int, str]:
        data = await self._redis.hgetall(keys.frames(job_id))
        return {int(k): v for k, v in data.items()}

    async def tasks_done(self, job_id: str) -> set[str]:
        return set(await self._redis.hkeys(keys.tasks(job_id)))

    async def start_tasks(
        self, job_id: str, tasks: Sequence[tuple[int | str, ...]], **where: Any
    ) -> list[int]:
        """Record that ``tasks`` ((task key, frame, tile[, slice]), in the order they run) were
        handed to one actor, each with its ``task_started`` event (``where``: actor,
        node, host, device), in one round trip (``lua/start_tasks.lua``); return their
        attempt numbers, counted over the job's whole life (retries and dispatcher
        restarts included), so each attempt's log keeps its own name."""
        flat = [str(v) for pair in where.items() for v in pair]
        attempts: list[int] = await self._start_tasks(
            keys=[keys.tries(job_id), keys.events(job_id)],
            args=[self.events_maxlen, now_iso(), json.dumps(tasks), json.dumps(flat)],
        )
        return [int(a) for a in attempts]

    async def finish_tasks(self, job_id: str, items: Sequence[Finished]) -> int:
        """Record finished tasks and stored frames (``Finished``), in their order, with
        their events and the farm's counters (tasks done, the render-time histogram,
        frames stored), in one round trip (``lua/finish_tasks.lua``). Returns how many
        frames the job has stored, or ``NOT_PROCESSING`` (nothing recorded) when the
        job left PROCESSING meanwhile (cancelled, failed)."""
        at = now_iso()
        body: list[dict[str, Any]] = []
        counters: dict[str, int] = {}
        render_s = 0.0
        for item in items:
            entry: dict[str, Any] = {}
            if item.task is not None:
                done = {"kind": "task_done", "at": at, "task": item.task,
                        "seconds": f"{item.seconds:.3f}", **item.done}  # fmt: skip
                entry["task"] = item.task
                entry["done"] = [str(v) for pair in done.items() for v in pair]
                bucket = next((f"{b:g}" for b in RENDER_S_BUCKETS if item.seconds <= b), "+Inf")
                for name in ("tasks_done_total", f"render_s_bucket:{bucket}"):
                    counters[name] = counters.get(name, 0) + 1
                render_s += item.seconds
            if item.object_key is not None:
                event = {"kind": "frame", "at": at, "frame": item.frame, **item.frame_event}
                entry["frame"] = str(item.frame)
                entry["object"] = item.object_key
                entry["meta"] = json.dumps(item.meta)
                entry["event"] = [str(v) for pair in event.items() for v in pair]
                counters["frames_stored_total"] = counters.get("frames_stored_total", 0) + 1
            body.append(entry)
        stored = await self._finish_tasks(
            keys=[keys.job(job_id), keys.tasks(job_id), keys.events(job_id), keys.metrics(),
                  keys.frames(job_id), keys.frame_meta(job_id)],
            args=[self.events_maxlen, json.dumps(body), json.dumps(counters),
                  repr(render_s) if render_s else "0"],
        )  # fmt: skip
        return int(stored)

    async def count(self, **amounts: int) -> None:
        """Add to farm-wide counters (``tasks_failed_total=1``; see ``metrics``)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for name, amount in amounts.items():
                pipe.hincrby(keys.metrics(), name, amount)
            await pipe.execute()

    async def metrics(self) -> dict[str, Any]:
        """Farm-wide counters, jobs by state and stored, the queue's depth and Redis's
        memory, in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.metrics())
            pipe.zcard(keys.queue())
            pipe.zcard(keys.all_jobs())
            pipe.info("memory")
            for state in JobState:
                pipe.zcard(keys.jobs_in(str(state)))
            counters, queued, stored, memory, *by_state = await pipe.execute()
        return {
            "counters": {k: float(v) for k, v in counters.items()},
            "queue_depth": int(queued),
            "jobs": dict(zip(JobState, map(int, by_state), strict=True)),
            "jobs_stored": int(stored),
            "redis_used_memory": int(memory.get("used_memory", 0)),
        }

    async def preview_share(self, job_id: str, frame: int) -> str | None:
        """The share of its samples (``"0.2500"``) a sliced frame's preview in progress
        holds, None when it has none."""
        share: str | None = await self._redis.hget(keys.previews(job_id), str(frame))
        return share

    async def set_preview_share(self, job_id: str, frame: int, share: float) -> None:
        """Record the share of its samples the frame's newest preview holds."""
        await self._redis.hset(keys.previews(job_id), str(frame), f"{share:.4f}")

    async def forget_preview(self, job_id: str, frame: int) -> None:
        """The frame is stored whole: its preview in progress is past."""
        await self._redis.hdel(keys.previews(job_id), str(frame))

    async def frame_meta(self, job_id: str) -> dict[int, dict[str, Any]]:
        """Each stored frame's ``{"sha256", "size"}``."""
        data = await self._redis.hgetall(keys.frame_meta(job_id))
        return {int(k): json.loads(v) for k, v in data.items()}

    async def add_attempt(self, job_id: str, task: str) -> int:
        return int(await self._redis.hincrby(keys.attempts(job_id), task, 1))

    async def set_fields(self, job_id: str, **fields: str) -> None:
        await self._redis.hset(keys.job(job_id), mapping=fields)

    async def event(self, job_id: str, kind: str, **fields: Any) -> str:
        """Append one event to the job's execution log; return its id."""
        body = {"kind": kind, "at": now_iso(), **{k: str(v) for k, v in fields.items()}}
        event_id: str = await self._redis.xadd(keys.events(job_id), body, maxlen=self.events_maxlen)
        return event_id

    async def add_events(self, job_id: str, kind: str, items: list[dict[str, Any]]) -> None:
        """Append many events of one ``kind`` in one round trip (a plan's queued tasks)."""
        at = now_iso()
        async with self._redis.pipeline(transaction=False) as pipe:
            for fields in items:
                body = {"kind": kind, "at": at, **{k: str(v) for k, v in fields.items()}}
                pipe.xadd(keys.events(job_id), body, maxlen=self.events_maxlen)
            await pipe.execute()

    async def events_after(
        self, job_id: str, after: str | None, count: int = 500
    ) -> list[tuple[str, dict[str, str]]]:
        """Up to ``count`` events newer than the event id ``after`` (all from the start
        when None), oldest first."""
        return await self.read_after(keys.events(job_id), after, count)

    async def read_after(
        self, stream: str, after: str | None, count: int = 500
    ) -> list[tuple[str, dict[str, str]]]:
        """Up to ``count`` entries of ``stream`` newer than the id ``after`` (all from
        the start when None), oldest first."""
        start = "-" if after is None else f"({after}"
        entries: list[tuple[str, dict[str, str]]] = await self._redis.xrange(
            stream, min=start, count=count
        )
        return entries

    async def read_new(
        self, streams: dict[str, str], block_ms: int
    ) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
        """The first entry after the given id of each of ``streams`` (``{key: id}``),
        waiting up to ``block_ms`` for one (XREAD BLOCK); empty when none came."""
        found = await self._redis.xread(streams, count=1, block=block_ms)
        return list(found or [])

    async def last_change(self) -> str:
        """The id of the newest entry of the changes stream ("0-0" while it is empty):
        where a list that has just read the jobs starts following."""
        newest = await self._redis.xrevrange(keys.changes(), count=1)
        return str(newest[0][0]) if newest else "0-0"

    async def queue_head(self, limit: int) -> list[tuple[str, float]]:
        """The first ``limit`` queued job ids with their scores (priority, then age)."""
        head: list[tuple[str, float]] = await self._redis.zrange(
            keys.queue(), 0, limit - 1, withscores=True
        )
        return head

    async def forget_tasks(self, job_id: str, task_keys: list[str]) -> None:
        """Mark tasks as not done (their output was lost and must be rendered again)."""
        if task_keys:
            await self._redis.hdel(keys.tasks(job_id), *task_keys)

    async def states(self, job_ids: Sequence[str]) -> dict[str, str | None]:
        """Each job's state (None: no such job), in one round trip."""
        ids = list(dict.fromkeys(job_ids))
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.job(job_id), "state")
            found = await pipe.execute()
        return dict(zip(ids, found, strict=True))

    async def set_detail(self, job_id: str, reason: str | None) -> bool:
        """Say why the job waits (a ``waiting`` event and its ``detail``), or, with None,
        that it no longer does; only while it is PENDING or PROCESSING (False otherwise:
        nothing changed)."""
        done = await self._set_detail(
            keys=[keys.job(job_id), keys.events(job_id)],
            args=[reason or "", now_iso(), self.events_maxlen],
        )
        return bool(done)

    async def set_urgent(self, job_id: str, urgent: bool) -> None:
        """Mark the job urgent (or not); a queued job moves in the queue at once."""
        spec, created = await self._redis.hmget(keys.job(job_id), ["spec", "created_at"])
        if spec is None:
            raise JobNotFound(f"no job {job_id}", {"job_id": job_id})
        priority = JobSpec.model_validate_json(spec).priority
        async with self._redis.pipeline(transaction=True) as pipe:
            if urgent:
                pipe.hset(keys.job(job_id), "urgent", "1")
            else:
                pipe.hdel(keys.job(job_id), "urgent")
            # XX: only a job in the queue (PENDING) is moved; others are not queued.
            pipe.zadd(keys.queue(), {job_id: queue_score(priority, created, urgent)}, xx=True)
            await pipe.execute()

    async def active(self) -> list[str]:
        """Ids of PROCESSING jobs (for a dispatcher rebuilding its queue)."""
        ids: list[str] = await self._redis.zrange(keys.jobs_in(str(JobState.PROCESSING)), 0, -1)
        return ids


def _change(job_id: str, owner: str, project: str | None, state: JobState) -> dict[str, str]:
    """One entry of the changes stream (as ``lua/transition.lua`` writes them too)."""
    return {"job": job_id, "owner": owner, "project": project or "", "state": str(state)}


def _job_from_hash(data: dict[str, str], frames_done: int, tasks_done: int) -> Job:
    spec = JobSpec.model_validate(json.loads(data["spec"]))
    slices = data.get("slices")  # "" while 'auto' is undecided; absent in older jobs
    return Job(
        id=data["id"],
        state=JobState(data["state"]),
        owner=data.get("owner", ""),
        spec=spec,
        scene_file=data.get("scene_file", ""),
        frames_total=int(data["frames_total"]),
        frames_done=frames_done,
        tasks_total=int(data["tasks_total"]),
        tasks_done=tasks_done,
        tiles=data.get("tiles") or None,
        slices=int(slices) if slices else (spec.slice_count if slices is None else None),
        error=data.get("error") or None,
        detail=data.get("detail") or None,
        urgent=data.get("urgent") == "1",
        device=data.get("device") or None,
        saved_by=data.get("saved_by") or None,
        rendered_by=data.get("rendered_by") or None,
        created_at=datetime.fromisoformat(data["created_at"]),
        started_at=_dt(data.get("started_at")),
        finished_at=_dt(data.get("finished_at")),
    )


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
