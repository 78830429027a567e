"""Watching the farm: a job's live event stream (SSE), its execution log, each task's
Blender output, and the farm's Prometheus metrics."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from rayfarm.cluster import storage as layout
from rayfarm.cluster.context import AppContext, Ctx, JobId, Who
from rayfarm.cluster.events import EVENT_ID, decode, follow, sse
from rayfarm.cluster.progress import RENDER_S_BUCKETS
from rayfarm.cluster.sweeper import AREAS, measured_usage
from rayfarm.errors import InvalidRequest, NotFound
from rayfarm.events import format_event
from rayfarm.models import JobState

__all__ = ["dispatcher_stats", "router"]

router = APIRouter(tags=["progress"])

_EVENT_ID = re.compile(EVENT_ID)
_TASK = re.compile(r"^f\d{7}t\d{3}$")
#: Client reconnect delay the SSE stream asks for, in milliseconds.
SSE_RETRY_MS = 2000
#: Most events one ``/logs`` answer holds (page on with ``after``).
MAX_LOG_EVENTS = 10_000
#: How long ``/metrics`` waits for the dispatcher's view of the actors.
STATS_TIMEOUT_S = 2.0


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_events(
    job_id: JobId,
    ctx: Ctx,
    who: Who,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[str | None, Query(pattern=EVENT_ID)] = None,
) -> StreamingResponse:
    """The job's execution log as Server-Sent Events, live: every event so far (or those
    after ``Last-Event-ID`` / ``after``), then each new one as it happens.

    Each message has ``id`` (reconnect with it as ``Last-Event-ID`` to get exactly what
    you missed), ``event`` (the kind: ``state``, ``task_queued``, ``task_started``,
    ``progress``, ``task_done``, ``task_failed``, ``task_retried``, ``frame``,
    ``warning``, ...) and JSON ``data``. A comment every 15 s keeps idle connections
    open. After the job's terminal state the stream sends ``event: end`` and closes.
    A user holds at most ``RAYFARM_MAX_STREAMS_PER_USER`` streams open (429 past it).
    """
    start = last_event_id.strip() if last_event_id else after
    if start is not None and not _EVENT_ID.match(start):
        raise InvalidRequest(f"Last-Event-ID {start!r} is not an event id (such as 1-0)")
    await ctx.store.status(job_id)  # 404 before the stream starts
    lease = await ctx.streams.take(who.name, f"the events of job {job_id}")

    async def body() -> AsyncIterator[bytes]:
        yield f"retry: {SSE_RETRY_MS}\n\n".encode()
        async for event in follow(ctx.store, ctx.hub, job_id, start):
            yield sse(event)
        state = await ctx.store.field(job_id, "state")
        yield f'event: end\ndata: {{"state": "{state}"}}\n\n'.encode()

    return StreamingResponse(
        lease.hold(body()),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/jobs/{job_id}/logs", response_model=None)
async def job_log(
    job_id: JobId,
    ctx: Ctx,
    after: Annotated[str | None, Query(pattern=EVENT_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LOG_EVENTS)] = MAX_LOG_EVENTS,
    format: Literal["text", "json"] = "text",
) -> Response | dict[str, Any]:
    """The job's execution log so far: one line per event (``format=json``: the events
    as the event stream sends them, with ``next`` to page on with ``after``)."""
    await ctx.store.status(job_id)
    entries = await ctx.store.events_after(job_id, after, limit)
    events = [decode(i, f) for i, f in entries]
    if format == "json":
        return {"events": events, "next": events[-1]["id"] if events else after}
    return PlainTextResponse("".join(format_event(e) + "\n" for e in events))


@router.get("/jobs/{job_id}/tasks/{task}/log", response_class=PlainTextResponse)
async def task_log(job_id: JobId, task: str, ctx: Ctx) -> PlainTextResponse:
    """Blender's own output while rendering ``task`` (``f0000012t003``: frame 12, tile
    3), every attempt in order, each under a header line."""
    if not _TASK.match(task):
        raise InvalidRequest(f"{task!r} is not a task id (such as f0000001t000)")
    await ctx.store.status(job_id)
    found = await asyncio.to_thread(ctx.storage.list, layout.task_logs_prefix(job_id, task))
    if not found:
        raise NotFound(f"job {job_id} has no log for task {task}", {"task": task})
    parts = []
    for key, _ in found:
        attempt = int(key.rsplit("/", 1)[-1].split(".")[0])
        text = (await asyncio.to_thread(ctx.storage.read_bytes, key)).decode(errors="replace")
        parts.append(f"===== {task} attempt {attempt} =====\n{text.rstrip()}\n")
    return PlainTextResponse("".join(parts))


@router.get("/metrics", response_class=PlainTextResponse, tags=["farm"])
async def metrics(ctx: Ctx) -> Response:
    """The farm in Prometheus's text format: jobs by state and stored, queue depth, tasks
    done and failed (rate() gives tasks per second), a histogram of render seconds per
    task, render actors by device and state, tasks queued by pool, render slots and nodes
    up and requested (autoscaling), bytes uploaded, open event streams; storage
    used by jobs and blobs (as the last housekeeping sweep measured it), blobs indexed
    and uploads no job uses yet, Redis's memory; jobs deleted, refused requests."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.core import CollectorRegistry

    snapshot = await ctx.store.metrics()
    snapshot["storage"] = await measured_usage(ctx.redis)
    snapshot["blobs"] = await ctx.store.blobs.stats()
    stats = await dispatcher_stats(ctx)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot, stats, ctx.hub.waiting))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def dispatcher_stats(ctx: AppContext) -> dict[str, Any] | None:
    """The dispatcher's view of the pool, or None when it does not answer in time."""
    if ctx.stats is None:
        return None
    try:
        stats: dict[str, Any] = await asyncio.wait_for(ctx.stats(), STATS_TIMEOUT_S)
        return stats
    except Exception:
        return None  # the dispatcher restarting: the metrics say so with rayfarm_up 0


class _Collector:
    """One scrape's worth of metrics, from a Redis snapshot and the dispatcher's stats."""

    def __init__(self, snapshot: dict[str, Any], stats: dict[str, Any] | None, streams: int):
        self.snapshot, self.stats, self.streams = snapshot, stats, streams

    def collect(self) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        counters: dict[str, float] = self.snapshot["counters"]
        jobs = GaugeMetricFamily("rayfarm_jobs", "Jobs by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([str(state)], self.snapshot["jobs"][state])
        yield jobs
        yield GaugeMetricFamily(
            "rayfarm_queue_depth", "Jobs waiting in the queue.", value=self.snapshot["queue_depth"]
        )
        yield from self._usage()
        for name, help_text in (
            ("jobs_submitted", "Jobs accepted."),
            ("tasks_done", "Render tasks (frames or tiles) finished."),
            ("tasks_failed", "Render task attempts that failed."),
            ("frames_stored", "Frames written to storage."),
            ("upload_bytes", "Bytes of scene files uploaded (new blobs only)."),
            ("upload_blobs", "Scene files uploaded (new blobs only)."),
            ("jobs_deleted", "Jobs deleted (DELETE /jobs/{id}, rayfarm rm, retention)."),
            ("refused_sign_in", "Failed sign-ins (401, or 429 past the address's limit)."),
            ("refused_anonymous", "Other state changes asked without a valid token."),
        ):
            yield CounterMetricFamily(
                f"rayfarm_{name}", help_text, value=counters.get(f"{name}_total", 0.0)
            )
        buckets, cumulative = [], 0.0
        for bound in [*(f"{b:g}" for b in RENDER_S_BUCKETS), "+Inf"]:
            cumulative += counters.get(f"render_s_bucket:{bound}", 0.0)
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "rayfarm_task_render_seconds",
            "Seconds each finished render task took on its actor.",
            buckets=buckets,
            sum_value=counters.get("render_s_sum", 0.0),
        )
        up = GaugeMetricFamily("rayfarm_dispatcher_up", "1 when the dispatcher answered.")
        up.add_metric([], 0.0 if self.stats is None else 1.0)
        yield up
        actors = GaugeMetricFamily(
            "rayfarm_actors", "Render actors by device and state.", labels=["device", "state"]
        )
        pending = GaugeMetricFamily("rayfarm_tasks_pending", "Tasks waiting for an actor.")
        if self.stats is not None:
            counts: dict[tuple[str, str], int] = {}
            for actor in self.stats["actors"]:
                key = (actor["device"] or "starting", "busy" if actor["busy"] else "idle")
                counts[key] = counts.get(key, 0) + 1
            for (device, busy), n in sorted(counts.items()):
                actors.add_metric([device, busy], n)
            pending.add_metric([], self.stats["pending"])
        yield actors
        yield pending
        yield from self._scaling()
        yield GaugeMetricFamily(
            "rayfarm_event_waits", "Event streams and long-polls open on this replica.",
            value=self.streams,
        )  # fmt: skip

    def _scaling(self) -> Any:
        """The farm's demand by pool, and its size: render slots and nodes up, and asked
        of the cluster's autoscaler (0 unless autoscaling is on)."""
        from prometheus_client.core import GaugeMetricFamily

        scaling = (self.stats or {}).get("scaling")
        queued = GaugeMetricFamily(
            "rayfarm_pool_tasks_queued",
            "Tasks waiting for a render slot, by pool (Blender version/kind of slot): in "
            "running jobs, and in queued jobs that may start.",
            labels=["pool"],
        )
        sizes = {
            "slots_requested": "Render slots the farm asks the cluster's autoscaler for.",
            "slots_up": "Render slots (GPUs over RAYFARM_GPU_SHARE, or CPU actors) up now.",
            "nodes_requested": "Render nodes the farm asks the cluster's autoscaler for.",
            "nodes_up": "Render nodes up now.",
        }
        gauges = {
            name: GaugeMetricFamily(f"rayfarm_render_{name}", text) for name, text in sizes.items()
        }
        if scaling is not None:
            for pool, figures in scaling["pools"].items():
                queued.add_metric([pool], figures["queued"])
            for name, gauge in gauges.items():
                gauge.add_metric([], scaling[name])
        yield queued
        yield from gauges.values()

    def _usage(self) -> Any:
        """What the farm holds: jobs, Redis memory, storage, blobs."""
        from prometheus_client.core import GaugeMetricFamily

        snap = self.snapshot
        yield GaugeMetricFamily(
            "rayfarm_jobs_stored", "Jobs the farm holds, in any state.", value=snap["jobs_stored"]
        )
        yield GaugeMetricFamily(
            "rayfarm_redis_used_memory_bytes", "Redis's used_memory (INFO memory).",
            value=snap["redis_used_memory"],
        )  # fmt: skip
        usage: dict[str, float] = snap["storage"]
        size = GaugeMetricFamily(
            "rayfarm_storage_bytes",
            "Bytes in storage by area (jobs: frames, outputs, logs; blobs: inputs), as the "
            "last housekeeping sweep measured them.",
            labels=["area"],
        )
        objects = GaugeMetricFamily(
            "rayfarm_storage_objects", "Objects in storage by area (last sweep).", labels=["area"]
        )
        for area in AREAS:
            if f"{area}_bytes" in usage:
                size.add_metric([area], usage[f"{area}_bytes"])
                objects.add_metric([area], usage[f"{area}_objects"])
        yield size
        yield objects
        measured = GaugeMetricFamily(
            "rayfarm_storage_measured_timestamp_seconds", "When the last sweep measured storage."
        )
        if "measured_at" in usage:
            measured.add_metric([], usage["measured_at"])
        yield measured
        blobs = snap["blobs"]
        yield GaugeMetricFamily(
            "rayfarm_blobs_indexed", "Blobs (job inputs) the farm keeps.", value=blobs["count"]
        )
        yield GaugeMetricFamily(
            "rayfarm_blobs_indexed_bytes", "Bytes of the blobs the farm keeps.",
            value=blobs["bytes"],
        )  # fmt: skip
        yield GaugeMetricFamily(
            "rayfarm_uploads_pending_bytes",
            "Bytes of uploaded blobs no job of their uploader uses yet (what upload quotas count).",
            value=blobs["pending_bytes"],
        )
