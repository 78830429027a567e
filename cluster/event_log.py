"""A job's execution log and the farm's changes, as the job store writes and reads them:
each job's event stream (``keys.events``: states, tasks, frames, warnings, ...) and the
farm-wide changes stream (``keys.changes``: one entry per creation and state change)
that lists of jobs follow. ``EventLog`` is a part of ``JobStore``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rayfarm.cluster import keys

__all__ = ["CHANGES_MAXLEN", "EVENTS_MAXLEN", "EventLog", "now_iso"]

#: Default approximate cap on each job's event stream (its execution log), in events.
EVENTS_MAXLEN = 100_000
#: Entries the farm-wide changes stream keeps (about): its followers read from its end.
CHANGES_MAXLEN = 10_000


def now_iso() -> str:
    """Now, in UTC, as the store writes times (ISO 8601)."""
    return datetime.now(UTC).isoformat()


class EventLog:
    """Appending to and reading a job's events and the farm's changes (a part of
    ``JobStore``, over its Redis client)."""

    # Set by JobStore.__init__.
    _redis: Any
    events_maxlen: int

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
