"""A job's execution log as typed events, and the Server-Sent Events reader that
brings them.

Every event has the ``id`` the farm gave it (pass it as ``after`` to resume),
its ``kind`` and the time ``at``. ``parse_event`` returns the class for the kind
(``TaskDone``, ``Progress``, ...) or a plain ``Event`` for kinds this SDK does
not know yet, so a newer farm never breaks an older client.

>>> for event in job.events():                          # doctest: +SKIP
...     if isinstance(event, rayfarm.Progress):
...         print(event.frame, event.tile, f"{event.fraction:.0%}")
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rayfarm.models import JobState

__all__ = [
    "END",
    "Event",
    "FramePreview",
    "FrameStored",
    "Progress",
    "SSEMessage",
    "SSEParser",
    "SceneWarning",
    "StateChanged",
    "TaskDone",
    "TaskEvent",
    "TaskFailed",
    "TaskQueued",
    "TaskRetried",
    "TaskStarted",
    "format_event",
    "parse_event",
    "read_sse",
]

#: The SSE event the farm sends last, when the job's stream is complete.
END = "end"


class Event(BaseModel):
    """One entry of a job's execution log. Fields the class does not name are kept
    (``model_extra``)."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    id: str
    kind: str
    at: datetime | None = None


class StateChanged(Event):
    """The job changed state (``from_`` is None for its creation)."""

    kind: Literal["state"] = "state"
    from_: JobState | None = Field(None, alias="from")
    to: JobState
    error: str | None = None

    @classmethod
    def _clean(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "from": data.get("from") or None}


class TaskEvent(Event):
    """Something happened to one (frame, tile) task; ``task`` is its id
    (``f0000012t003``: frame 12, tile 3; ``f0000012t003s01``: its sample slice 1, for a
    job with ``slices``)."""

    task: str
    frame: int
    tile: int
    slice: int | None = None


class _Placed(TaskEvent):
    actor: int | None = None
    node: str | None = None
    host: str | None = None
    device: str | None = None
    attempt: int = 1


class TaskQueued(TaskEvent):
    kind: Literal["task_queued"] = "task_queued"


class TaskStarted(_Placed):
    """A render actor took the task (on ``node``/``host``, rendering on ``device``)."""

    kind: Literal["task_started"] = "task_started"


class TaskDone(_Placed):
    """The task rendered in ``seconds``, in the Blender worker process ``worker`` (its
    pid) of render actor process ``pid``."""

    kind: Literal["task_done"] = "task_done"
    seconds: float
    pid: int | None = None
    worker: int | None = None
    fraction: float | None = Field(
        None, description="A slice's: the share of its frame's samples landed now."
    )


class TaskFailed(_Placed):
    """An attempt failed with ``error``; ``retry`` says whether it runs again."""

    kind: Literal["task_failed"] = "task_failed"
    error: str
    retry: bool = False


class TaskRetried(TaskEvent):
    """The task is queued again, for attempt ``attempt``."""

    kind: Literal["task_retried"] = "task_retried"
    attempt: int


class Progress(TaskEvent):
    """Cycles' sampling inside a running task: ``samples`` of ``of`` done."""

    kind: Literal["progress"] = "progress"
    samples: int
    of: int

    @property
    def fraction(self) -> float:
        return self.samples / self.of if self.of else 0.0


class FramePreview(Event):
    """A frame split into sample slices has a new preview: the merge of the slices
    landed so far, holding ``fraction`` of the frame's samples in every pixel
    (``Job.show(frame)`` shows it until the frame is stored)."""

    kind: Literal["preview"] = "preview"
    frame: int
    fraction: float


class FrameStored(Event):
    """Frame ``frame`` is stored whole (a tiled frame: assembled and finished)."""

    kind: Literal["frame"] = "frame"
    frame: int


class SceneWarning(Event):
    """Something the artist should know about how the farm renders the scene (Python
    drivers off, files missing with ``allow_missing``, ...)."""

    kind: Literal["warning"] = "warning"
    message: str
    task: str | None = None


_KINDS: dict[str, type[Event]] = {
    cls.model_fields["kind"].default: cls
    for cls in (
        StateChanged, TaskQueued, TaskStarted, TaskDone, TaskFailed, TaskRetried, Progress,
        FramePreview, FrameStored, SceneWarning,
    )
}  # fmt: skip


def format_event(event: dict[str, Any] | Event) -> str:
    """One event as a log line: time, kind, then its fields (as ``GET /jobs/{id}/logs``
    and ``rayfarm logs`` print them)."""
    if isinstance(event, Event):
        event = event.model_dump(mode="json", by_alias=True, exclude_none=True)
    at = str(event.get("at", ""))[:23].replace("T", " ")
    kind = event.get("kind", "?")
    if kind == "state":
        text = f"{event.get('from') or '-'} -> {event.get('to')}"
        if event.get("error"):
            text += f": {event['error']}"
    else:
        skip = {"id", "kind", "at"}
        text = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip)
    return f"{at}  {kind:<12} {text}"


def parse_event(data: dict[str, Any]) -> Event:
    """The typed event for one JSON object of the event stream."""
    cls = _KINDS.get(str(data.get("kind")), Event)
    if cls is StateChanged:
        data = StateChanged._clean(data)
    return cls.model_validate(data)


class SSEMessage(BaseModel):
    """One Server-Sent Events message: ``id``, ``event`` name and ``data`` text."""

    id: str | None = None
    event: str = "message"
    data: str = ""

    def payload(self) -> Any:
        """``data`` parsed as JSON."""
        return json.loads(self.data)


class SSEParser:
    """Turns an SSE stream's lines (the text/event-stream format), fed one at a time,
    into messages; a comment line (the farm's keep-alive) gives None, so a reader can
    check its clock."""

    def __init__(self) -> None:
        self._fields: dict[str, str] = {}
        self._data: list[str] = []

    def feed(self, raw: str) -> list[SSEMessage | None]:
        """What this line completes: nothing, one message, or one keep-alive (None)."""
        line = raw.rstrip("\r\n")
        if not line:
            if not (self._data or self._fields):
                return []
            message = SSEMessage(**self._fields, data="\n".join(self._data))
            self._fields, self._data = {}, []
            return [message]
        if line.startswith(":"):
            return [None]
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name in ("id", "event"):
            self._fields[name] = value
        return []


def read_sse(lines: Iterable[str]) -> Iterator[SSEMessage | None]:
    """Messages (and keep-alives, as None) from an SSE stream's lines."""
    parser = SSEParser()
    for line in lines:
        yield from parser.feed(line)
