"""A job's progress as the dispatcher records it: tasks started and finished, frames
stored with their metadata, attempts, sliced frames' previews in progress, and the
farm-wide counters (``metrics``). Each batch of tasks started or finished is one Lua
script (``lua/start_tasks.lua``, ``lua/finish_tasks.lua``: one round trip, and nothing
recorded once the job left PROCESSING). ``TaskProgress`` is a part of ``JobStore``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Any

from rayfarm.cluster import keys
from rayfarm.cluster.event_log import now_iso
from rayfarm.models import JobState

__all__ = ["NOT_PROCESSING", "RENDER_S_BUCKETS", "Finished", "TaskProgress"]

#: Upper bounds (seconds) of the render-time histogram's buckets (+Inf is implied).
RENDER_S_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: What ``finish_tasks`` answers when the job left PROCESSING (nothing was recorded).
NOT_PROCESSING = -1

_LUA = resources.files("rayfarm.cluster").joinpath("lua")
_START_TASKS_LUA = _LUA.joinpath("start_tasks.lua").read_text()
_FINISH_TASKS_LUA = _LUA.joinpath("finish_tasks.lua").read_text()


@dataclass(frozen=True)
class Finished:
    """One finished task and/or stored frame, as ``JobStore.finish_tasks`` records it.

    ``task`` (a task key) marks the task done with its ``task_done`` event (``seconds``
    and the ``done`` fields: frame, tile, attempt, actor, node, host, device);
    ``object_key`` records the frame stored there with its ``meta`` (sha256, size,
    render_s, device) and its ``frame`` event (``frame_event``: finish_s for a tiled
    frame). A whole frame has both; a tile only the task; a tiled frame's finish only
    the frame.
    """

    frame: int
    task: str | None = None
    seconds: float = 0.0
    done: dict[str, Any] = field(default_factory=dict)
    object_key: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    frame_event: dict[str, Any] = field(default_factory=dict)


class TaskProgress:
    """Recording and reading a job's progress (a part of ``JobStore``, over its Redis
    client)."""

    # Set by JobStore.__init__.
    _redis: Any
    events_maxlen: int

    # The scripts are registered on first use: the part has no __init__ of its own.
    @cached_property
    def _start_tasks(self) -> Any:
        return self._redis.register_script(_START_TASKS_LUA)

    @cached_property
    def _finish_tasks(self) -> Any:
        return self._redis.register_script(_FINISH_TASKS_LUA)

    async def frames_done(self, job_id: str) -> dict[int, str]:
        data = await self._redis.hgetall(keys.frames(job_id))
        return {int(k): v for k, v in data.items()}

    async def tasks_done(self, job_id: str) -> set[str]:
        return set(await self._redis.hkeys(keys.tasks(job_id)))

    async def start_tasks(
        self, job_id: str, tasks: Sequence[tuple[int | str, ...]], **where: Any
    ) -> list[int]:
        """Record that ``tasks`` ((task key, frame, tile[, slice]), in the order they run) were
        handed to one actor, each with its ``task_started`` event (``where``: actor,
        node, host, device), in one round trip (``lua/start_tasks.lua``); return their
        attempt numbers, counted over the job's whole life (retries and dispatcher
        restarts included), so each attempt's log keeps its own name."""
        flat = [str(v) for pair in where.items() for v in pair]
        attempts: list[int] = await self._start_tasks(
            keys=[keys.tries(job_id), keys.events(job_id)],
            args=[self.events_maxlen, now_iso(), json.dumps(tasks), json.dumps(flat)],
        )
        return [int(a) for a in attempts]

    async def finish_tasks(self, job_id: str, items: Sequence[Finished]) -> int:
        """Record finished tasks and stored frames (``Finished``), in their order, with
        their events and the farm's counters (tasks done, the render-time histogram,
        frames stored), in one round trip (``lua/finish_tasks.lua``). Returns how many
        frames the job has stored, or ``NOT_PROCESSING`` (nothing recorded) when the
        job left PROCESSING meanwhile (cancelled, failed)."""
        at = now_iso()
        body: list[dict[str, Any]] = []
        counters: dict[str, int] = {}
        render_s = 0.0
        for item in items:
            entry: dict[str, Any] = {}
            if item.task is not None:
                done = {"kind": "task_done", "at": at, "task": item.task,
                        "seconds": f"{item.seconds:.3f}", **item.done}  # fmt: skip
                entry["task"] = item.task
                entry["done"] = [str(v) for pair in done.items() for v in pair]
                bucket = next((f"{b:g}" for b in RENDER_S_BUCKETS if item.seconds <= b), "+Inf")
                for name in ("tasks_done_total", f"render_s_bucket:{bucket}"):
                    counters[name] = counters.get(name, 0) + 1
                render_s += item.seconds
            if item.object_key is not None:
                event = {"kind": "frame", "at": at, "frame": item.frame, **item.frame_event}
                entry["frame"] = str(item.frame)
                entry["object"] = item.object_key
                entry["meta"] = json.dumps(item.meta)
                entry["event"] = [str(v) for pair in event.items() for v in pair]
                counters["frames_stored_total"] = counters.get("frames_stored_total", 0) + 1
            body.append(entry)
        stored = await self._finish_tasks(
            keys=[keys.job(job_id), keys.tasks(job_id), keys.events(job_id), keys.metrics(),
                  keys.frames(job_id), keys.frame_meta(job_id)],
            args=[self.events_maxlen, json.dumps(body), json.dumps(counters),
                  repr(render_s) if render_s else "0"],
        )  # fmt: skip
        return int(stored)

    async def frame_meta(self, job_id: str) -> dict[int, dict[str, Any]]:
        """Each stored frame's ``{"sha256", "size"}``."""
        data = await self._redis.hgetall(keys.frame_meta(job_id))
        return {int(k): json.loads(v) for k, v in data.items()}

    async def add_attempt(self, job_id: str, task: str) -> int:
        return int(await self._redis.hincrby(keys.attempts(job_id), task, 1))

    async def forget_tasks(self, job_id: str, task_keys: list[str]) -> None:
        """Mark tasks as not done (their output was lost and must be rendered again)."""
        if task_keys:
            await self._redis.hdel(keys.tasks(job_id), *task_keys)

    async def reset_incomplete(self, job_id: str) -> None:
        """Before a retry: forget tile tasks of frames that were not stored."""
        done_frames = set(await self._redis.hkeys(keys.frames(job_id)))
        task_keys = await self._redis.hkeys(keys.tasks(job_id))
        stale = [k for k in task_keys if str(int(k[1:8])) not in done_frames]
        async with self._redis.pipeline(transaction=True) as pipe:
            if stale:
                pipe.hdel(keys.tasks(job_id), *stale)
            pipe.delete(keys.attempts(job_id))
            await pipe.execute()

    async def preview_share(self, job_id: str, frame: int) -> str | None:
        """The share of its samples (``"0.2500"``) a sliced frame's preview in progress
        holds, None when it has none."""
        share: str | None = await self._redis.hget(keys.previews(job_id), str(frame))
        return share

    async def set_preview_share(self, job_id: str, frame: int, share: float) -> None:
        """Record the share of its samples the frame's newest preview holds."""
        await self._redis.hset(keys.previews(job_id), str(frame), f"{share:.4f}")

    async def forget_preview(self, job_id: str, frame: int) -> None:
        """The frame is stored whole: its preview in progress is past."""
        await self._redis.hdel(keys.previews(job_id), str(frame))

    async def count(self, **amounts: int) -> None:
        """Add to farm-wide counters (``tasks_failed_total=1``; see ``metrics``)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for name, amount in amounts.items():
                pipe.hincrby(keys.metrics(), name, amount)
            await pipe.execute()

    async def metrics(self) -> dict[str, Any]:
        """Farm-wide counters, jobs by state and stored, the queue's depth and Redis's
        memory, in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.metrics())
            pipe.zcard(keys.queue())
            pipe.zcard(keys.all_jobs())
            pipe.info("memory")
            for state in JobState:
                pipe.zcard(keys.jobs_in(str(state)))
            counters, queued, stored, memory, *by_state = await pipe.execute()
        return {
            "counters": {k: float(v) for k, v in counters.items()},
            "queue_depth": int(queued),
            "jobs": dict(zip(JobState, map(int, by_state), strict=True)),
            "jobs_stored": int(stored),
            "redis_used_memory": int(memory.get("used_memory", 0)),
        }
