"""Deleting a job and what only it used: ``DELETE /jobs/{id}``, ``rayfarm rm`` and the
retention sweep all come here.

Redis goes first, in one script (``lua/delete_job.lua``): the job's record, tasks,
frames, attempts and execution log, its place in every index and the queue, and its
references to its blobs, marking those nothing else keeps as dying. From that moment
the job is 404 everywhere. Storage follows: the job's folder (frames, outputs, logs,
manifest) and the dying blobs' objects, which then leave the blob index.

Only a finished job (COMPLETED, FAILED, CANCELLED) is deleted; a PENDING or PROCESSING
one is refused (409: cancel it first), so no render writes into a job being deleted.
A render cancelled moments before may still land a frame or a log line, so every
deleted job's folder and keys are swept once more ``LATE_WRITES_S`` later, and a
deletion that died halfway is finished by the same sweep.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from rayfarm.cluster import keys
from rayfarm.cluster.blobs import blobs_of
from rayfarm.cluster.event_log import CHANGES_MAXLEN
from rayfarm.cluster.storage import Storage, job_prefix
from rayfarm.cluster.store import JobStore
from rayfarm.errors import InvalidTransition, JobNotFound
from rayfarm.models import JobState
from rayfarm.render.inputs import blob_key

__all__ = ["FINISHED", "LATE_WRITES_S", "Deleted", "Remover"]

log = logging.getLogger("rayfarm.deletion")

#: The states a job may be deleted in.
FINISHED = tuple(s for s in JobState if s.is_terminal)
#: How long after a deletion its job's folder and keys are swept once more (writes of a
#: render cancelled just before the deletion land within seconds).
LATE_WRITES_S = 600.0
_DELETE_LUA = resources.files("rayfarm.cluster").joinpath("lua", "delete_job.lua").read_text()


def _job_keys(job_id: str) -> list[str]:
    """A job's own keys, in the order ``delete_job.lua`` takes them."""
    return [keys.job(job_id), keys.tasks(job_id), keys.frames(job_id), keys.frame_meta(job_id),
            keys.attempts(job_id), keys.tries(job_id), keys.events(job_id)]  # fmt: skip


@dataclass(frozen=True)
class Deleted:
    """What deleting one job freed: the objects and bytes of its folder (frames,
    outputs, logs) and the blobs (inputs) no other job or upload kept."""

    id: str
    state: JobState
    objects: int
    bytes: int
    blobs: int
    blob_bytes: int
    #: False when storage failed part-way: the job is gone from Redis, and the next
    #: sweeps delete what is left of its files.
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": str(self.state)}


class Remover:
    """Deletes jobs and dying blobs, from Redis and from storage."""

    def __init__(self, redis: Any, store: JobStore, storage: Storage) -> None:
        self.redis, self.store, self.storage = redis, store, storage
        self._delete = redis.register_script(_DELETE_LUA)

    async def delete_job(self, job_id: str) -> Deleted:
        """Delete a finished job and everything only it used; ``JobNotFound`` when there
        is none, ``InvalidTransition`` (409) when it is PENDING or PROCESSING."""
        # A blob of a job stored before the blob index must not look unused.
        await self.store.blobs.build()
        owner, spec, inputs = await self.redis.hmget(keys.job(job_id), "owner", "spec", "inputs")
        if owner is None:
            raise JobNotFound(f"no job {job_id}", {"job_id": job_id})
        project = (json.loads(spec).get("project") if spec else None) or ""
        blobs = blobs_of(inputs or "")
        sizes = dict(blobs)
        reply = await self._delete(
            keys=[*_job_keys(job_id), keys.all_jobs(), keys.queue(), keys.jobs_of(owner),
                  keys.jobs_in_project(project) if project else keys.jobs_of(owner),
                  keys.changes(), keys.deleted(), keys.blobs_dying(), keys.metrics(),
                  *(keys.jobs_in(str(s)) for s in JobState),
                  *(k for sha, _ in blobs for k in (keys.blob(sha), keys.blob_refs(sha)))],
            args=[job_id, ",".join(FINISHED), owner, project, len(JobState), time.time(),
                  CHANGES_MAXLEN, *(sha for sha, _ in blobs)],
        )  # fmt: skip
        ok, state = int(reply[0]), reply[1]
        if ok == 0:
            raise JobNotFound(f"no job {job_id}", {"job_id": job_id})
        if ok == -1:
            raise InvalidTransition(
                f"job {job_id} is {state}: cancel it first (POST /jobs/{job_id}/cancel, or "
                f"rayfarm cancel {job_id}), then delete it",
                {"job_id": job_id, "state": state},
            )
        dying: list[str] = list(reply[2])
        await self.redis.unlink(keys.previews(job_id))  # kept beside the script's keys
        objects = size = 0
        complete = True
        try:
            objects, size = await asyncio.to_thread(self._remove_folder, job_id)
            await self.delete_blobs(dying)
        except Exception:
            # The job is gone from Redis already; its files wait for the next sweeps
            # (the deleted-jobs set and the dying blobs record what is left).
            log.warning("deleting job %s's files failed; the sweep retries", job_id,
                        exc_info=True)  # fmt: skip
            complete = False
        return Deleted(
            id=job_id, state=JobState(state), objects=objects, bytes=size, blobs=len(dying),
            blob_bytes=sum(sizes.get(sha, 0) for sha in dying), complete=complete,
        )  # fmt: skip

    def _remove_folder(self, job_id: str) -> tuple[int, int]:
        prefix = job_prefix(job_id)
        found = self.storage.usage(prefix)
        self.storage.delete_prefix(prefix)
        return found

    async def delete_blobs(self, shas: list[str]) -> int:
        """Delete the objects of dying blobs, then drop them from the index; return the
        bytes the index no longer holds."""
        if not shas:
            return 0
        await asyncio.to_thread(lambda: [self.storage.delete(blob_key(sha)) for sha in shas])
        return await self.store.blobs.forget(shas)

    async def sweep_deleted(self, before: float, limit: int = 1000) -> int:
        """Once more for jobs deleted before ``before``: remove what was written for
        them after (a cancelled render's last frame, log or event) or what a deletion
        that died halfway left; returns how many jobs it looked at."""
        ids: list[str] = await self.redis.zrangebyscore(keys.deleted(), "-inf", before, 0, limit)
        for job_id in ids:
            if not await self.redis.exists(keys.job(job_id)):
                await self.redis.unlink(*_job_keys(job_id), keys.previews(job_id))
                await asyncio.to_thread(self.storage.delete_prefix, job_prefix(job_id))
            await self.redis.zrem(keys.deleted(), job_id)
        return len(ids)
