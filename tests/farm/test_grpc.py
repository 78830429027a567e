"""The gRPC ingress on a real local farm: blobs uploaded over HTTP, then a real gRPC
channel through Serve's gRPC proxy with the stubs built from cluster/proto."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from rayfarm.cluster.grpc_ingress import ERROR_CODE_KEY, SERVICE, generated_dir, pb2, pb2_grpc
from rayfarm.cluster.serve import APP_NAME

from helpers import ADMIN_TOKEN, AUTH, ROOT
from helpers.farms import WAIT_S

#: Serve routes a gRPC call to the application its metadata names.
APP = (("application", APP_NAME), ("authorization", f"Bearer {ADMIN_TOKEN}"))
MAIN = "scene.blend"


def test_stubs_are_built_outside_the_repository():
    folder = generated_dir()
    assert not folder.resolve().is_relative_to(ROOT)
    assert {p.name for p in folder.glob("*.py")} == {"rayfarm_pb2.py", "rayfarm_pb2_grpc.py"}
    assert pb2().DESCRIPTOR.services_by_name["RayfarmService"].full_name == SERVICE
    assert hasattr(pb2_grpc(), "RayfarmServiceStub")


@pytest.fixture(scope="module")
def stub(local_farm) -> Iterator[Any]:
    with grpc.insecure_channel(local_farm.grpc_address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield pb2_grpc().RayfarmServiceStub(channel)


@pytest.fixture(scope="module")
def scene_file(local_farm, small_scene: Path) -> Any:
    """The small scene's blob, uploaded over HTTP as the SDK does, as an InputFile."""
    data = small_scene.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    r = httpx.put(
        f"{local_farm.url}/blobs/{digest}",
        content=data,
        headers={**AUTH, "content-type": "application/octet-stream"},
        timeout=60,
    )
    assert r.status_code in (200, 201), r.text
    return pb2().InputFile(path=MAIN, sha256=digest, size=len(data))


def submit(stub: Any, scene_file: Any, **spec: Any) -> Any:
    request = pb2().SubmitJobRequest(spec_json=json.dumps(spec), main=MAIN, files=[scene_file])
    return stub.SubmitJob(request, metadata=APP, timeout=60)


def stream(stub: Any, job_id: str, after: str = "") -> Iterator[Any]:
    request = pb2().StreamProgressRequest(job_id=job_id, after=after)
    return stub.StreamProgress(request, metadata=APP, timeout=WAIT_S)


def order(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.mark.slow
def test_submit_and_stream_to_completion(stub, scene_file, local_farm):
    reply = submit(stub, scene_file, frames="1-3", tiles="1")
    assert (reply.state, reply.frames_total, reply.tasks_total) == ("PENDING", 3, 3)
    assert json.loads(reply.job_json)["spec"]["frames"] == "1-3"

    events = list(stream(stub, reply.id))  # live: the job is still queued or rendering

    ids = [order(e.id) for e in events]
    assert ids == sorted(set(ids)), "event ids must strictly increase"
    kinds = [e.kind for e in events]
    assert kinds[0] == "state" and events[0].fields["to"] == "PENDING"
    assert kinds[-1] == "state" and events[-1].fields["to"] == "COMPLETED"
    assert kinds.count("task_done") == 3
    assert sorted(int(e.fields["frame"]) for e in events if e.kind == "frame") == [1, 2, 3]
    # Each frame is stored after its task is done, and the job completes after both.
    assert kinds.index("task_done") < kinds.index("frame") < len(kinds) - 1
    for e in events:  # the SSE stream's JSON, and its fields as text
        data = json.loads(e.json)
        assert (data.pop("id"), data.pop("kind"), data.pop("at")) == (e.id, e.kind, e.at)
        text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
        assert text == dict(e.fields)
    # The same execution log the HTTP API serves, read straight from the farm's Redis.
    assert kinds == [f["kind"] for f in local_farm.events(reply.id)]

    # Resume after an event mid-stream: exactly the rest, then the end (job terminal).
    middle = len(events) // 2
    rest = list(stream(stub, reply.id, after=events[middle].id))
    assert [e.id for e in rest] == [e.id for e in events[middle + 1 :]]
    assert list(stream(stub, reply.id, after=events[-1].id)) == []


@pytest.mark.slow
def test_cancel_a_rendering_job(stub, scene_file):
    reply = submit(stub, scene_file, frames="1-2000")
    events = stream(stub, reply.id)
    seen = []
    for event in events:
        seen.append(event)
        if event.kind == "frame":  # rendering: cancel from the stream's own progress
            cancelled = stub.CancelJob(
                pb2().CancelJobRequest(job_id=reply.id), metadata=APP, timeout=30
            )
            assert cancelled.state == "CANCELLED"
            assert cancelled.frames_done < 2000
            break
    else:
        pytest.fail(f"the job ended before a frame was stored: {[e.kind for e in seen]}")
    rest = list(events)  # the stream goes on to the cancellation, and ends there
    assert rest[-1].kind == "state" and rest[-1].fields["to"] == "CANCELLED"

    again = refused(
        lambda: stub.CancelJob(pb2().CancelJobRequest(job_id=reply.id), metadata=APP, timeout=30)
    )
    assert again.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "CANCELLED" in again.details()
    assert (ERROR_CODE_KEY, "invalid_transition") in again.trailing_metadata()


@pytest.mark.slow
@pytest.mark.parametrize("job_id", ["0123456789abcdef", "not-a-job"])
def test_unknown_job_is_not_found(stub, job_id):
    cancel = refused(
        lambda: stub.CancelJob(pb2().CancelJobRequest(job_id=job_id), metadata=APP, timeout=30)
    )
    assert cancel.code() is grpc.StatusCode.NOT_FOUND
    assert cancel.details() == f"no job {job_id}"
    follow = refused(lambda: list(stream(stub, job_id)))
    assert follow.code() is grpc.StatusCode.NOT_FOUND
    assert follow.details() == f"no job {job_id}"
    # Serve passes a stream's status and details through, not its trailing metadata.
    assert (ERROR_CODE_KEY, "job_not_found") in cancel.trailing_metadata()


@pytest.mark.slow
def test_bad_requests_are_invalid_arguments(stub, scene_file, local_farm):
    spec = {"frames": "1-3", "tiles": "0x2"}
    error = refused(lambda: submit(stub, scene_file, **spec))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    # The farm's own message: what POST /jobs answers for the same listing.
    body = {"spec": spec, "main": MAIN, "files": [
        {"path": MAIN, "sha256": scene_file.sha256, "size": scene_file.size}]}  # fmt: skip
    r = httpx.post(f"{local_farm.url}/jobs", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 422
    assert error.details() == r.json()["error"]["message"]
    assert error.details().startswith("invalid job spec: tiles")
    assert (ERROR_CODE_KEY, "invalid_spec") in error.trailing_metadata()

    not_json = pb2().SubmitJobRequest(spec_json="{frames", main=MAIN, files=[scene_file])
    error = refused(lambda: stub.SubmitJob(not_json, metadata=APP, timeout=60))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("invalid job spec")

    missing = pb2().InputFile(path=MAIN, sha256="0" * 64, size=10)
    request = pb2().SubmitJobRequest(spec_json='{"frames": "1"}', main=MAIN, files=[missing])
    error = refused(lambda: stub.SubmitJob(request, metadata=APP, timeout=60))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not uploaded" in error.details()

    bad_after = refused(lambda: list(stream(stub, "0123456789abcdef", after="latest")))
    assert bad_after.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_calls_need_a_token_and_the_right_role(stub, local_farm, scene_file):
    no_token = (("application", APP_NAME),)
    request = pb2().SubmitJobRequest(spec_json='{"frames": "1"}', main=MAIN, files=[scene_file])
    error = refused(lambda: stub.SubmitJob(request, metadata=no_token, timeout=60))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED and "no token" in error.details()
    r = httpx.post(f"{local_farm.url}/tokens", json={"user": "grpc-vic", "role": "viewer"},
                   headers=AUTH, timeout=30)  # fmt: skip
    viewer = (("application", APP_NAME), ("authorization", f"Bearer {r.json()['token']}"))
    error = refused(lambda: stub.SubmitJob(request, metadata=viewer, timeout=60))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "only artists and admins submit" in error.details()
    # The admin's job is not the viewer's to see (no project): NOT_FOUND, as over HTTP.
    job = submit(stub, scene_file, frames="1")
    stream = pb2().StreamProgressRequest(job_id=job.id)
    error = refused(lambda: list(stub.StreamProgress(stream, metadata=viewer, timeout=60)))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    cancel = pb2().CancelJobRequest(job_id=job.id)
    assert stub.CancelJob(cancel, metadata=APP, timeout=30).state == "CANCELLED"
