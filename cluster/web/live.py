"""What the web page watches: its jobs, live (``GET /watch``), which jobs a list shows
(``GET /watch/list``), and the farm's workers and queue (``GET /farm``).

``/watch`` is one Server-Sent Events stream over several jobs, each message the job's
whole record whenever it changed. Why not the page opening ``/jobs/{id}/events`` per
job: a browser holds at most six HTTP/1.1 connections per host, so a list of fifty
jobs would starve its own thumbnails and clicks; and the list wants each job's state,
counters and times, which the job record has and the events would have to rebuild.
The stream costs the farm one read per burst of events per job (as a status
long-poll does), waits through the process's one ``EventHub`` and holds no Redis
connection while it waits.

Why not one farm-wide stream of every job's events: the farm keeps events per job, and
such a stream would read all of them to filter them by visibility. What a list needs
farm-wide is smaller: which jobs appeared or changed state (``keys.changes``, written
with each job's creation and in the transition script). ``/watch/list`` follows that,
filtered by the requester's visibility, and the page re-reads its page of ``GET /jobs``
(which applies the API's filters and paging) when a change could alter it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from rayfarm.cluster import keys
from rayfarm.cluster.auth import Principal
from rayfarm.cluster.context import AppContext, Ctx, Who, check_may_change, visible_job
from rayfarm.cluster.events import HEARTBEAT_S
from rayfarm.cluster.observe import SSE_RETRY_MS, dispatcher_stats
from rayfarm.errors import Forbidden, InvalidRequest
from rayfarm.models import TRANSITIONS, JobRecord, JobState

__all__ = ["router"]

log = logging.getLogger("rayfarm.web")

router = APIRouter(tags=["progress"])

#: Most jobs one ``/watch`` stream follows (the page shows at most 50 at a time).
MAX_WATCH = 100
#: How long a woken watcher gathers further events before it reads the job again: a
#: busy job changes many times a second, and a page wants a few updates a second.
WATCH_COALESCE_S = 0.25
#: Longest ``jobs`` query read (a little over MAX_WATCH ids, so a list of too many ids is
#: refused by its count, which says more than its length).
MAX_WATCH_QUERY = 4096


@router.get(
    "/watch",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def watch_jobs(
    ctx: Ctx,
    who: Who,
    jobs: Annotated[
        str,
        Query(
            max_length=MAX_WATCH_QUERY,
            description=f"Comma-separated job ids, at most {MAX_WATCH}.",
        ),
    ],
) -> StreamingResponse:
    """Several jobs, live, as Server-Sent Events: for each job, at once and then after
    every change, ``event: job`` with ``data`` ``{"job": <the Job>, "actions": {"change":
    bool, "cancel": bool, "retry": bool}}``: whether the requester may change the job at
    all, and whether it may cancel or retry it now (the API's own rights check and
    transition table). A job's messages stop after it reaches a terminal state;
    ``event: end`` follows the last and the stream closes. A comment every 15 s keeps
    idle connections open. A reconnecting client gets every job's record again, so it
    needs no event id. Every job must be one the requester may see (404 otherwise). It
    counts as one of the user's open streams (``RAYFARM_MAX_STREAMS_PER_USER``, 429)."""
    ids = list(dict.fromkeys(part.strip() for part in jobs.split(",") if part.strip()))
    if not ids:
        raise InvalidRequest("jobs: give at least one job id (comma-separated)")
    if len(ids) > MAX_WATCH:
        raise InvalidRequest(f"jobs: at most {MAX_WATCH} jobs per stream, not {len(ids)}")
    may_change = {}
    for job_id in ids:
        await visible_job(ctx, who, job_id)  # 404 naming the job before the stream starts
        may_change[job_id] = await _may_change(ctx, who, job_id)
    lease = await ctx.streams.take(who.name, "a watch of jobs")
    return StreamingResponse(
        lease.hold(_stream(ctx, may_change)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/watch/list",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def watch_list(ctx: Ctx, who: Who) -> StreamingResponse:
    """Which jobs appear or change state, as Server-Sent Events, for a list of jobs to
    stay current: first ``event: ready`` (read the list now: changes from here on
    follow), then ``event: change`` with ``data`` ``{"job", "owner", "project",
    "state"}`` for each job the requester may see that was submitted (``PENDING``),
    moved to ``state``, or deleted (``DELETED``: ``DELETE /jobs/{id}``, retention). A
    comment every 15 s keeps idle connections open; the stream does
    not end. A reconnecting client gets ``ready`` again and re-reads its list, so it
    needs no event id. What a job does between its state changes (frames, progress) is
    ``/watch``'s and ``/jobs/{id}/events``'. It counts as one of the user's open streams
    (``RAYFARM_MAX_STREAMS_PER_USER``, 429)."""
    lease = await ctx.streams.take(who.name, "a watch of the job list")
    return StreamingResponse(
        lease.hold(_changes(ctx, who)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _changes(ctx: AppContext, who: Principal) -> AsyncIterator[bytes]:
    yield f"retry: {SSE_RETRY_MS}\n\n".encode()
    last = await ctx.store.last_change()
    yield b"event: ready\ndata: {}\n\n"
    stream = keys.changes()
    while True:
        entries = await ctx.hub.read_after(stream, last)
        for entry_id, fields in entries:
            last = entry_id
            change = {
                "job": fields["job"],
                "owner": fields["owner"],
                "project": fields["project"] or None,
                "state": fields["state"],
            }
            if who.can_read(fields["owner"], fields["project"] or None):
                yield f"event: change\ndata: {json.dumps(change)}\n\n".encode()
        if not entries and not await ctx.hub.wait_stream(stream, last, HEARTBEAT_S):
            yield b": keep-alive\n\n"


async def _may_change(ctx: AppContext, who: Principal, job_id: str) -> bool:
    """Whether ``who`` may cancel or retry the job at all (its owner and project are
    fixed at submission, so this is asked once per stream)."""
    try:
        await check_may_change(ctx, who, job_id)
    except Forbidden:
        return False
    return True


def _message(job: JobRecord, may_change: bool) -> bytes:
    allowed = TRANSITIONS[job.state]
    actions = {
        "change": may_change,
        "cancel": may_change and JobState.CANCELLED in allowed,
        "retry": may_change and job.state is JobState.FAILED and JobState.PENDING in allowed,
    }
    data = json.dumps({"job": job.model_dump(mode="json"), "actions": actions})
    return f"event: job\ndata: {data}\n\n".encode()


_DONE = object()


async def _stream(ctx: AppContext, may_change: dict[str, bool]) -> AsyncIterator[bytes]:
    yield f"retry: {SSE_RETRY_MS}\n\n".encode()
    out: asyncio.Queue[Any] = asyncio.Queue()
    feeds = [asyncio.create_task(_feed(ctx, j, may, out)) for j, may in may_change.items()]
    try:
        left = len(feeds)
        while left:
            try:
                item = await asyncio.wait_for(out.get(), HEARTBEAT_S)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if item is _DONE:
                left -= 1
            elif isinstance(item, BaseException):
                # Closed without `end`: the browser reconnects and gets every record anew.
                log.warning("watch: following a job failed", exc_info=item)
                return
            else:
                yield item
        yield b"event: end\ndata: {}\n\n"
    finally:
        for feed in feeds:
            feed.cancel()


async def _feed(ctx: AppContext, job_id: str, may_change: bool, out: asyncio.Queue[Any]) -> None:
    """Put the job's record on ``out`` now and after each change, until it is terminal."""
    try:
        while True:
            # The newest event first: a change after it wakes the wait below, so nothing
            # between this read and the record's is missed (at worst it is sent twice).
            event = (await ctx.store.status(job_id)).event
            job = await ctx.store.get(job_id)
            await out.put(_message(job, may_change))
            if job.state.is_terminal:
                break
            while not await ctx.hub.wait(job_id, event, HEARTBEAT_S):
                pass
            await asyncio.sleep(WATCH_COALESCE_S)
    except Exception as exc:
        await out.put(exc)
        return
    await out.put(_DONE)


@router.get("/farm", tags=["farm"])
async def farm(ctx: Ctx, _: Who) -> dict[str, Any]:
    """The farm at a glance, for any signed-in user: its render actors (index, node,
    host, device, busy), its size (``scaling``: render nodes and slots up and requested,
    ``autoscaling`` on or off, its bounds, and the work of each pool), the tasks
    waiting for an actor, the jobs queued and the jobs in each state. ``dispatcher`` is
    false (and ``actors`` empty, ``scaling`` and ``tasks_pending`` null) while the
    dispatcher does not answer."""
    snapshot = await ctx.store.metrics()
    stats = await dispatcher_stats(ctx)
    actors = [
        {
            "index": a["index"],
            "node": a.get("node") or "",
            "host": a.get("host") or "",
            "device": a.get("device") or "",
            "busy": bool(a["busy"]),
        }
        for a in (stats or {}).get("actors", [])
    ]
    actors.sort(key=lambda a: (a["host"], a["node"], a["index"]))
    return {
        "dispatcher": stats is not None,
        "actors": actors,
        "scaling": None if stats is None else stats["scaling"],
        "tasks_pending": None if stats is None else stats["pending"],
        "queue_depth": snapshot["queue_depth"],
        "jobs": {str(state): n for state, n in snapshot["jobs"].items()},
    }
