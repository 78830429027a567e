"""The blob index: which jobs and uploads keep each content-addressed blob.

Blobs (``blobs/sha256/..``, a job's inputs) are shared by content between jobs and
users, so none is any one job's to delete. The index (``rayfarm.cluster.keys``: ``blob``,
``blob_refs``, ``uploads_of``) records what keeps each blob:

- every job that lists it (as long as the job exists);
- each upload (``PUT /blobs``) by a user none of whose jobs uses it yet, for
  ``upload_grace_s``: these are what a user's upload quota counts;
- each submission being checked (a hold, released when the job is created or refused).

A blob nothing keeps is *dying*: its object is deleted, then its record dropped
(``forget``). A dying blob cannot be held or uploaded again until then, so no job is
ever created on a blob whose object is going away. Every step is a Lua script whose
header lists its KEYS and ARGV.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from rayfarm.cluster import keys
from rayfarm.cluster.job_index import scan_jobs
from rayfarm.errors import FarmUnavailable, InvalidRequest

__all__ = ["BLOB_INDEX", "BlobIndex", "Upload", "blobs_of"]

#: The version of the references built over jobs stored before the index (``build``).
BLOB_INDEX = "1"
#: How long a submission's hold lasts should its replica die before releasing it.
HOLD_S = 600.0
#: How long a request waits for a dying blob's object to be deleted before it gives up.
DYING_WAIT_S = 5.0
_DYING_POLL_S = 0.05
_LUA = resources.files("rayfarm.cluster").joinpath("lua")


def _script(name: str) -> str:
    return _LUA.joinpath(name).read_text()


def blobs_of(inputs: str) -> list[tuple[str, int]]:
    """(sha256, size) of each distinct blob a job's input listing (``Inputs.to_json``)
    names; none for anything else (jobs stored by tools and tests name no blobs)."""
    try:
        data = json.loads(inputs)
        files = data["files"] if isinstance(data, dict) else []
        found = {str(sha): int(size) for _, sha, size in files}
    except (ValueError, KeyError, TypeError):
        return []
    return sorted(found.items())


@dataclass(frozen=True)
class Upload:
    """What ``BlobIndex.register_upload`` decided: ``ok`` (indexed, or over the quota),
    and the bytes the user has pending (no job of theirs uses them yet)."""

    ok: bool
    pending_bytes: int


class BlobIndex:
    """The blob index over an asyncio Redis client (``store.connect``'s, the one the job
    store works over)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._hold = redis.register_script(_script("hold_blobs.lua"))
        self._register = redis.register_script(_script("register_upload.lua"))
        self._link = redis.register_script(_script("link_blobs.lua"))
        self._collect = redis.register_script(_script("collect_blob.lua"))
        self._forget = redis.register_script(_script("forget_blobs.lua"))

    # -- submissions -------------------------------------------------------------------

    @asynccontextmanager
    async def holding(self, blobs: Sequence[tuple[str, int]]) -> AsyncIterator[None]:
        """Keep ``blobs`` ((sha256, size)) from being deleted while a submission is
        checked and its job created (the job keeps them after). A blob whose object is
        being deleted now is waited for, then reported as not uploaded (400)."""
        member = f"hold:{uuid.uuid4().hex}"
        shas = [sha for sha, _ in blobs]
        pairs = [k for sha in shas for k in (keys.blob(sha), keys.blob_refs(sha))]
        deadline = time.monotonic() + DYING_WAIT_S
        while shas:
            dying = int(await self._hold(keys=pairs, args=[member, time.time() + HOLD_S]))
            if dying == 0:
                break
            if time.monotonic() > deadline:
                sha = shas[dying - 1]
                raise InvalidRequest(
                    f"blob {sha} is being deleted from the farm: upload it again "
                    f"(PUT /blobs/{sha}) and resubmit",
                    {"missing": [sha]},
                )
            await asyncio.sleep(_DYING_POLL_S)
        try:
            yield
        finally:
            if shas:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for sha in shas:
                        pipe.zrem(keys.blob_refs(sha), member)
                    await pipe.execute()

    async def held_once(self, sha: str) -> bool:
        """Whether one hold or reference alone keeps blob ``sha`` (the caller's own, while
        it holds it): nothing else would lose the blob if the caller deleted it."""
        refs: int = await self.redis.zcard(keys.blob_refs(sha))
        return refs <= 1

    async def link(
        self, pipe: Any, job_id: str, owner: str, blobs: Sequence[tuple[str, int]]
    ) -> None:
        """Queue on ``pipe`` (the job's creation, one MULTI) the references of a new job
        to its blobs; the owner's uploads of them leave the owner's quota."""
        if not blobs:
            return
        blob_keys = [k for sha, _ in blobs for k in (keys.blob(sha), keys.blob_refs(sha))]
        args: list[Any] = [job_id, owner, time.time()]
        for sha, size in blobs:
            args += [sha, size]
        await self._link(
            keys=[keys.uploads_of(owner), keys.upload_bytes(), keys.blob_stats(), *blob_keys],
            args=args,
            client=pipe,
        )

    # -- uploads -------------------------------------------------------------------------

    async def pending_bytes(self, user: str) -> int:
        """Bytes of blobs ``user`` uploaded that no job of theirs uses yet."""
        return int(await self.redis.hget(keys.upload_bytes(), user) or 0)

    async def register_upload(
        self, sha: str, size: int, user: str, grace_s: float, quota_bytes: int
    ) -> Upload:
        """Index an upload of ``user``'s before its object is written: kept ``grace_s``
        unless a job of theirs uses it, counted against ``quota_bytes`` (0: none) until
        then. Waits for a dying blob's deletion to finish first."""
        deadline = time.monotonic() + DYING_WAIT_S
        while True:
            now = time.time()
            ok, pending = await self._register(
                keys=[keys.blob(sha), keys.blob_refs(sha), keys.uploads_of(user),
                      keys.upload_bytes(), keys.blob_stats(), keys.blobs_due()],
                args=[sha, size, user, now + grace_s, quota_bytes, now],
            )  # fmt: skip
            if int(ok) >= 0:
                return Upload(bool(int(ok)), int(pending))
            if time.monotonic() > deadline:
                raise FarmUnavailable(f"blob {sha} is being deleted: upload it again shortly")
            await asyncio.sleep(_DYING_POLL_S)

    async def unregister_upload(self, sha: str, size: int, user: str) -> None:
        """Undo ``register_upload`` when the object could not be written: the upload
        lapses now (the next sweep drops it, and the blob if nothing else keeps it)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(keys.blob_refs(sha), {f"up:{user}": 0}, xx=True)
            pipe.zadd(keys.uploads_of(user), {sha: 0}, xx=True)
            pipe.zadd(keys.blobs_due(), {sha: 0})
            await pipe.execute()

    async def dying(self, shas: Sequence[str]) -> set[str]:
        """Which of ``shas`` are being deleted now (``POST /blobs/missing`` counts them
        as missing: their objects are going)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sha in shas:
                pipe.hget(keys.blob(sha), "state")
            states = await pipe.execute()
        return {sha for sha, state in zip(shas, states, strict=True) if state == "dying"}

    # -- deletion ------------------------------------------------------------------------

    async def collect_due(self, now: float, limit: int = 1000) -> list[str]:
        """Look at up to ``limit`` blobs with a reference that lapsed by ``now``: drop
        lapsed uploads and holds, and return those nothing keeps now (marked dying:
        delete their objects, then ``forget`` them)."""
        due: list[str] = await self.redis.zrangebyscore(keys.blobs_due(), "-inf", now, 0, limit)
        dying = []
        for sha in due:
            refs = await self.redis.zrangebyscore(keys.blob_refs(sha), "-inf", now)
            users = [m[3:] for m in refs if m.startswith("up:")]
            marked = await self._collect(
                keys=[keys.blob(sha), keys.blob_refs(sha), keys.upload_bytes(),
                      keys.blobs_due(), keys.blobs_dying(), *map(keys.uploads_of, users)],
                args=[sha, now, *users],
            )  # fmt: skip
            if int(marked):
                dying.append(sha)
        return dying

    async def stuck(self, before: float, limit: int = 1000) -> list[str]:
        """Blobs marked dying before ``before`` and not forgotten (their deleter died)."""
        found: list[str] = await self.redis.zrangebyscore(
            keys.blobs_dying(), "-inf", before, 0, limit
        )
        return found

    async def forget(self, shas: Iterable[str]) -> int:
        """Drop dying blobs whose objects are deleted; return their bytes."""
        shas = list(shas)
        if not shas:
            return 0
        pairs = [k for sha in shas for k in (keys.blob(sha), keys.blob_refs(sha))]
        freed = await self._forget(
            keys=[keys.blobs_dying(), keys.blob_stats(), keys.blobs_due(), *pairs], args=shas
        )
        return int(freed)

    async def sizes(self, shas: Sequence[str]) -> dict[str, int]:
        """The indexed size of each of ``shas`` (0 when not indexed)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sha in shas:
                pipe.hget(keys.blob(sha), "size")
            found = await pipe.execute()
        return {sha: int(size or 0) for sha, size in zip(shas, found, strict=True)}

    async def stats(self) -> dict[str, int]:
        """``count`` and ``bytes`` of the blobs indexed, and ``pending_bytes``: uploads
        no job uses yet, every user's together."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.blob_stats())
            pipe.hvals(keys.upload_bytes())
            totals, pending = await pipe.execute()
        return {
            "count": int(totals.get("count", 0)),
            "bytes": int(totals.get("bytes", 0)),
            "pending_bytes": sum(int(v) for v in pending),
        }

    # -- jobs stored before the index ------------------------------------------------------

    async def build(self, page: int = 500) -> int:
        """Index the blobs of jobs stored before this index existed, once per store
        (``keys.blobs_indexed`` records it; idempotent, so replicas racing here do no
        harm). Returns how many jobs it linked. Deletion runs it first: a blob of an
        older job must not look unused."""
        if await self.redis.get(keys.blobs_indexed()) == BLOB_INDEX:
            return 0
        linked = 0
        async for rows in scan_jobs(self.redis, ("owner", "inputs"), page):
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, _, (owner, inputs) in rows:
                    if owner is not None and inputs:
                        await self.link(pipe, job_id, owner, blobs_of(inputs))
                        linked += 1
                await pipe.execute()
        await self.redis.set(keys.blobs_indexed(), BLOB_INDEX)
        return linked
