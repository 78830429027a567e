"""A job's execution log, as clients follow it: one blocking read per process, many
followers.

Every event lives in the job's Redis stream (``keys.events``); its id is the stream
entry's id, so a client that reconnects with the last id it saw (``Last-Event-ID``)
gets exactly what it missed and nothing twice.

``EventHub`` is the one place a process waits on Redis for new events: however many
SSE streams, gRPC streams and status long-polls are open, the hub runs a single
``XREAD BLOCK`` over the streams they wait on and wakes the waiters of a stream
that grew. A follower never holds a Redis connection while it waits (a blocked
XREAD per client would cost a connection each, and Redis and the replica's file
descriptors run out long before the event loop does).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from rayfarm.cluster import keys
from rayfarm.cluster.store import JobStore
from rayfarm.models import JobState

__all__ = ["EVENT_ID", "HEARTBEAT_S", "EventHub", "decode", "follow", "sse"]

#: An event's id, as clients send it back (``Last-Event-ID``, ``after``): a Redis stream
#: id, two unsigned 64-bit numbers; at most 19 digits each, so any id matched fits.
EVENT_ID = r"^\d{1,19}-\d{1,19}$"

log = logging.getLogger("rayfarm.events")

#: Longest a follower stays silent: SSE sends a comment, gRPC nothing (the hub tick).
HEARTBEAT_S = 15.0
#: The hub's XREAD blocks this long at most, so a new waiter joins the read quickly.
HUB_BLOCK_MS = 100
#: Events read per round trip while a follower catches up.
BATCH = 500

#: Event fields that are numbers (Redis streams hold strings).
_INTS = frozenset({"frame", "tile", "actor", "attempt", "samples", "of", "tasks", "frames"})
#: ... and so is every field named ``*_s`` (seconds: a task's steps, ``finish_s``, ...).
_FLOATS = frozenset({"seconds", "finish_s", "remaining_s"})
_BOOLS = frozenset({"retry"})


def decode(event_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """One stream entry as the JSON clients get: ``id``, ``kind``, ``at`` and the
    kind's own fields, numbers as numbers."""
    out: dict[str, Any] = {"id": event_id}
    for name, value in fields.items():
        if name in _INTS:
            out[name] = int(value)
        elif name in _FLOATS or name.endswith("_s"):
            out[name] = float(value)
        elif name in _BOOLS:
            out[name] = value == "True"
        else:
            out[name] = value
    return out


def _id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


class EventHub:
    """Wakes coroutines waiting for a stream's next entry (a job's events, the farm's
    changes); one per process and loop."""

    def __init__(self, store: JobStore, block_ms: int = HUB_BLOCK_MS) -> None:
        self.store = store
        self.block_ms = block_ms
        self._waiters: dict[str, list[tuple[tuple[int, int], asyncio.Future[None]]]] = {}
        self._joined = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._reads: dict[tuple[str, str | None, int], asyncio.Future[Any]] = {}

    @property
    def waiting(self) -> int:
        """How many waits are open now (SSE streams, long-polls, gRPC streams)."""
        return sum(len(w) for w in self._waiters.values())

    async def wait(self, job_id: str, after: str | None, timeout_s: float) -> bool:
        """Block until the job has an event newer than ``after`` (None: any event), or
        ``timeout_s`` passes; True if one came."""
        return await self.wait_stream(keys.events(job_id), after, timeout_s)

    async def wait_stream(self, stream: str, after: str | None, timeout_s: float) -> bool:
        """Block until the Redis stream ``stream`` has an entry newer than ``after``
        (None: any entry), or ``timeout_s`` passes; True if one came."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._joined = asyncio.Event()
            self._task = loop.create_task(self._run())
        entry = (_id(after or "0-0"), loop.create_future())
        self._waiters.setdefault(stream, []).append(entry)
        self._joined.set()
        try:
            await asyncio.wait_for(asyncio.shield(entry[1]), timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(stream, [])
            if entry in waiters:
                waiters.remove(entry)
            if not waiters:
                self._waiters.pop(stream, None)

    async def events_after(
        self, job_id: str, after: str | None, count: int = BATCH
    ) -> list[tuple[str, dict[str, str]]]:
        """``JobStore.events_after``, shared: the followers one event wakes (every open
        stream of a job) read it in one round trip between them, not one each."""
        return await self.read_after(keys.events(job_id), after, count)

    async def read_after(
        self, stream: str, after: str | None, count: int = BATCH
    ) -> list[tuple[str, dict[str, str]]]:
        """``JobStore.read_after``, shared the same way (every list following the
        farm's changes reads a change once between them)."""
        key = (stream, after, count)
        read = self._reads.get(key)
        if read is None:
            read = asyncio.ensure_future(self.store.read_after(stream, after, count))
            self._reads[key] = read
            read.add_done_callback(lambda _: self._reads.pop(key, None))
        entries: list[tuple[str, dict[str, str]]] = await asyncio.shield(read)
        return entries

    async def _run(self) -> None:
        while True:
            if not self._waiters:
                self._joined.clear()
                await self._joined.wait()
                continue
            # Each stream is read from its oldest waiter's position: the first entry
            # after it satisfies that waiter at least, so every round makes progress.
            streams = {
                stream: "{}-{}".format(*min(pos for pos, _ in waiters))
                for stream, waiters in self._waiters.items()
            }
            try:
                found = await self.store.read_new(streams, self.block_ms)
            except Exception:
                log.warning("event hub: reading Redis failed; retrying", exc_info=True)
                await asyncio.sleep(1.0)
                continue
            for stream, entries in found or []:
                newest = _id(entries[-1][0])
                for pos, future in self._waiters.get(stream, []):
                    if pos < newest and not future.done():
                        future.set_result(None)


async def follow(
    store: JobStore, hub: EventHub, job_id: str, after: str | None = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> AsyncIterator[dict[str, Any] | None]:  # fmt: skip
    """The job's events after ``after`` (from the start when None), oldest first, as
    ``decode`` gives them; None every ``heartbeat_s`` of silence. Ends with the event
    that put the job in the terminal state it is in (or at once, when a job already in
    one has nothing after ``after``).

    Raises ``JobNotFound`` before the first event for an unknown job.
    """
    await store.status(job_id)  # JobNotFound before anything is sent
    last = after
    while True:
        entries = await hub.events_after(job_id, last, BATCH)
        if not entries:
            state = await store.field(job_id, "state")
            if state is None or JobState(state).is_terminal:
                # The terminal event is written with the state, in one script: a read
                # after seeing the state has it, if the read before did not.
                entries = await store.events_after(job_id, last, BATCH)
                if not entries:
                    return
        for event_id, fields in entries:
            last = event_id
            yield decode(event_id, fields)
            if fields.get("kind") == "state" and JobState(fields["to"]).is_terminal:
                # The end, unless a retry followed: the job's current state was set by
                # this very event (the transition script records which).
                current = await store.field(job_id, "state_event")
                if current in (None, event_id):
                    return
        if entries:
            continue
        if not await hub.wait(job_id, last, heartbeat_s):
            yield None


def sse(event: dict[str, Any] | None) -> bytes:
    """One Server-Sent Events message: ``id``, ``event`` (the kind) and JSON ``data``;
    a comment line for a heartbeat (None)."""
    if event is None:
        return b": keep-alive\n\n"
    return f"id: {event['id']}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n".encode()
