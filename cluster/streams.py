"""How many event streams each user holds open, farm-wide, and the limit on it.

Every long-lived stream the farm serves — ``GET /jobs/{id}/events``, ``GET /watch``,
``GET /watch/list`` and gRPC ``StreamProgress`` — holds a lease from ``StreamLeases``
while it is open. A user holding ``max_streams_per_user`` of them is refused another
(``TooManyRequests``, 429; gRPC ``RESOURCE_EXHAUSTED``) until one closes: one artist
(or one script with an artist's token) cannot hold thousands of streams open and with
them the replicas' connections and memory.

The leases live in Redis (``keys.streams``: a sorted set per user, lease id -> expiry),
so the count is the farm's, whichever replica serves each stream. A lease is released
when its stream ends; one whose replica died with it expires: each process renews the
leases it holds every ``RENEW_S`` for ``LEASE_S``, and the take-or-renew script
(``lua/stream_lease.lua``) drops expired ones before it counts.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import weakref
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from rayfarm.cluster import keys
from rayfarm.errors import TooManyRequests

__all__ = ["LEASE_S", "RENEW_S", "StreamLease", "StreamLeases"]

log = logging.getLogger("rayfarm.streams")

#: How long a lease outlives its last renewal: a stream whose replica died stops
#: counting this long after.
LEASE_S = 60.0
#: How often a process renews the leases of its open streams (several times a lease, so
#: a slow or failed renewal or two loses none).
RENEW_S = 15.0

_LEASE_LUA = resources.files("rayfarm.cluster").joinpath("lua", "stream_lease.lua").read_text()


class StreamLease:
    """One open stream's place in its user's count; ``release`` gives it back (once)."""

    def __init__(self, leases: StreamLeases, user: str, lease_id: str) -> None:
        self.leases, self.user, self.id = leases, user, lease_id
        self.released = False

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        await self.leases.release(self)

    async def hold(self, body: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """``body``, holding this lease until it ends, fails or its client goes away."""
        try:
            async for item in body:
                yield item
        finally:
            # The stream is cancelled when its client disconnects; the release must still
            # reach Redis (else the lease only expires, LEASE_S later).
            await asyncio.shield(self.release())


class StreamLeases:
    """The farm-wide count of open streams per user, over an asyncio Redis client."""

    def __init__(self, redis: Any, limit: int, lease_s: float = LEASE_S) -> None:
        self.redis = redis
        self.limit = limit
        self.lease_ms = int(lease_s * 1000)
        self._script = redis.register_script(_LEASE_LUA)
        # The leases this process holds. Weak: a lease whose stream never started (its
        # client gone before the first byte) is forgotten with it and then expires.
        self._held: weakref.WeakSet[StreamLease] = weakref.WeakSet()
        self._renewer: asyncio.Task[None] | None = None

    async def take(self, user: str, what: str) -> StreamLease:
        """A lease for one more stream of ``user``; ``TooManyRequests`` when the user
        already holds ``limit``. ``what`` names the stream in the refusal."""
        lease = StreamLease(self, user, secrets.token_hex(8))
        taken = await self._script(
            keys=[keys.streams(user)], args=[self.limit, self.lease_ms, lease.id]
        )
        if not taken:
            raise TooManyRequests(
                f"{user} already has {self.limit} event streams open, the most one user may "
                f"hold (RAYFARM_MAX_STREAMS_PER_USER): close one before opening {what}",
                {"limit": self.limit, "setting": "RAYFARM_MAX_STREAMS_PER_USER"},
            )
        self._held.add(lease)
        self._ensure_renewer()
        return lease

    async def release(self, lease: StreamLease) -> None:
        self._held.discard(lease)
        try:
            await self.redis.zrem(keys.streams(lease.user), lease.id)
        except Exception:
            # The stream is over either way; its lease expires on its own.
            log.warning("could not release a stream lease of %s", lease.user, exc_info=True)

    async def count(self, user: str) -> int:
        """How many streams ``user`` holds open now (expired leases not counted)."""
        await self._script(keys=[keys.streams(user)], args=[0, self.lease_ms])
        return int(await self.redis.zcard(keys.streams(user)))

    def _ensure_renewer(self) -> None:
        loop = asyncio.get_running_loop()
        if self._renewer is None or self._renewer.done() or self._renewer.get_loop() is not loop:
            self._renewer = loop.create_task(self._renew())

    async def _renew(self) -> None:
        while self._held:
            await asyncio.sleep(RENEW_S)
            by_user: dict[str, list[str]] = {}
            for lease in list(self._held):
                if not lease.released:
                    by_user.setdefault(lease.user, []).append(lease.id)
            try:
                for user, ids in by_user.items():
                    await self._script(keys=[keys.streams(user)], args=[0, self.lease_ms, *ids])
            except Exception:
                log.warning("could not renew the stream leases; retrying", exc_info=True)
