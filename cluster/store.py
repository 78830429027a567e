"""The job store: job state in Redis, every state change atomic.

State changes run ``lua/transition.lua`` (a compare-and-set on the state field
with the queue and event stream updated in the same script), with the allowed
source states taken from the SDK's ``TRANSITIONS`` table, so a cancel racing a
completion leaves exactly one answer.

``JobStore`` is this module's job records and state changes, with its parts by concern
beside it: the execution log and the farm's changes (``event_log.EventLog``), tasks and
frames done (``progress.TaskProgress``), and the listing indexes and the queue
(``job_index.JobIndex``). Every part works over the one client it is given
(``connect``), which the process's other stores share.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from rayfarm.cluster import keys
from rayfarm.cluster.blobs import BlobIndex, blobs_of
from rayfarm.cluster.event_log import CHANGES_MAXLEN, EVENTS_MAXLEN, EventLog, now_iso
from rayfarm.cluster.job_index import JobIndex, queue_score
from rayfarm.cluster.progress import TaskProgress
from rayfarm.errors import InvalidTransition, JobNotFound
from rayfarm.models import JobRecord, JobSpec, JobState, JobStatus, check_transition, sources_of

__all__ = ["JobStore", "connect"]

#: A Redis command that takes longer than this is a dead connection.
SOCKET_TIMEOUT_S = 10.0
#: Redis connections one process's store opens at most (redis-py's default pool size).
MAX_CONNECTIONS = 100
_LUA = resources.files("rayfarm.cluster").joinpath("lua")
_TRANSITION_LUA = _LUA.joinpath("transition.lua").read_text()
_SET_DETAIL_LUA = _LUA.joinpath("set_detail.lua").read_text()


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


class JobStore(EventLog, TaskProgress, JobIndex):
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
        job: JobRecord,
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

    async def get(self, job_id: str) -> JobRecord:
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

    async def fields_of(
        self, job_ids: Sequence[str], names: Sequence[str]
    ) -> list[list[str | None]]:
        """The fields ``names`` of each job (None where absent, all None for no such
        job), in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(keys.job(job_id), list(names))
            found: list[list[str | None]] = await pipe.execute()
        return found

    async def specs(self, job_ids: Sequence[str]) -> list[str | None]:
        """Each job's spec as JSON (None: no such job), in one round trip."""
        return [spec for (spec,) in await self.fields_of(job_ids, ["spec"])]

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

    async def set_fields(self, job_id: str, **fields: str) -> None:
        await self._redis.hset(keys.job(job_id), mapping=fields)

    async def states(self, job_ids: Sequence[str]) -> dict[str, str | None]:
        """Each job's state (None: no such job), in one round trip."""
        ids = list(dict.fromkeys(job_ids))
        found = await self.fields_of(ids, ["state"])
        return {job_id: state for job_id, (state,) in zip(ids, found, strict=True)}

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


def _job_from_hash(data: dict[str, str], frames_done: int, tasks_done: int) -> JobRecord:
    spec = JobSpec.model_validate(json.loads(data["spec"]))
    slices = data.get("slices")  # "" while 'auto' is undecided; absent in older jobs
    return JobRecord(
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
