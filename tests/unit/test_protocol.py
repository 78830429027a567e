"""The SDK's sans-I/O core (rayfarm.protocol) without a farm: the requests it builds,
the typed errors it reads from answers, the SSE parser fed in chunks cut anywhere,
and the long-poll's steps driven by hand with a clock the test moves."""

from __future__ import annotations

import json
from typing import Any

import pytest

import rayfarm
from rayfarm import errors, protocol
from rayfarm.events import Progress, StateChanged
from rayfarm.job import AsyncJob, Job
from rayfarm.models import JobRecord, JobState, JobStatus
from rayfarm.protocol import Call, EventStream, Plan, Reply, Sleep

JOB_ID = "0123456789abcdef"
RECORD = {
    "id": JOB_ID,
    "state": "PENDING",
    "owner": "ana",
    "spec": {"frames": "1-4"},
    "scene_file": "shot.blend",
    "frames_total": 4,
    "tasks_total": 4,
    "created_at": "2026-01-01T00:00:00Z",
}


def _reply(body: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(body).encode())


# -- requests ---------------------------------------------------------------------------------


def test_the_endpoint_takes_arguments_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.setenv("RAYFARM_URL", "http://farm.example:9000/")
    monkeypatch.setenv("RAYFARM_TOKEN", "from-env")
    assert protocol.Endpoint.resolve() == protocol.Endpoint("http://farm.example:9000", "from-env")
    given = protocol.Endpoint.resolve("http://other:1/", "given")
    assert given == protocol.Endpoint("http://other:1", "given")
    assert given.headers == {"Authorization": "Bearer given"}
    # An empty token is a choice (no header), not "look further".
    assert protocol.Endpoint.resolve(token="").headers == {}
    monkeypatch.delenv("RAYFARM_URL")
    assert protocol.Endpoint.resolve().url == protocol.DEFAULT_URL


def test_status_is_long_polled_only_with_an_event_to_wait_after():
    plain = protocol.get_status(JOB_ID)
    assert (plain.method, plain.path, plain.params) == ("GET", f"/jobs/{JOB_ID}/status", {})
    assert protocol.get_status(JOB_ID, after="7-0").params == {}  # no wait: a plain read
    polled = protocol.get_status(JOB_ID, after="7-0", wait_s=19.99951)
    assert polled.params == {"after": "7-0", "wait_s": 20.0}
    status = polled.read(_reply({**RECORD, "frames_done": 0, "tasks_done": 0, "event": "9-0"}))
    assert isinstance(status, JobStatus) and status.event == "9-0"


def test_job_requests_name_the_right_route_and_read_the_model_asked_for():
    cancel = protocol.job_action(JOB_ID, "cancel")
    assert (cancel.method, cancel.path, cancel.json) == ("POST", f"/jobs/{JOB_ID}/cancel", None)
    assert type(cancel.read(_reply(RECORD))) is JobRecord
    urgent = protocol.job_action(JOB_ID, "urgent", Job, {"urgent": True})
    assert urgent.json == {"urgent": True} and type(urgent.read(_reply(RECORD))) is Job
    deps = protocol.set_dependencies(JOB_ID, ("a" * 16,), AsyncJob)
    assert (deps.method, deps.json) == ("PUT", {"depends_on": ["a" * 16]})
    listed = protocol.list_jobs("FAILED", 5, AsyncJob)
    assert listed.params == {"limit": 5, "state": "FAILED"}
    assert [type(j) for j in listed.read(_reply({"jobs": [RECORD, RECORD]}))] == [AsyncJob] * 2
    assert protocol.get_logs(JOB_ID).path == f"/jobs/{JOB_ID}/logs"
    assert (
        protocol.get_logs(JOB_ID, "f0000001t000").path == f"/jobs/{JOB_ID}/tasks/f0000001t000/log"
    )
    assert protocol.get_logs(JOB_ID).read(Reply(200, "naïve\n".encode())) == "naïve\n"
    assert protocol.delete_job(JOB_ID).method == "DELETE"
    assert protocol.field_of("GET", "/shares", "shares").read(_reply({"shares": {"a": 2}})) == {
        "a": 2
    }


def test_a_state_that_is_not_one_fails_before_any_request():
    with pytest.raises(ValueError, match="DONE"):
        protocol.list_jobs("DONE", 10, JobRecord)


def test_the_event_stream_resumes_after_the_last_event_it_gave():
    stream = EventStream(JOB_ID)
    first = stream.call()
    assert first.stream and first.read_timeout_s == protocol.STREAM_READ_TIMEOUT_S
    assert first.headers == {"Accept": "text/event-stream"}
    stream.feed(b'id: 3-0\ndata: {"id": "3-0", "kind": "task_queued", "task": "f1t0", ')
    assert stream.last is None  # half a message is not an event yet
    stream.feed(b'"frame": 1, "tile": 0}\n\n')
    assert stream.last == "3-0"
    assert stream.call().headers["Last-Event-ID"] == "3-0"
    assert EventStream(JOB_ID, after="1-5").call().headers["Last-Event-ID"] == "1-5"


# -- errors -----------------------------------------------------------------------------------


def _error_classes() -> list[type[errors.FarmError]]:
    """Every error class the SDK defines (``rayfarm.errors``). The service's own
    subclasses (``rayfarm.cluster.post.PostError``, say: a ``render_error`` to a client)
    are not the client's to tell apart, and are here only when another test module
    imported them first."""
    out, todo = [], [errors.FarmError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == errors.__name__:
            out.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(out, key=lambda c: c.code)


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.code)
def test_every_error_the_farm_answers_comes_back_as_its_class(cls):
    sent = cls("it went wrong", {"job": JOB_ID, "limit": 3})
    got = protocol.error_of(cls.status, json.dumps(sent.to_body()).encode())
    assert type(got) is cls
    assert (got.message, got.detail) == ("it went wrong", {"job": JOB_ID, "limit": 3})


@pytest.mark.parametrize(
    ("status", "content"),
    [(502, b"<html>Bad Gateway</html>"), (500, b"\xff\xfe not utf-8"), (404, b'{"detail": 1}')],
)
def test_an_answer_that_is_not_the_farms_error_is_a_server_error_with_its_status(status, content):
    got = protocol.error_of(status, content)
    assert type(got) is errors.ServerError
    assert got.detail == {"status": status} and f"HTTP {status}" in got.message


def test_a_lost_connection_and_a_broken_answer_are_the_errors_worth_retrying():
    endpoint = protocol.Endpoint("http://farm:8000", None)
    lost = endpoint.unreachable(OSError("connection refused"))
    assert isinstance(lost, errors.FarmUnavailable) and lost.detail == {"url": "http://farm:8000"}
    broken = protocol.broken("GET", "/jobs", TimeoutError("read timed out"))
    assert isinstance(broken, errors.ServerError) and "GET /jobs failed" in broken.message
    transient = protocol.Outage.TRANSIENT
    assert isinstance(lost, transient) and isinstance(broken, transient)
    assert not isinstance(errors.JobNotFound("gone"), transient)


# -- server-sent events -----------------------------------------------------------------------

STREAM = (
    b": keep-alive\r\n\r\n"
    b'id: 1-0\r\nevent: state\r\ndata: {"id": "1-0", "kind": "state", "from": "", "to": "PENDING"}'
    b"\r\n\r\n"
    b'id: 2-0\ndata: {"id": "2-0", "kind": "progress", "task": "f0000001t000", "frame": 1,\n'
    b'data: "tile": 0, "samples": 8, "of": 16, "note": "gr\xc3\xbc\xc3\x9fe \xe2\x9c\x93"}\n\n'
    b": keep-alive\r\r"
    b'id: 3-0\rdata: {"id": "3-0", "kind": "custom_kind", "x": 1}\r\r'
    b"event: end\ndata: {}\n\n"
    b'id: 4-0\ndata: {"id": "4-0", "kind": "state", "to": "FAILED"}\n\n'
)


def _feed(chunks: list[bytes]) -> tuple[list[Any], EventStream]:
    stream = EventStream(JOB_ID)
    out: list[Any] = []
    for chunk in chunks:
        out.extend(stream.feed(chunk))
    return out, stream


def test_sse_gives_typed_events_keep_alives_and_ends_at_the_farms_end():
    got, stream = _feed([STREAM])
    assert [None if e is None else e.id for e in got] == [None, "1-0", "2-0", None, "3-0"]
    state, progress = got[1], got[2]
    assert isinstance(state, StateChanged) and state.from_ is None and state.to is JobState.PENDING
    assert isinstance(progress, Progress) and progress.fraction == 0.5
    assert progress.model_extra == {"note": "grüße ✓"}  # a multi-line data field, UTF-8
    assert got[4].kind == "custom_kind"  # a kind this SDK does not know is still an Event
    assert stream.ended and stream.last == "3-0"  # nothing after "end" is read
    assert stream.feed(b'id: 5-0\ndata: {"id": "5-0", "kind": "x"}\n\n') == []


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_sse_chunks_cut_anywhere_give_the_same_events(size):
    whole, _ = _feed([STREAM])
    cut, stream = _feed([STREAM[i : i + size] for i in range(0, len(STREAM), size)])
    assert cut == whole and stream.ended


def test_sse_every_single_cut_gives_the_same_events():
    whole, _ = _feed([STREAM])
    for at in range(1, len(STREAM)):  # through CRLFs, multi-byte characters, field names
        assert _feed([STREAM[:at], STREAM[at:]])[0] == whole, at


def test_a_message_cut_off_by_a_dropped_connection_is_not_half_delivered():
    stream = EventStream(JOB_ID)
    stream.feed(b'id: 1-0\ndata: {"id": "1-0", "kind": "x"}\n\nid: 2-0\ndata: {"id": "2-')
    stream.call()  # reconnect: the farm sends everything after 1-0 again
    assert stream.last == "1-0"
    again = stream.feed(b'id: 2-0\ndata: {"id": "2-0", "kind": "y"}\n\n')
    assert [e.id for e in again if e is not None] == ["2-0"]


def test_an_event_stream_gives_up_after_an_outage_longer_than_its_limit():
    now = [0.0]
    stream = EventStream(JOB_ID, give_up_s=10, clock=lambda: now[0])
    down = errors.FarmUnavailable("down")
    stream.failed(down)
    now[0] = 10.0
    stream.failed(down)  # 10 s: still riding it out
    stream.feed(b'id: 1-0\ndata: {"id": "1-0", "kind": "x"}\n\n')  # an event ends the outage
    now[0] = 30.0
    stream.failed(down)
    now[0] = 40.5
    with pytest.raises(errors.FarmUnavailable):
        stream.failed(down)


# -- waiting ----------------------------------------------------------------------------------


class Script:
    """Drives ``protocol.waiting`` as a shell would, answering each call from a list
    (a JobStatus, or an error to throw in) and moving the clock for each step."""

    def __init__(self, answers: list[Any], call_s: float = 0.0) -> None:
        self.answers, self.call_s, self.now = list(answers), call_s, 0.0
        self.steps: list[Any] = []
        self.changes: list[JobStatus] = []

    def clock(self) -> float:
        return self.now

    def run(self, job: JobRecord, timeout: float | None = None) -> JobStatus:
        plan = Plan(protocol.waiting(job, timeout, self.changes.append, self.clock))
        for step in plan:
            self.steps.append(step)
            if isinstance(step, Sleep):
                self.now += step.seconds
                continue
            self.now += self.call_s
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                plan.error = answer
            else:
                plan.reply = answer
        return plan.result

    def calls(self) -> list[dict[str, Any] | None]:
        return [s.params for s in self.steps if isinstance(s, Call)]


def _status(state: str, event: str | None, done: int = 0) -> JobStatus:
    return JobStatus(id=JOB_ID, state=state, frames_done=done, frames_total=4, tasks_done=done,
                     tasks_total=4, event=event)  # fmt: skip


def _job() -> JobRecord:
    return JobRecord.model_validate(RECORD)


def test_waiting_long_polls_after_each_status_until_a_terminal_state():
    script = Script([_status("PENDING", "1-0"), _status("PROCESSING", "2-0", 2),
                     _status("COMPLETED", "5-0", 4)])  # fmt: skip
    job = _job()
    final = script.run(job)
    assert final.state is JobState.COMPLETED
    assert script.calls() == [{}, {"after": "1-0", "wait_s": protocol.LONG_POLL_S},
                              {"after": "2-0", "wait_s": protocol.LONG_POLL_S}]  # fmt: skip
    assert [s.state for s in script.changes] == ["PENDING", "PROCESSING", "COMPLETED"]
    assert (job.state, job.frames_done, job.tasks_done) == (JobState.COMPLETED, 4, 4)


def test_waiting_on_a_service_without_events_polls_with_a_pause():
    script = Script([_status("PROCESSING", None), _status("FAILED", None)])
    assert script.run(_job()).state is JobState.FAILED
    assert script.steps[1] == Sleep(protocol.POLL_S) and script.calls() == [{}, {}]


def test_waiting_rides_out_an_outage_and_asks_again_where_it_was():
    down, broken = errors.FarmUnavailable("down"), errors.ServerError("502")
    script = Script([_status("PROCESSING", "1-0"), down, broken, _status("COMPLETED", "2-0")])
    assert script.run(_job()).state is JobState.COMPLETED
    assert [type(s).__name__ for s in script.steps] == ["Call", "Call", "Sleep", "Call", "Sleep",
                                                        "Call"]  # fmt: skip
    assert script.steps[2] == Sleep(protocol.RECONNECT_S)
    assert script.calls()[1:] == [{"after": "1-0", "wait_s": protocol.LONG_POLL_S}] * 3


def test_waiting_gives_up_on_an_outage_longer_than_the_limit():
    down = errors.FarmUnavailable("down")
    outages = int(protocol.RECONNECT_FOR_S / protocol.RECONNECT_S) + 2
    script = Script([_status("PROCESSING", "1-0")] + [down] * outages)
    with pytest.raises(errors.FarmUnavailable):
        script.run(_job())
    assert script.answers == []  # it asked again once per protocol.RECONNECT_S, no more


def test_an_error_that_is_an_answer_ends_the_wait_at_once():
    script = Script([_status("PROCESSING", "1-0"), errors.JobNotFound("deleted"),
                     _status("COMPLETED", "2-0")])  # fmt: skip
    with pytest.raises(errors.JobNotFound, match="deleted"):
        script.run(_job())
    assert len(script.answers) == 1


def test_waiting_with_a_timeout_polls_no_longer_than_what_is_left_then_times_out():
    script = Script([_status("PROCESSING", "1-0"), _status("PROCESSING", "2-0", 1)], call_s=18)
    with pytest.raises(TimeoutError, match=f"job {JOB_ID} is still PROCESSING after 30 s"):
        script.run(_job(), timeout=30)
    assert script.calls() == [{}, {"after": "1-0", "wait_s": 12.0}]


def test_an_outage_near_the_deadline_raises_the_farms_error_not_a_timeout():
    down = errors.FarmUnavailable("down")
    script = Script([_status("PROCESSING", "1-0"), down], call_s=29.5)
    with pytest.raises(errors.FarmUnavailable):
        script.run(_job(), timeout=30)


def test_the_client_bound_job_stays_importable_where_it_was():
    from rayfarm.models import Job as FromModels

    assert FromModels is Job is rayfarm.Job and issubclass(Job, JobRecord)
    assert rayfarm.AsyncJob is AsyncJob and rayfarm.aio.AsyncJob is AsyncJob
