"""The farm's HTTP protocol without I/O: everything ``Farm`` and ``AsyncFarm`` share.

A request is a ``Call``: plain data (method, path, params, headers, JSON body) and how
to read the answer (``Call.read``, given a ``Reply``); an answer of 400 or more is the
farm's typed error (``error_of``). ``EventStream`` parses a job's Server-Sent Events
from the bytes as they arrive and knows where to resume a dropped stream; ``waiting``
is the long-poll as a generator of steps (a ``Call`` to send, a ``Sleep`` to take).
The sync shell (``rayfarm.client``) and the asyncio one (``rayfarm.aio``) only send,
receive and sleep: neither httpx nor asyncio is imported here, so all of this is
tested without a farm.

>>> call = get_status("0123456789abcdef", after="5-0", wait_s=20)
>>> call.method, call.path, call.params
('GET', '/jobs/0123456789abcdef/status', {'after': '5-0', 'wait_s': 20})
"""

from __future__ import annotations

import codecs
import json
import os
import re
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from rayfarm.errors import FarmError, FarmUnavailable, ServerError, error_from_body
from rayfarm.events import END, Event, SSEParser, parse_event
from rayfarm.models import FROM_FARM, FrameInfo, JobRecord, JobState, JobStatus
from rayfarm.paths import local_token

__all__ = [
    "DEFAULT_URL", "LONG_POLL_S", "POLL_S", "RECONNECT_FOR_S", "RECONNECT_S",
    "STREAM_READ_TIMEOUT_S", "Call", "Endpoint", "EventStream", "Outage", "Plan", "Reply",
    "Sleep", "Step", "apply_status", "broken", "delete_job", "error_of", "field_of",
    "get_frames", "get_job", "get_logs", "get_status", "job_action", "list_jobs", "no_answer",
    "set_dependencies", "submit_job", "waiting",
]  # fmt: skip

DEFAULT_URL = "http://127.0.0.1:8000"
#: How long one status long-poll may wait on the server before asking again.
LONG_POLL_S = 20.0
#: How often to ask a service that names no events (so cannot long-poll).
POLL_S = 0.2
#: Pause before reconnecting a dropped event stream, and how long to keep trying.
RECONNECT_S = 1.0
RECONNECT_FOR_S = 120.0
#: The event stream sends a keep-alive every 15 s; silence this long means it is dead.
STREAM_READ_TIMEOUT_S = 60.0

T = TypeVar("T")
R = TypeVar("R", bound=JobRecord)
Clock = Callable[[], float]


@dataclass(frozen=True)
class Endpoint:
    """Where the farm is and who asks: ``url`` defaults to ``$RAYFARM_URL``, then
    ``DEFAULT_URL``; ``token`` to ``$RAYFARM_TOKEN``, then the first admin's token that
    ``rayfarm up`` wrote for a farm on this machine (``rayfarm.paths.local_token``)."""

    url: str
    token: str | None

    @classmethod
    def resolve(cls, url: str | None = None, token: str | None = None) -> Endpoint:
        url = (url or os.environ.get("RAYFARM_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("RAYFARM_TOKEN")
        return cls(url, token if token is not None else local_token(url))

    @property
    def headers(self) -> dict[str, str]:
        """The headers every request carries."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def unreachable(self, exc: Exception) -> FarmUnavailable:
        """The error for a request that never got an answer."""
        return FarmUnavailable(f"cannot reach the farm at {self.url}: {exc}", {"url": self.url})


@dataclass(frozen=True)
class Reply:
    """A whole answer: its HTTP ``status`` and body bytes."""

    status: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


def _json(reply: Reply) -> Any:
    return reply.json()


def _ignore(reply: Reply) -> None:
    return None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request as data; ``read`` turns its (successful) ``Reply`` into the result.
    ``stream``: the body is read as it comes (only ``EventStream`` and downloads), with
    ``read_timeout_s`` instead of the client's timeout between two reads."""

    method: str
    path: str
    read: Callable[[Reply], T] = _json
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    read_timeout_s: float | None = None


def error_of(status: int, content: bytes) -> FarmError:
    """The typed error (``rayfarm.errors``) for an answer of ``status`` >= 400; a body that
    is not the farm's JSON error (a proxy's page) gives ``ServerError`` with the status."""
    try:
        body: Any = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = content.decode("utf-8", errors="replace")
    return error_from_body(status, body)


def broken(method: str, path: str, exc: Exception) -> ServerError:
    """The error for an answer that broke off on the way (a dropped or timed-out read)."""
    return ServerError(f"{method} {path} failed: {exc}")


# -- requests -------------------------------------------------------------------------------


def _field(name: str) -> Callable[[Reply], Any]:
    return lambda reply: reply.json()[name]


def _record(model: type[R]) -> Callable[[Reply], R]:
    return lambda reply: model.model_validate(reply.json(), context=FROM_FARM)


@overload
def get_job(job_id: str) -> Call[JobRecord]: ...
@overload
def get_job(job_id: str, model: type[R]) -> Call[R]: ...
def get_job(job_id: str, model: type[Any] = JobRecord) -> Call[Any]:
    """The job, as ``model`` (``JobNotFound`` if there is none)."""
    return Call("GET", f"/jobs/{job_id}", _record(model))


def list_jobs(state: JobState | str | None, limit: int, model: type[R]) -> Call[list[R]]:
    """Recent jobs, newest first, optionally only those in ``state``."""
    params: dict[str, Any] = {"limit": limit}
    if state is not None:
        params["state"] = str(JobState(state))  # a typo fails here, not at the farm

    def read(reply: Reply) -> list[R]:
        return [model.model_validate(j, context=FROM_FARM) for j in reply.json()["jobs"]]

    return Call("GET", "/jobs", read, params)


def get_status(job_id: str, after: str | None = None, wait_s: float = 0) -> Call[JobStatus]:
    """The compact status; long-polled (answered at the next change, or after ``wait_s``)
    when ``after`` names the newest event already seen."""
    params: dict[str, Any] = {}
    if after is not None and wait_s > 0:
        params = {"after": after, "wait_s": round(wait_s, 3)}
    read = lambda r: JobStatus.model_validate(r.json())  # noqa: E731
    return Call("GET", f"/jobs/{job_id}/status", read, params)


@overload
def job_action(job_id: str, action: str) -> Call[JobRecord]: ...
@overload
def job_action(job_id: str, action: str, model: type[R], body: Any = None) -> Call[R]: ...
def job_action(
    job_id: str, action: str, model: type[Any] = JobRecord, body: Any = None
) -> Call[Any]:
    """``POST /jobs/{id}/{action}`` (cancel, retry, urgent) answered with the job."""
    return Call("POST", f"/jobs/{job_id}/{action}", _record(model), json=body)


def delete_job(job_id: str) -> Call[dict[str, Any]]:
    """Delete a finished job; answered with what it freed."""
    return Call("DELETE", f"/jobs/{job_id}")


def submit_job(body: dict[str, Any], model: type[R]) -> Call[R]:
    """Queue a job whose files the farm has (``body``: spec, main, files)."""
    return Call("POST", "/jobs", _record(model), json=body)


def set_dependencies(job_id: str, depends_on: list[str], model: type[R]) -> Call[R]:
    """Change what a queued job waits for; answered with the job."""
    body = {"depends_on": list(depends_on)}
    return Call("PUT", f"/jobs/{job_id}/depends_on", _record(model), json=body)


def get_frames(job_id: str) -> Call[list[FrameInfo]]:
    """The frames stored so far."""
    read = lambda r: [FrameInfo.model_validate(f) for f in r.json()["frames"]]  # noqa: E731
    return Call("GET", f"/jobs/{job_id}/frames", read)


def get_logs(job_id: str, task: str | None = None) -> Call[str]:
    """The job's log as text, or with ``task`` Blender's output for that task."""
    path = f"/jobs/{job_id}/logs" if task is None else f"/jobs/{job_id}/tasks/{task}/log"
    return Call("GET", path, lambda r: r.text)


def field_of(method: str, path: str, name: str, **kwargs: Any) -> Call[Any]:
    """A call whose result is field ``name`` of the JSON answer."""
    return Call(method, path, _field(name), **kwargs)


def no_answer(method: str, path: str, **kwargs: Any) -> Call[None]:
    """A call whose answer says nothing more than that it succeeded."""
    return Call(method, path, _ignore, **kwargs)


def apply_status(job: JobRecord, status: JobStatus) -> JobStatus:
    """Bring ``job``'s own fields up to date with a status just fetched."""
    job.state, job.error = status.state, status.error
    job.frames_done, job.tasks_done = status.frames_done, status.tasks_done
    return status


# -- riding out outages, waiting -------------------------------------------------------------


class Outage:
    """Rides out a farm that cannot answer for a while (restarting, a proxy whose replica
    is being replaced, a dropped connection): a waiter or an event stream asks again
    every ``RECONNECT_S`` and raises the last error once the farm has failed it for
    ``give_up_s`` in a row."""

    #: What is worth asking again about; a 4xx is an answer.
    TRANSIENT = (FarmUnavailable, ServerError)

    def __init__(self, give_up_s: float = RECONNECT_FOR_S, clock: Clock = time.monotonic) -> None:
        self.give_up_s = give_up_s
        self.since: float | None = None
        self._clock = clock

    def failed(self, exc: Exception) -> None:
        """Note a failure; raise ``exc`` once the outage is too long."""
        now = self._clock()
        if self.since is None:
            self.since = now
        if now - self.since > self.give_up_s:
            raise exc

    def ended(self) -> None:
        self.since = None


@dataclass(frozen=True)
class Sleep:
    """A step of a ``Plan``: pause this long, then carry on."""

    seconds: float


Step = Call[Any] | Sleep


def waiting(
    job: JobRecord,
    timeout: float | None = None,
    on_change: Callable[[JobStatus], Any] | None = None,
    clock: Clock = time.monotonic,
) -> Generator[Step, Any, JobStatus]:
    """``Job.wait`` as steps: long-poll the status, one request per change (or per
    ``LONG_POLL_S`` when idle), riding out a farm that stops answering for a while
    (``Outage``); the shell sends each ``Call`` back its result, or throws in its
    error. Returns the terminal status; ``TimeoutError`` after ``timeout`` s."""
    deadline = None if timeout is None else clock() + timeout
    status: JobStatus | None = None
    outage = Outage(clock=clock)
    while True:
        wait_s = LONG_POLL_S
        if deadline is not None and status is not None:
            wait_s = min(wait_s, deadline - clock())
            if wait_s <= 0:
                raise TimeoutError(f"job {job.id} is still {status.state} after {timeout} s")
        try:
            if status is not None and status.event is None:
                yield Sleep(min(wait_s, POLL_S))  # a service without events: plain polling
            after = None if status is None else status.event
            status = apply_status(job, (yield get_status(job.id, after, wait_s)))
        except Outage.TRANSIENT as exc:
            if deadline is not None and clock() + RECONNECT_S > deadline:
                raise  # the farm's error says more than a timeout would
            outage.failed(exc)
            yield Sleep(RECONNECT_S)
            continue
        outage.ended()
        if on_change is not None:
            on_change(status)
        if status.state.is_terminal:
            return status


class Plan(Generic[T]):
    """Drives a generator of steps such as ``waiting``: iterate it for the steps, and set
    ``reply`` (or ``error``) to each ``Call``'s outcome before asking for the next; once
    the iteration ends, ``result`` holds what the generator returned."""

    def __init__(self, steps: Generator[Step, Any, T]) -> None:
        self._steps = steps
        self.reply: Any = None
        self.error: FarmError | None = None
        self.result: T

    def __iter__(self) -> Iterator[Step]:
        while True:
            error, self.error, reply, self.reply = self.error, None, self.reply, None
            try:
                yield self._steps.throw(error) if error else self._steps.send(reply)
            except StopIteration as stop:
                self.result = stop.value
                return


# -- event streams ---------------------------------------------------------------------------

#: A line ends with CRLF, LF or CR (the text/event-stream format).
_EOL = re.compile(r"\r\n|\r|\n")


class EventStream:
    """One job's event stream across reconnections: ``call`` opens (or reopens) it
    after the last event seen, ``feed`` turns the body's bytes, in chunks cut anywhere,
    into typed events (None for each keep-alive, so a reader can check its clock) until
    the farm's ``end`` message sets ``ended``; ``failed`` notes a dropped connection
    and raises once the farm has failed it for ``give_up_s`` in a row."""

    def __init__(
        self,
        job_id: str,
        after: str | None = None,
        give_up_s: float = RECONNECT_FOR_S,
        clock: Clock = time.monotonic,
    ) -> None:
        self.job_id, self.last = job_id, after
        self.ended = False
        self._outage = Outage(give_up_s, clock)
        self._start()

    def _start(self) -> None:
        self._parser = SSEParser()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._rest = ""

    def call(self) -> Call[None]:
        """The request for the events after ``last``; a message cut off by the dropped
        connection is dropped with it (the farm sends it again)."""
        self._start()
        headers = {"Accept": "text/event-stream"}
        if self.last is not None:
            headers["Last-Event-ID"] = self.last
        path = f"/jobs/{self.job_id}/events"
        return Call("GET", path, _ignore, headers=headers, stream=True,
                    read_timeout_s=STREAM_READ_TIMEOUT_S)  # fmt: skip

    def feed(self, chunk: bytes) -> list[Event | None]:
        """What this chunk of the body completes: events, and None per keep-alive;
        nothing once ``ended``."""
        if self.ended:
            return []
        text = self._rest + self._decoder.decode(chunk)
        end = len(text) - 1 if text.endswith("\r") else len(text)  # half a CRLF?
        lines = _EOL.split(text[:end])
        self._rest = lines.pop() + text[end:]
        out: list[Event | None] = []
        for line in lines:
            for message in self._parser.feed(line):
                if message is None:
                    out.append(None)
                elif message.event == END:
                    self.ended = True
                    return out
                else:
                    event = parse_event(message.payload())
                    self.last = event.id
                    self._outage.ended()
                    out.append(event)
        return out

    def failed(self, exc: Exception) -> None:
        self._outage.failed(exc)
