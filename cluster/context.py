"""What every route needs: the process's context (settings, job store, storage,
event hub, dispatcher hooks), the typed dependencies that hand it out, and the
request-body readers that enforce the farm's size limits."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from rayfarm.cluster.events import EventHub
from rayfarm.cluster.settings import Settings
from rayfarm.cluster.storage import Storage
from rayfarm.cluster.store import JobStore
from rayfarm.errors import FarmUnavailable, InvalidRequest, JobNotFound, PayloadTooLarge

__all__ = [
    "MAX_MANIFEST_BYTES",
    "AppContext",
    "Ctx",
    "JobId",
    "check_job_id",
    "limited",
    "process_context",
    "read_json",
    "set_process_context",
]

log = logging.getLogger("rayfarm.api")

_JOB_ID = re.compile(r"^[0-9a-f]{16}$")
#: Largest JSON body a request (a job's spec and file listing) may have.
MAX_MANIFEST_BYTES = 8 * 1024**2


@dataclass
class AppContext:
    """What the routes need: settings, the job store, storage, the event hub, and hooks
    into the dispatcher (absent where the app runs without Ray)."""

    settings: Settings
    store: JobStore = field(init=False)
    storage: Storage = field(init=False)
    hub: EventHub = field(init=False)
    notify: Any = None  # callable() or None: wakes the dispatcher
    inspect: Any = None  # async callable(Inputs) -> catalogue dict, or None (no Ray here)
    stats: Any = None  # async callable() -> the dispatcher's stats, or None (no Ray here)

    def __post_init__(self) -> None:
        self.store = JobStore.from_url(
            self.settings.redis_url, events_maxlen=self.settings.events_maxlen
        )
        self.storage = Storage(self.settings.storage)
        self.hub = EventHub(self.store)

    def nudge(self) -> None:
        if self.notify is not None:
            try:
                self.notify()
            except Exception:  # the dispatcher also polls Redis; a lost nudge only delays
                log.warning("could not notify the dispatcher", exc_info=True)


_process_ctx: AppContext | None = None


def set_process_context(ctx: AppContext) -> None:
    """Give this process's app its context.

    Ray Serve runs a pickled copy of the FastAPI app, so a Serve deployment cannot
    reach ``app.state`` of the object it was declared with; it sets the context here.
    """
    global _process_ctx
    _process_ctx = ctx


def process_context() -> AppContext | None:
    """This process's context, where ``set_process_context`` gave one."""
    return _process_ctx


# Dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in a worker
# thread, a hop through the thread pool (and a GIL hand-off) on every request.
async def _ctx(request: Request) -> AppContext:
    ctx: AppContext | None = getattr(request.app.state, "ctx", None) or _process_ctx
    if ctx is None:
        raise FarmUnavailable("the service is still starting")
    return ctx


Ctx = Annotated[AppContext, Depends(_ctx)]


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise JobNotFound(f"no job {job_id}", {"job_id": job_id})
    return job_id


async def _job_id(job_id: str) -> str:
    return check_job_id(job_id)


JobId = Annotated[str, Depends(_job_id)]


async def limited(request: Request, limit: int, what: str) -> AsyncIterator[bytes]:
    """The request body's chunks, refused (413) by its Content-Length when that says it
    is too big, else the moment it passes ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(
            f"{what} of {int(length)} bytes is over the farm's limit of {limit} bytes",
            {"limit": limit},
        )
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"{what} is over the farm's limit of {limit} bytes", {"limit": limit}
            )
        yield chunk


async def read_json(request: Request, what: str) -> Any:
    """The body as JSON, at most MAX_MANIFEST_BYTES (400 when it is not JSON)."""
    body = b"".join([c async for c in limited(request, MAX_MANIFEST_BYTES, what)])
    try:
        return json.loads(body)
    except ValueError as exc:
        raise InvalidRequest(f"the body is not JSON: {exc}") from None
