"""What one request may cost, on the HTTP API as an ASGI app (real Redis, real file
storage, no Ray): uploads counted while they stream, compressed scenes read within
bounds, JSON nesting, listings that could not be laid out, and unexpected errors that
tell the client a request id and nothing else. The same over a real farm, with the
replica's memory measured: tests/farm/test_limits_farm.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil

import pytest
from fastapi.testclient import TestClient

from rayfarm.cluster.api import AppContext, create_app
from rayfarm.cluster.backpressure import bound_receive_queues
from rayfarm.cluster.settings import Settings

from helpers.api import api_client
from helpers.api import job_keys as farm_job_keys
from helpers.blends import zstd_bomb

LIMIT = 8 * 1024**2


@pytest.fixture
def api(redis_url, tmp_path):
    with api_client(redis_url, tmp_path, max_upload_bytes=LIMIT) as client:
        yield client


def stored(client) -> list[str]:
    return sorted(str(p) for p in client.storage_dir.rglob("*") if p.is_file())


def job_keys(client) -> list[bytes]:
    return farm_job_keys(client.redis)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["code"] == code, err
    return err


def assert_no_internals(response) -> None:
    """No traceback, exception name, server path or address in the answer."""
    text = response.text
    for leak in ("Traceback", "File \"", "/tmp", "/work", "/root", "site-packages", "Error:",
                 "Errno", "127.0.0.1", "pid="):  # fmt: skip
        assert leak not in text, (leak, text)


BOUNDARY = "rayfarm-test"


def form_head(spec: str = '{"frames": "1"}') -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{spec}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="scene"; filename="a.blend"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


FORM_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()
FORM_TYPE = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


# --- uploads -------------------------------------------------------------------------


def test_a_chunked_upload_past_the_limit_is_413_and_stores_nothing(api):
    def body():  # no Content-Length: the farm can only count as it reads
        yield form_head()
        yield b"BLENDER17-01v0500"
        for _ in range(LIMIT // 65536 + 32):
            yield b"\0" * 65536
        yield FORM_TAIL

    r = api.post("/jobs", content=body(), headers=FORM_TYPE)
    err = error(r, 413, "payload_too_large")
    assert "RAYFARM_MAX_UPLOAD_BYTES" in err["message"] and err["detail"] == {"limit": LIMIT}
    assert stored(api) == [] and job_keys(api) == []
    assert api.get("/healthz").status_code == 200


def test_a_scene_just_within_the_limit_is_read_whole(api, small_scene):
    """The limit is on the scene: a scene of exactly the limit, with its form around it,
    is read to its end and taken."""
    data = small_scene.read_bytes()
    scene = data + b"\0" * (LIMIT - len(data))

    def body():
        yield form_head()
        for i in range(0, len(scene), 1 << 20):
            yield scene[i : i + (1 << 20)]
        yield FORM_TAIL

    r = api.post("/jobs", content=body(), headers=FORM_TYPE)
    assert r.status_code == 201, r.text  # bytes after ENDB are not read
    assert [p.stat().st_size for p in api.storage_dir.rglob("*") if p.is_file()] == [LIMIT]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (form_head() + b"BLENDER", "cut short"),  # no closing boundary
        (
            f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
            "could not read the multipart form",
        ),  # a part without a name
        (form_head().replace(b'name="spec"', b'name="spec"; filename="x"'), "Too many files"),
        (form_head(spec="x" * (1024**2 + 1)) + FORM_TAIL, "maximum size"),
    ],
)
def test_a_form_that_cannot_be_read_is_400_without_internals(api, body, fragment):
    r = api.post("/jobs", content=body, headers=FORM_TYPE)
    assert fragment in error(r, 400, "invalid_request")["message"]
    assert_no_internals(r)
    assert stored(api) == []


# --- compressed scenes ---------------------------------------------------------------


def test_a_zstd_bomb_is_refused_naming_the_limit_uploaded_or_listed(api):
    bomb = zstd_bomb()
    r = api.post("/jobs", content=form_head() + bomb + FORM_TAIL, headers=FORM_TYPE)
    err = error(r, 413, "scene_too_large")
    assert "RAYFARM_MAX_BLEND_RATIO" in err["message"]
    assert err["detail"]["expanded_bytes"] == err["detail"]["limit"] + 1
    assert stored(api) == [] and job_keys(api) == []

    # As a blob (stored: an upload is only bytes), then named by a listing: refused the same.
    assert api.put(f"/blobs/{sha(bomb)}", content=bomb).status_code == 201
    files = [{"path": "bomb.blend", "sha256": sha(bomb), "size": len(bomb)}]
    r = api.post("/jobs", json={"spec": {"frames": "1"}, "main": "bomb.blend", "files": files})
    assert error(r, 413, "scene_too_large")["detail"]["setting"] == "RAYFARM_MAX_BLEND_RATIO"
    assert job_keys(api) == []


# --- JSON ----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [33, 500, 1000, 100_000])
@pytest.mark.parametrize("route", ["/jobs", "/blobs/missing"])
def test_json_nested_past_the_limit_is_400_naming_it(api, route, depth):
    r = api.post(route, content="[" * depth + "]" * depth,
                 headers={"Content-Type": "application/json"})  # fmt: skip
    err = error(r, 400, "invalid_request")
    assert "RAYFARM_MAX_JSON_DEPTH" in err["message"] and err["detail"] == {"limit": 32}
    assert_no_internals(r)


def test_json_nested_to_the_limit_reaches_the_route(api):
    deep = json.loads("[" * 31 + "]" * 31)  # 32 levels with the object around it
    r = api.post("/blobs/missing", json={"hashes": deep})
    assert "64 lowercase hex digits" in error(r, 400, "invalid_request")["message"]


def test_a_deeply_nested_spec_in_a_form_is_422_without_internals(api, small_scene):
    spec = '{"frames": "1", "post": ' + "[" * 1000 + "]" * 1000 + "}"
    r = api.post("/jobs", content=form_head(spec) + small_scene.read_bytes() + FORM_TAIL,
                 headers=FORM_TYPE)  # fmt: skip
    assert "recursion limit" in error(r, 422, "invalid_spec")["message"]
    assert_no_internals(r)
    assert stored(api) == []


# --- listings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("paths", "file", "inside"),
    [
        (["x", "x/y"], "x", "x/y"),
        (["x/y", "x"], "x", "x/y"),
        (["Tex", "tex/wood.png"], "Tex", "tex/wood.png"),  # compared ignoring case
        (["a/b", "a/b/c/d.png"], "a/b", "a/b/c/d.png"),
    ],
)
@pytest.mark.parametrize("route", ["/jobs", "/scenes"])
def test_a_path_that_is_both_a_file_and_a_folder_is_400_naming_both(
    api, small_scene, route, paths, file, inside
):
    scene = small_scene.read_bytes()
    assert api.put(f"/blobs/{sha(scene)}", content=scene).status_code == 201
    files = [{"path": "shot.blend", "sha256": sha(scene), "size": len(scene)}]
    files += [{"path": p, "sha256": sha(scene), "size": len(scene)} for p in paths]
    body = {"main": "shot.blend", "files": files}
    r = api.post(route, json={"spec": {"frames": "1"}, **body} if route == "/jobs" else body)
    err = error(r, 400, "invalid_request")
    assert repr(file) in err["message"] and repr(inside) in err["message"]
    assert err["detail"] == {"path": file, "inside": inside}
    assert_no_internals(r)
    assert job_keys(api) == []


def test_neighbours_that_only_share_a_prefix_are_fine(api, small_scene):
    scene = small_scene.read_bytes()
    assert api.put(f"/blobs/{sha(scene)}", content=scene).status_code == 201
    files = [{"path": p, "sha256": sha(scene), "size": len(scene)}
             for p in ("shot.blend", "a/b", "a/bc/d", "a/b.png")]  # fmt: skip
    r = api.post("/jobs", json={"spec": {"frames": "1"}, "main": "shot.blend", "files": files})
    assert r.status_code == 201, r.text


# --- unexpected errors ---------------------------------------------------------------


def test_an_internal_error_is_a_generic_500_with_a_request_id(api):
    # A real fault: the storage's folder of blobs is a file now (a broken disk layout).
    blobs = api.storage_dir / "blobs"
    shutil.rmtree(blobs, ignore_errors=True)
    blobs.write_bytes(b"not a folder")
    r = api.put(f"/blobs/{sha(b'data')}", content=b"data")
    err = error(r, 500, "server_error")
    rid = err["detail"]["request_id"]
    assert err["detail"] == {"request_id": rid} and rid in err["message"]
    assert r.headers["x-request-id"] == rid
    assert_no_internals(r)
    assert "NotADirectory" not in r.text and "blobs" not in r.text

    # Under Serve every request arrives with Serve's id (which Serve puts on the answer
    # itself): the body names that one, and the app adds no second header.
    r = api.put(f"/blobs/{sha(b'data')}", content=b"data", headers={"x-request-id": "serve-1"})
    assert error(r, 500, "server_error")["detail"] == {"request_id": "serve-1"}
    assert r.headers.get_list("x-request-id") == []
    assert api.get("/healthz").status_code == 200


def test_redis_down_is_503_with_a_request_id_and_no_address(tmp_path):
    settings = Settings(redis_url="redis://127.0.0.1:1/0", storage=tmp_path.as_uri(),
                        data_dir=str(tmp_path), blender=("5.0",))  # fmt: skip
    with TestClient(
        create_app(AppContext.build(settings)), raise_server_exceptions=False
    ) as client:
        for path in ("/healthz", "/jobs/0123456789abcdef"):
            r = client.get(path)
            err = error(r, 503, "farm_unavailable")
            assert err["message"] == "the job store is unreachable"
            assert err["detail"] == {"request_id": r.headers["x-request-id"]}
            assert_no_internals(r)
            assert "6379" not in r.text and ":1" not in r.text


# --- Serve hands a body over as the app reads it -------------------------------------


def test_serves_receive_queue_holds_a_bounded_part_of_a_body():
    """Serve's direct-ingress receive proxy, as ``bound_receive_queues`` leaves it, fed
    by a server's ``receive`` (a scripted one: the uvicorn end is not under test) of a
    100-message body: while the app reads nothing, at most the bound is taken from the
    server; then the app gets every message, in order, and the disconnect."""
    from ray.serve._private import replica

    assert bound_receive_queues(max_messages=4)
    body = [{"type": "http.request", "body": b"%d" % i, "more_body": i < 99} for i in range(100)]
    messages = [*body, {"type": "http.disconnect"}]
    taken = 0

    async def receive():
        nonlocal taken
        taken += 1
        return messages[taken - 1]

    async def run():
        proxy = replica.ASGIDIReceiveProxy({"type": "http"}, receive, asyncio.get_running_loop())
        fetching = proxy.fetch_until_disconnect_task()
        await asyncio.sleep(0.2)  # the app is busy elsewhere
        held = taken
        got = [await proxy() for _ in range(101)]
        await fetching
        return held, got

    held, got = asyncio.run(run())
    assert held <= 5  # four queued, one in hand waiting for room
    assert got == messages
    assert bound_receive_queues()  # back to the farm's bound for the tests that follow
