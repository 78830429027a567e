import itertools
import pickle
import types

import pytest
from pydantic import ValidationError

import rayfarm
from rayfarm import TRANSITIONS, InvalidSpec, InvalidTransition, JobSpec, JobState
from rayfarm.errors import FarmError, JobNotFound, SceneTooNew, error_from_body
from rayfarm.models import Job, check_transition, parse_spec, sources_of


def test_states_are_exactly_the_five():
    assert [s.value for s in JobState] == [
        "PENDING", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED",
    ]  # fmt: skip


ALLOWED = {
    ("PENDING", "PROCESSING"),
    ("PENDING", "FAILED"),  # a dependency failed: it fails without running
    ("PENDING", "CANCELLED"),
    ("PROCESSING", "COMPLETED"),
    ("PROCESSING", "FAILED"),
    ("PROCESSING", "CANCELLED"),
    ("FAILED", "PENDING"),
}


@pytest.mark.parametrize(("a", "b"), list(itertools.product(JobState, JobState)))
def test_transition_table(a, b):
    if (a.value, b.value) in ALLOWED:
        check_transition("j", a, b)
        assert b in TRANSITIONS[a] and a in sources_of(b)
    else:
        with pytest.raises(InvalidTransition) as err:
            check_transition("j", a, b)
        assert err.value.status == 409
        assert err.value.detail == {"job_id": "j", "state": a.value, "target": b.value}


def test_terminal_states():
    assert {s for s in JobState if s.is_terminal} == {
        JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED,
    }  # fmt: skip


def test_spec_defaults_and_normalisation():
    spec = JobSpec(frames="1-8")
    assert (spec.tiles, spec.format, spec.depth, spec.priority, spec.max_retries) == (
        1, "png", 8, 50, 2,
    )  # fmt: skip
    assert JobSpec(frames="1", tiles="1x1").tiles == 1
    assert JobSpec(frames="1", tiles="3X2").tile_grid == (3, 2)
    auto = JobSpec(frames="1", tiles=" AUTO ")
    assert (auto.tiles, auto.tile_grid) == ("auto", None)
    assert JobSpec(frames=5).frames == "5"
    assert JobSpec(frames="1", format="exr").depth == 32
    assert JobSpec(frames="1", format="png", color_depth=16).depth == 16


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"frames": "1", "frame": "2"}, "frame: unknown field"),
        ({"frames": "9-1"}, "backwards"),
        ({}, "frames: Field required"),
        ({"frames": "1", "tiles": "0x2"}, "tiles per axis"),
        ({"frames": "1", "tiles": "17x1"}, "tiles per axis"),
        ({"frames": "1", "tiles": 4}, "tiles must be 1, 'NxM' such as '2x2', or 'auto'"),
        ({"frames": "1", "tiles": "automatic"}, "tiles 'automatic': tiles must be 1"),
        ({"frames": "1", "denoise": "maybe"}, "denoise: Input should be a valid boolean"),
        ({"frames": "1", "samples": 0}, "samples"),
        ({"frames": "1", "resolution_percentage": 401}, "resolution_percentage"),
        ({"frames": "1", "format": "jpeg"}, "format"),
        ({"frames": "1", "format": "png", "color_depth": 32}, "not valid for png"),
        ({"frames": "1", "priority": 101}, "priority"),
        ({"frames": "1", "max_retries": -1}, "max_retries"),
        ({"frames": "1", "camera": ""}, "camera"),
    ],
)
def test_spec_refusals_name_the_field(data, fragment):
    with pytest.raises(InvalidSpec) as err:
        parse_spec(data)
    assert fragment in str(err.value)


def test_parse_spec_from_json():
    assert parse_spec('{"frames": "1-3", "tiles": "2x2"}').tile_grid == (2, 2)
    with pytest.raises(InvalidSpec):
        parse_spec("{not json")


def test_public_api_is_complete_and_sorted():
    exported = set(rayfarm.__all__)
    public = {
        n
        for n, v in vars(rayfarm).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)
    } | {"__version__"}
    assert exported == public
    assert rayfarm.__all__ == sorted(rayfarm.__all__, key=lambda n: (not n.isupper(), n))


@pytest.mark.parametrize(
    "exc",
    [
        JobNotFound("no job x", {"job_id": "x"}),
        SceneTooNew("too new", {"file_version": "5.1", "farm_version": "5.0"}),
        InvalidTransition("nope", {"job_id": "x"}),
    ],
)
def test_errors_pickle_and_round_trip_through_bodies(exc: FarmError):
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is type(exc) and again.detail == exc.detail and str(again) == str(exc)
    back = error_from_body(exc.status, exc.to_body())
    assert type(back) is type(exc) and back.detail == exc.detail


def test_unknown_error_body_becomes_server_error():
    assert type(error_from_body(502, "<html>bad gateway</html>")).__name__ == "ServerError"


def test_a_newer_farms_fields_are_dropped_from_what_it_sends_but_refused_from_users():
    """An SDK older than its farm reads jobs whose specs carry fields it does not know
    (dropped, context FROM_FARM, as the SDK reads every job); a spec a user writes with
    an unknown field is still refused."""
    from rayfarm.models import FROM_FARM

    sent = {
        "id": "0123456789abcdef", "state": "PENDING", "owner": "ana", "scene_file": "s.blend",
        "frames_total": 2, "tasks_total": 2, "created_at": "2026-11-23T09:00:00+00:00",
        "spec": {"frames": "1-2", "a_newer_setting": 3,
                 "post": {"video": {"fps": 25, "a_newer_knob": "x"}}},
    }  # fmt: skip
    job = Job.model_validate(sent, context=FROM_FARM)
    assert job.spec.frame_list == [1, 2] and job.spec.post.video.fps == 25
    with pytest.raises(ValidationError, match="a_newer_setting"):
        Job.model_validate(sent)
    with pytest.raises(InvalidSpec, match="a_newer_setting: unknown field"):
        parse_spec({"frames": "1", "a_newer_setting": 3})
