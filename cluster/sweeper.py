"""The farm's housekeeping: a sweep every ``sweep_interval_s``, run by the API replicas
themselves (no extra actor), one replica at a time.

Each replica wakes now and then; the one that finds the last sweep (``keys.sweep``,
in Redis: it outlives restarts) older than the interval and takes the lock
(``keys.sweep_lock``, a Redis lock with a timeout, so a replica that dies holding it
lets go) sweeps:

1. **Retention**: finished jobs (COMPLETED, FAILED, CANCELLED) that finished more than
   ``retention_days`` ago are deleted as ``DELETE /jobs/{id}`` deletes them, and
   audited (who: ``retention``). 0 days keeps jobs forever.
2. **Unused uploads**: blobs uploaded more than ``upload_grace_s`` ago that no job of
   their uploader's took up leave that user's quota; those nothing keeps are deleted.
3. **Leftovers**: blobs whose deleter died are deleted; deleted jobs' folders and keys
   are swept once more after ``LATE_WRITES_S`` (a cancelled render's last writes).
4. **Measurement**: bytes and objects in storage under ``jobs/`` and ``blobs/``
   (``keys.usage``, shown in ``/metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import datetime
from typing import Any

from redis.exceptions import LockError

from rayfarm.cluster import keys
from rayfarm.cluster.auth import AuthStore
from rayfarm.cluster.deletion import FINISHED, LATE_WRITES_S, Remover
from rayfarm.cluster.settings import Settings
from rayfarm.cluster.storage import Storage
from rayfarm.cluster.store import JobStore
from rayfarm.errors import InvalidTransition, JobNotFound

__all__ = ["DAY_S", "Sweeper", "measured_usage"]

log = logging.getLogger("rayfarm.sweeper")

DAY_S = 86_400.0
#: How long the sweep lock lasts without being renewed (a sweep renews it as it goes).
LOCK_S = 300.0
#: Longest a replica sleeps between looks at whether a sweep is due.
TICK_S = 60.0
#: A blob marked dying this long ago and not forgotten lost its deleter.
STUCK_S = 60.0
#: Jobs looked at per round trip.
BATCH = 500
#: Most rounds of blob collection one sweep makes (each up to 1 000 blobs).
MAX_ROUNDS = 100
#: The storage areas measured.
AREAS = ("jobs", "blobs")


async def measured_usage(redis: Any) -> dict[str, float]:
    """What the last sweep measured (``{area}_bytes``, ``{area}_objects``,
    ``measured_at``); empty before the first sweep."""
    found = await redis.hgetall(keys.usage())
    return {k: float(v) for k, v in found.items()}


class Sweeper:
    """Sweeps the farm (see the module's docstring); ``run`` loops forever."""

    def __init__(
        self,
        redis: Any,
        store: JobStore,
        storage: Storage,
        remover: Remover,
        auth: AuthStore,
        settings: Settings,
    ) -> None:
        self.store, self.storage, self.remover, self.auth = store, storage, remover, auth
        self.settings = settings
        self.redis = redis
        self.started = time.time()

    async def run(self) -> None:
        """Sweep whenever one is due, until cancelled."""
        interval = self.settings.sweep_interval_s
        while True:
            await asyncio.sleep(min(interval, TICK_S) * random.uniform(0.5, 1.0))
            try:
                await self.sweep_if_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis or storage away: the next tick tries again
                log.warning("housekeeping sweep failed", exc_info=True)

    async def sweep_if_due(self) -> dict[str, Any] | None:
        """Sweep when the last sweep (or this replica's start) is an interval old and no
        other replica is sweeping; what it did, or None."""
        if not await self._due():
            return None
        lock = self.redis.lock(keys.sweep_lock(), timeout=LOCK_S, thread_local=False)
        if not await lock.acquire(blocking=False):
            return None
        try:
            if not await self._due():  # another replica swept while this one looked
                return None
            return await self.sweep(lock)
        finally:
            try:
                await lock.release()
            except LockError:
                log.warning("the sweep outlasted its lock (%s s)", LOCK_S)

    async def _due(self) -> bool:
        last = float(await self.redis.hget(keys.sweep(), "at") or 0)
        return time.time() - max(last, self.started) >= self.settings.sweep_interval_s

    async def sweep(self, lock: Any = None) -> dict[str, Any]:
        """One sweep, now (``lock``: the sweep lock, renewed as it goes)."""
        began = time.time()
        await self.store.blobs.build()
        report: dict[str, Any] = {"at": began}
        report["jobs_deleted"] = await self._retention(began, lock)
        report["blobs_deleted"], report["blob_bytes_deleted"] = await self._unused(began)
        report["late_swept"] = await self.remover.sweep_deleted(began - LATE_WRITES_S)
        if lock is not None:
            await lock.reacquire()
        usage = await asyncio.to_thread(self._measure)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.usage(), mapping={**usage, "measured_at": time.time()})
            pipe.hset(keys.sweep(), mapping={**report, "took_s": round(time.time() - began, 3)})
            await pipe.execute()
        return {**report, "usage": usage}

    async def _retention(self, now: float, lock: Any) -> int:
        """Delete finished jobs that finished over ``retention_days`` ago."""
        days = self.settings.retention_days
        if days <= 0:
            return 0
        cutoff = now - days * DAY_S
        deleted = 0
        for state in FINISHED:
            # Created before the cutoff: those that may have finished before it too.
            ids: list[str] = await self.redis.zrangebyscore(
                keys.jobs_in(str(state)), "-inf", cutoff
            )
            for start in range(0, len(ids), BATCH):
                batch = ids[start : start + BATCH]
                async with self.redis.pipeline(transaction=False) as pipe:
                    for job_id in batch:
                        pipe.hget(keys.job(job_id), "finished_at")
                    finished = await pipe.execute()
                for job_id, at in zip(batch, finished, strict=True):
                    if at and datetime.fromisoformat(at).timestamp() < cutoff:
                        deleted += await self._expire(job_id, at)
                if lock is not None:
                    await lock.reacquire()
        return deleted

    async def _expire(self, job_id: str, finished_at: str) -> int:
        try:
            gone = await self.remover.delete_job(job_id)
        except (JobNotFound, InvalidTransition):
            return 0  # deleted, or retried, meanwhile
        await self.auth.audit(
            who="retention", action=f"DELETE /jobs/{job_id}", job=job_id, outcome=200,
            detail=f"{gone.state} job finished at {finished_at}, kept "
                   f"{self.settings.retention_days:g} days (RAYFARM_RETENTION_DAYS); freed "
                   f"{gone.bytes + gone.blob_bytes} bytes",
        )  # fmt: skip
        return 1

    async def _unused(self, now: float) -> tuple[int, int]:
        """Lapsed uploads and holds, and blobs whose deleter died: (blobs, bytes)."""
        blobs = freed = 0
        for _ in range(MAX_ROUNDS):  # the rest waits for the next sweep
            dying = await self.store.blobs.collect_due(now)
            dying += await self.store.blobs.stuck(now - STUCK_S)
            if not dying:
                break
            blobs += len(dying)
            freed += await self.remover.delete_blobs(sorted(set(dying)))
        return blobs, freed

    def _measure(self) -> dict[str, int]:
        usage = {}
        for area in AREAS:
            objects, size = self.storage.usage(area)
            usage[f"{area}_objects"], usage[f"{area}_bytes"] = objects, size
        return usage
