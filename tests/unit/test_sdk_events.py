"""The SDK's side of the event stream, without a farm: the SSE parser, typed events,
the log-line format, and Cycles' status lines."""

from datetime import datetime

import pytest

from rayfarm import (
    Event,
    FrameStored,
    JobState,
    Progress,
    SceneWarning,
    StateChanged,
    TaskDone,
    TaskFailed,
    TaskQueued,
    TaskRetried,
    TaskStarted,
)
from rayfarm.events import SSEParser, format_event, parse_event, read_sse
from rayfarm.render.progress import parse_samples

AT = "2026-11-23T01:02:03.456789+00:00"


def test_sse_parser_follows_the_format():
    lines = [
        "retry: 2000", "",
        ": keep-alive", "",
        "id: 1-0", "event: state", 'data: {"a": 1}', "",
        "id: 2-0\r", "event: note\r", "data: line one\r", "data: line two\r", "\r",
        "data: no id or event", "",
        "", "",  # blank lines alone dispatch nothing
    ]  # fmt: skip
    out = list(read_sse(lines))
    assert out[0] is None  # the comment
    first, second, third = out[1:]
    assert (first.id, first.event, first.payload()) == ("1-0", "state", {"a": 1})
    assert (second.id, second.event, second.data) == ("2-0", "note", "line one\nline two")
    assert (third.id, third.event, third.data) == (None, "message", "no id or event")
    parser = SSEParser()  # fed a line at a time, as the async client does
    assert parser.feed("id: 3-0") == [] and parser.feed("data: x") == []
    (message,) = parser.feed("")
    assert message.id == "3-0" and message.data == "x"


@pytest.mark.parametrize(
    ("data", "cls", "check"),
    [
        ({"kind": "state", "from": "", "to": "PENDING"}, StateChanged,
         lambda e: e.from_ is None and e.to is JobState.PENDING),
        ({"kind": "state", "from": "PROCESSING", "to": "FAILED", "error": "boom"}, StateChanged,
         lambda e: e.from_ is JobState.PROCESSING and e.error == "boom"),
        ({"kind": "task_queued", "task": "f0000001t000", "frame": 1, "tile": 0}, TaskQueued,
         lambda e: e.frame == 1),
        ({"kind": "task_started", "task": "f0000001t002", "frame": 1, "tile": 2, "actor": 1,
          "node": "ab12", "host": "gpu-7", "device": "GPU (OPTIX: NVIDIA L4)", "attempt": 2},
         TaskStarted, lambda e: e.attempt == 2 and e.device.startswith("GPU")),
        ({"kind": "task_done", "task": "f0000001t000", "frame": 1, "tile": 0, "seconds": 2.5},
         TaskDone, lambda e: e.seconds == 2.5 and e.attempt == 1),
        ({"kind": "task_failed", "task": "f0000001t000", "frame": 1, "tile": 0,
          "error": "x", "retry": True}, TaskFailed, lambda e: e.retry is True),
        ({"kind": "task_retried", "task": "f0000001t000", "frame": 1, "tile": 0, "attempt": 2},
         TaskRetried, lambda e: e.attempt == 2),
        ({"kind": "progress", "task": "f0000003t001", "frame": 3, "tile": 1, "samples": 16,
          "of": 64}, Progress, lambda e: e.fraction == 0.25),
        ({"kind": "frame", "frame": 7, "finish_s": 1.25}, FrameStored,
         lambda e: e.frame == 7 and e.model_extra == {"finish_s": 1.25}),
        ({"kind": "warning", "message": "drivers off"}, SceneWarning, lambda e: e.task is None),
        ({"kind": "from_a_newer_farm", "whatever": [1, 2]}, Event,
         lambda e: e.model_extra == {"whatever": [1, 2]}),
    ],
)  # fmt: skip
def test_events_are_typed_by_kind(data, cls, check):
    event = parse_event({"id": "9-1", "at": AT, **data})
    assert type(event) is cls and event.id == "9-1" and isinstance(event.at, datetime)
    assert check(event)


def test_a_malformed_event_is_refused():
    with pytest.raises(ValueError):
        parse_event({"id": "1-0", "kind": "task_done", "frame": "one", "tile": 0, "task": "t"})


def test_log_lines():
    state = {"id": "1-0", "kind": "state", "at": AT, "from": "PROCESSING", "to": "FAILED",
             "error": "frame 2: boom"}  # fmt: skip
    assert format_event(state) == (
        "2026-11-23 01:02:03.456  state        PROCESSING -> FAILED: frame 2: boom"
    )
    done = parse_event(
        {"id": "2-0", "kind": "task_done", "at": AT, "task": "f0000002t000", "frame": 2,
         "tile": 0, "seconds": 1.5}
    )  # fmt: skip
    line = format_event(done)
    assert line.startswith("2026-11-23 01:02:03.456  task_done    task=f0000002t000 frame=2")
    assert "seconds=1.5" in line and "attempt=1" in line


def test_cycles_status_lines():
    assert parse_samples("Remaining: 00:00.02 | Mem: 2M | Sample 12/64") == (12, 64)
    assert parse_samples("Mem: 2M | Sample 0/32") == (0, 32)
    assert parse_samples("Mem: 1M | Updating Scene BVH | Building BVH 0%") is None
    assert parse_samples("Mem: 2M | Finished") is None
