"""The indexes jobs are listed and queued through, sorted sets kept by every creation
and state change: all jobs, by state, by owner and by project (scored by creation time,
so a listing reads only the jobs on its page), and the queue (scored by ``queue_score``:
higher priority first, then older first; an admin's urgent mark above every priority).
``JobIndex`` is a part of ``JobStore``; the queue's scoring is plain functions the
dispatcher shares."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from rayfarm.cluster import keys
from rayfarm.errors import JobNotFound
from rayfarm.models import JobRecord, JobState

__all__ = [
    "INDEXES",
    "PRIORITY_STEP",
    "URGENT_PRIORITY",
    "JobIndex",
    "is_urgent_score",
    "outranks",
    "queue_score",
    "scan_jobs",
]

#: The version of the owner and project indexes (``build_indexes``).
INDEXES = "1"
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


async def scan_jobs(
    redis: Any, fields: Sequence[str], page: int
) -> AsyncIterator[list[tuple[str, float, list[str | None]]]]:
    """Every stored job, a page of about ``page`` at a time: (id, creation score, the
    values of its ``fields``, None where absent), each page read in two round trips (for
    indexes built over jobs stored before them)."""
    cursor = 0
    while True:
        cursor, found = await redis.zscan(keys.all_jobs(), cursor, count=page)
        async with redis.pipeline(transaction=False) as pipe:
            for job_id, _ in found:
                pipe.hmget(keys.job(job_id), *fields)
            rows = await pipe.execute()
        yield [(job_id, score, row) for (job_id, score), row in zip(found, rows, strict=True)]
        if cursor == 0:
            return


class JobIndex:
    """Listing jobs, building the indexes, reading the queue's head (a part of
    ``JobStore``, over its Redis client)."""

    # Set by JobStore.__init__.
    _redis: Any

    async def get(self, job_id: str) -> JobRecord:
        raise NotImplementedError  # JobStore.get: one job read whole

    async def list_jobs(
        self,
        state: JobState | None = None,
        offset: int = 0,
        limit: int = 50,
        *,
        owner: str | None = None,
        among: Sequence[tuple[str, str]] | None = None,
    ) -> tuple[list[JobRecord], int]:
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
        async for rows in scan_jobs(self._redis, ("owner", "spec"), 1000):
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id, score, (owner, spec) in rows:
                    if owner is None:
                        continue
                    pipe.zadd(keys.jobs_of(owner), {job_id: score})
                    project = json.loads(spec).get("project") if spec else None
                    if project:
                        pipe.zadd(keys.jobs_in_project(project), {job_id: score})
                    indexed += 1
                await pipe.execute()
        await self._redis.set(keys.indexes(), INDEXES)
        return indexed

    async def queue_head(self, limit: int) -> list[tuple[str, float]]:
        """The first ``limit`` queued job ids with their scores (priority, then age)."""
        head: list[tuple[str, float]] = await self._redis.zrange(
            keys.queue(), 0, limit - 1, withscores=True
        )
        return head
