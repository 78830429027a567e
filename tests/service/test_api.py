"""The HTTP API as an ASGI app on a real Redis and real file storage (no Ray).

Every bad input gets a precise 4xx, stores nothing, and the service stays up.
"""

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rayfarm import JobState
from rayfarm.cluster.api import AppContext, create_app
from rayfarm.cluster.settings import Settings

from helpers import AUTH
from helpers.api import api_client, job_keys


@pytest.fixture
def api(redis_url, tmp_path):
    nudges: list[int] = []
    with api_client(redis_url, tmp_path, lambda: nudges.append(1),
                    max_upload_bytes=4 * 1024 * 1024) as client:  # fmt: skip
        client.nudges = nudges
        yield client


def submit(client, data: bytes, spec, name="shot.blend"):
    body = spec if isinstance(spec, str) else json.dumps(spec)
    return client.post("/jobs", files={"scene": (name, data)}, data={"spec": body})


def assert_nothing_stored(client):
    assert [p for p in client.storage_dir.rglob("*") if p.is_file()] == []
    assert _job_keys(client) == []


def _job_keys(client) -> list[bytes]:
    return job_keys(client.redis)


def assert_error(response, status, code, fragment):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["code"] == code
    assert fragment in err["message"]


def test_submit_stores_scene_and_queues_pending_job(api, small_scene: Path):
    r = submit(api, small_scene.read_bytes(), {"frames": "1-4", "tiles": "2x2", "samples": 2})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "PENDING" and job["frames_total"] == 4 and job["tasks_total"] == 16
    assert job["spec"]["tiles"] == "2x2" and job["scene_file"] == "shot.blend"
    digest = hashlib.sha256(small_scene.read_bytes()).hexdigest()
    stored = api.storage_dir / "blobs" / "sha256" / digest[:2] / digest
    assert stored.read_bytes() == small_scene.read_bytes()
    inputs = json.loads(api.redis.hget(f"rayfarm:job:{job['id']}", "inputs"))
    assert inputs == {
        "main": "shot.blend",
        "files": [["shot.blend", digest, stored.stat().st_size]],
    }
    assert api.nudges == [1]
    assert api.get(f"/jobs/{job['id']}").json()["state"] == "PENDING"
    status = api.get(f"/jobs/{job['id']}/status").json()
    assert status.pop("event")
    assert status == {
        "id": job["id"], "state": "PENDING", "frames_done": 0, "frames_total": 4,
        "tasks_done": 0, "tasks_total": 16, "error": None, "detail": None,
    }  # fmt: skip
    listed = api.get("/jobs", params={"state": "PENDING"}).json()
    assert listed["total"] == 1 and listed["jobs"][0]["id"] == job["id"]
    assert api.get("/jobs", params={"state": "FAILED"}).json()["total"] == 0
    assert api.get(f"/jobs/{job['id']}/frames").json() == {"frames": []}


@pytest.mark.parametrize(
    ("mutate", "status", "code", "fragment"),
    [
        (lambda d: b"this is a text file, not a scene", 422, "invalid_scene", "not a .blend"),
        (lambda d: d[: len(d) // 2], 422, "invalid_scene", "truncated"),
        (lambda d: d[:13] + b"0501" + d[17:], 422, "scene_too_new", "Blender 5.1"),
        (lambda d: b"", 422, "invalid_scene", "only 0 bytes"),
    ],
)
def test_bad_scenes_are_refused_and_nothing_is_stored(
    api, small_scene, mutate, status, code, fragment
):
    r = submit(api, mutate(small_scene.read_bytes()), {"frames": "1"})
    assert_error(r, status, code, fragment)
    assert_nothing_stored(api)
    assert api.get("/healthz").status_code == 200


def test_too_new_names_the_offered_versions(api, small_scene):
    """A file newer than every version the farm offers (this app offers 5.0) is refused
    before anything is stored, naming them; so is a request for a version not offered."""
    data = small_scene.read_bytes()
    r = submit(api, data[:13] + b"0600" + data[17:], {"frames": "1"})
    assert_error(r, 422, "scene_too_new", "newer than every Blender this farm offers (5.0)")
    assert "saved by Blender 6.0" in r.json()["error"]["message"]
    assert r.json()["error"]["detail"] == {"file_version": "6.0", "offered": ["5.0"]}
    assert_nothing_stored(api)
    r = submit(api, data, {"frames": "1", "blender": "4.2"})
    assert_error(r, 422, "blender_not_offered", "Blender 4.2, which this farm does not offer")
    assert r.json()["error"]["detail"]["offered"] == ["5.0"]
    assert_nothing_stored(api)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"frames": "8-1"}, "backwards"),
        ({"frames": "1", "colour": "red"}, "colour: unknown field"),
        ({"frames": "1", "tiles": "0x2"}, "tiles"),
        ({"frames": "1", "tiles": "-1x2"}, "tiles"),
        ({"frames": "1", "tiles": "17x1"}, "tiles per axis must be 1 to 16"),
        ({"frames": "1", "tiles": 10**12}, "tiles"),
        ({"frames": "1-100000", "tiles": "2x2"}, "400000 tasks (100000 frames x 4 tiles)"),
        ({"frames": "1-1000000"}, "more than 100000 frames"),
        ({"frames": "1", "samples": 0}, "samples"),
        ({"frames": "1", "resolution_percentage": 0}, "resolution_percentage"),
        ({"tiles": "2x2"}, "frames: Field required"),
        ("{not json", "invalid job spec"),
        ("[1, 2]", "invalid job spec"),
    ],
)
def test_bad_specs_are_refused_and_nothing_is_stored(api, small_scene, spec, fragment):
    r = submit(api, small_scene.read_bytes(), spec)
    assert_error(r, 422, "invalid_spec", fragment)
    assert_nothing_stored(api)


def test_missing_parts(api, small_scene):
    r = api.post("/jobs", files={"spec": (None, '{"frames": "1"}')})  # multipart, no file
    assert_error(r, 400, "invalid_request", "missing file part 'scene'")
    r = api.post("/jobs", data={"spec": '{"frames": "1"}'})  # a url-encoded form holds no file
    assert_error(r, 415, "unsupported_media_type", "application/x-www-form-urlencoded")
    r = api.post("/jobs", files={"scene": ("a.blend", small_scene.read_bytes())})
    assert_error(r, 400, "invalid_request", "missing form part 'spec'")
    r = api.post("/jobs", content=b"garbage", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert_nothing_stored(api)


def test_upload_over_the_limit_is_413(api):
    big = b"BLENDER17-01v0500" + b"\0" * (5 * 1024 * 1024)
    r = submit(api, big, {"frames": "1"})
    assert_error(r, 413, "payload_too_large", "over the farm's limit")
    assert_nothing_stored(api)


def test_unknown_jobs_are_404(api):
    for path in [
        "/jobs/0123456789abcdef",
        "/jobs/not-an-id",
        "/jobs/0123456789abcdef/status",
        "/jobs/0123456789abcdef/frames",
        "/jobs/0123456789abcdef/frames/1",
    ]:
        assert_error(api.get(path), 404, "job_not_found", "no job")
    for action in ["cancel", "retry"]:
        assert_error(api.post(f"/jobs/0123456789abcdef/{action}"), 404, "job_not_found", "no job")
    assert api.get("/nowhere").status_code == 404


def test_cancel_and_retry_follow_the_table(api, small_scene):
    job = submit(api, small_scene.read_bytes(), {"frames": "1-2"}).json()
    r = api.post(f"/jobs/{job['id']}/retry")
    assert_error(r, 409, "invalid_transition", "is PENDING; it cannot become PENDING")
    r = api.post(f"/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
    assert r.json()["finished_at"] is not None
    assert_error(api.post(f"/jobs/{job['id']}/cancel"), 409, "invalid_transition", "CANCELLED")
    assert_error(api.post(f"/jobs/{job['id']}/retry"), 409, "invalid_transition", "CANCELLED")
    assert api.redis.zrange("rayfarm:queue", 0, -1) == []
    assert_error(api.get(f"/jobs/{job['id']}/frames/1"), 404, "frame_not_found", "no stored frame")


def test_list_paging_and_bad_query(api, small_scene):
    ids = [submit(api, small_scene.read_bytes(), {"frames": "1"}).json()["id"] for _ in range(3)]
    page = api.get("/jobs", params={"offset": 1, "limit": 1}).json()
    assert page["total"] == 3 and [j["id"] for j in page["jobs"]] == [ids[1]]
    assert_error(api.get("/jobs", params={"limit": 0}), 400, "invalid_request", "limit")
    assert_error(api.get("/jobs", params={"state": "DONE"}), 400, "invalid_request", "state")
    # Found by tests/farm/test_fuzz.py: past Redis' 64-bit ranges this was a 500.
    huge = api.get("/jobs", params={"offset": 10**21})
    assert_error(huge, 400, "invalid_request", "offset")
    too_long = api.get(f"/jobs/{ids[0]}/status", params={"after": f"{10**20}-0", "wait_s": 1})
    assert_error(too_long, 400, "invalid_request", "after")


def test_openapi_enum_is_the_sdk_enum(api):
    schema = api.get("/openapi.json").json()
    assert schema["components"]["schemas"]["JobState"]["enum"] == [s.value for s in JobState]
    assert api.get("/docs").status_code == 200


def test_health_reports_versions(api):
    body = api.get("/healthz").json()
    assert body["status"] == "ok" and body["blender"] == ["5.0"]
    assert body["workers"] is None  # no dispatcher behind this app


def test_redis_down_is_503_and_the_app_stays_up(tmp_path):
    settings = Settings(
        redis_url="redis://127.0.0.1:1/0",
        storage=tmp_path.as_uri(),
        data_dir=str(tmp_path),
        blender=("5.0",),
    )
    with TestClient(
        create_app(AppContext.build(settings)), raise_server_exceptions=False
    ) as client:
        assert_error(client.get("/healthz"), 503, "farm_unavailable", "unreachable")
        assert_error(client.get("/jobs/0123456789abcdef"), 503, "farm_unavailable", "unreachable")


def test_status_long_poll_answers_on_change(api, small_scene):
    job = submit(api, small_scene.read_bytes(), {"frames": "1-2"}).json()
    first = api.get(f"/jobs/{job['id']}/status").json()
    assert first["event"]
    # Nothing happens: the long-poll runs out and returns the same status.
    same = api.get(f"/jobs/{job['id']}/status", params={"after": first["event"], "wait_s": 0.3})
    assert same.status_code == 200 and same.json() == first
    # A change while a client waits wakes it with the new state.
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            api.get, f"/jobs/{job['id']}/status", params={"after": first["event"], "wait_s": 30}
        )
        time.sleep(0.2)
        assert not waiting.done()
        api.post(f"/jobs/{job['id']}/cancel")
        changed = waiting.result(timeout=30).json()
    assert changed["state"] == "CANCELLED" and changed["event"] != first["event"]
    # A client that is behind gets the current status at once.
    behind = api.get(f"/jobs/{job['id']}/status", params={"after": first["event"], "wait_s": 30})
    assert behind.json()["state"] == "CANCELLED"
    assert_error(
        api.get(f"/jobs/{job['id']}/status", params={"after": "x", "wait_s": 1}),
        400, "invalid_request", "after",
    )  # fmt: skip
    assert_error(
        api.get(f"/jobs/{job['id']}/status", params={"after": first["event"], "wait_s": 31}),
        400, "invalid_request", "wait_s",
    )  # fmt: skip


# -- scene folders: content-addressed blobs and a listing ---------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_blob(client, data: bytes, digest: str | None = None):
    return client.put(f"/blobs/{digest or _sha(data)}", content=data)


def submit_folder(client, spec, main, files):
    body = {"spec": spec, "main": main, "files": files}
    return client.post("/jobs", json=body)


def test_blobs_upload_once_and_a_folder_job_names_them(api, small_scene: Path):
    scene, texture = small_scene.read_bytes(), b"\x89PNG fake texture bytes"
    hashes = [_sha(scene), _sha(texture)]
    assert api.post("/blobs/missing", json={"hashes": hashes}).json() == {"missing": hashes}
    for data in (scene, texture):
        r = put_blob(api, data)
        assert r.status_code == 201 and r.json() == {"sha256": _sha(data), "size": len(data)}
    assert api.post("/blobs/missing", json={"hashes": hashes}).json() == {"missing": []}
    assert put_blob(api, texture).status_code == 201  # idempotent
    files = [
        {"path": "shots/a/shot.blend", "sha256": hashes[0], "size": len(scene)},
        {"path": "textures/wood.png", "sha256": hashes[1], "size": len(texture)},
    ]
    r = submit_folder(api, {"frames": "1"}, "shots/a/shot.blend", files)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["scene_file"] == "shots/a/shot.blend" and api.nudges == [1]
    inputs = json.loads(api.redis.hget(f"rayfarm:job:{job['id']}", "inputs"))
    assert inputs["files"][1] == ["textures/wood.png", hashes[1], len(texture)]


def test_a_blob_whose_bytes_do_not_match_its_hash_is_refused_and_not_stored(api):
    r = put_blob(api, b"what was sent", _sha(b"what was promised"))
    assert_error(r, 400, "invalid_request", "hash to")
    assert_nothing_stored(api)
    assert_error(api.put("/blobs/not-a-hash", content=b"x"), 400, "invalid_request", "sha256")


def test_an_oversize_blob_is_refused_while_it_streams(api):
    data = b"\0" * (4 * 1024 * 1024 + 1)

    def chunks():  # no Content-Length: the server must count as it reads
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    r = api.put(f"/blobs/{_sha(data)}", content=chunks())
    assert_error(r, 413, "payload_too_large", "over the farm's limit")
    assert_nothing_stored(api)
    assert api.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "path",
    ["../escape.png", "textures/../../etc/passwd", "/etc/passwd", "C:/Users/a/tex.png",
     "textures\\wood.png", "textures//wood.png", "./wood.png", "tex/\x00.png", ""],
)  # fmt: skip
def test_a_path_that_could_leave_the_input_folder_is_refused_naming_it(api, small_scene, path):
    scene = small_scene.read_bytes()
    assert put_blob(api, scene).status_code == 201
    files = [
        {"path": "shot.blend", "sha256": _sha(scene), "size": len(scene)},
        {"path": path, "sha256": _sha(scene), "size": len(scene)},
    ]
    r = submit_folder(api, {"frames": "1"}, "shot.blend", files)
    assert_error(r, 400, "invalid_request", f"input path {path!r}")
    assert r.json()["error"]["detail"] == {"path": path}
    assert _job_keys(api) == []


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda f: [*f, dict(f[0], path="SHOT.blend")], "listed twice"),
        (lambda f: [dict(f[0], size=f[0]["size"] + 1)], "the stored blob has"),
        (lambda f: [*f, {"path": "t.png", "sha256": "ab" * 32, "size": 3}], "not uploaded: t.png"),
        (lambda f: [dict(f[0], sha256="AB" * 32)], "64 lowercase hex"),
        (lambda f: [dict(f[0], extra=1)], "exactly {path, sha256, size}"),
        (lambda f: [], "non-empty list"),
    ],
)  # fmt: skip
def test_a_bad_listing_is_refused_and_nothing_is_queued(api, small_scene, mutate, fragment):
    scene = small_scene.read_bytes()
    assert put_blob(api, scene).status_code == 201
    files = mutate([{"path": "shot.blend", "sha256": _sha(scene), "size": len(scene)}])
    r = submit_folder(api, {"frames": "1"}, "shot.blend", files)
    assert_error(r, 400, "invalid_request", fragment)
    assert _job_keys(api) == []


def test_a_folder_job_checks_its_main_file_and_spec(api, small_scene):
    scene, text = small_scene.read_bytes(), b"not a blend"
    for data in (scene, text):
        assert put_blob(api, data).status_code == 201
    files = [
        {"path": "shot.blend", "sha256": _sha(scene), "size": len(scene)},
        {"path": "fake.blend", "sha256": _sha(text), "size": len(text)},
        {"path": "notes.txt", "sha256": _sha(text), "size": len(text)},
    ]
    assert_error(submit_folder(api, {"frames": "1"}, "notes.txt", files), 400,
                 "invalid_request", "is not a .blend")  # fmt: skip
    assert_error(submit_folder(api, {"frames": "1"}, "other.blend", files), 400,
                 "invalid_request", "is not one of the listed files")  # fmt: skip
    r = submit_folder(api, {"frames": "1"}, "fake.blend", files)
    assert r.status_code == 422 and "not a .blend" in r.json()["error"]["message"]
    assert_error(submit_folder(api, {"frames": "x"}, "shot.blend", files), 422,
                 "invalid_spec", "frames")  # fmt: skip
    r = api.post("/jobs", content=b"{nope", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_request", "not JSON")
    assert _job_keys(api) == []


@pytest.mark.parametrize(
    ("headers", "body", "status", "fragment"),
    [
        ({"Content-Type": "text/plain"}, b"frames=1", 415, "not content type 'text/plain'"),
        ({"Content-Type": "application/xml"}, b"<job/>", 415, "'application/xml'"),
        ({"Content-Type": ""}, b"", 415, "not content type 'none'"),
        ({"Content-Type": "application/json"}, b"", 400, "not JSON"),
        ({"Content-Type": "application/json"}, b"[]", 400, "JSON object"),
        ({"Content-Type": "multipart/form-data; boundary=x"}, b"--x--", 400, "'spec'"),
    ],
)
def test_a_submission_in_the_wrong_shape_is_refused(api, headers, body, status, fragment):
    r = api.post("/jobs", content=body, headers=headers)
    assert r.status_code == status and fragment in r.json()["error"]["message"], r.text
    assert_nothing_stored(api)


def test_concurrent_cancels_give_one_consistent_answer(api, small_scene):
    from concurrent.futures import ThreadPoolExecutor

    job = submit(api, small_scene.read_bytes(), {"frames": "1-4"}).json()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: api.post(f"/jobs/{job['id']}/cancel"), range(16)))
    codes = sorted(r.status_code for r in answers)
    # The first cancel wins; every other one is told the job is already CANCELLED.
    assert codes == [200] + [409] * 15, [r.text for r in answers]
    assert all("CANCELLED" in r.text for r in answers)
    events = api.redis.xrange(f"rayfarm:job:{job['id']}:events")
    states = [f[b"to"] for _, f in events if f.get(b"kind") == b"state"]
    assert states.count(b"CANCELLED") == 1


# -- accounts, roles and the audit log ------------------------------------------------------


def _token(api, user, role, projects=None):
    body = {"user": user, "role": role, **({"projects": projects} if projects else {})}
    r = api.post("/tokens", json=body)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def test_no_token_or_a_wrong_one_is_401_and_audited(api):
    r = api.get("/jobs", headers={"Authorization": ""})
    assert_error(r, 401, "unauthorized", "no token")
    wrong = {"Authorization": "Bearer rf_" + "A" * 43}
    assert_error(api.get("/jobs/0123456789abcdef", headers=wrong), 401, "unauthorized", "unknown")
    assert_error(api.post("/jobs", headers={"Authorization": "Basic x"}), 401, "unauthorized", "")
    # Aggregated per address (tests/service/test_rate_limits.py): the first is recorded at once, the
    # others are counted into the address's next record.
    (failure,) = api.get("/audit", params={"action": "sign-in failed"}).json()["records"]
    assert (failure["outcome"], failure["from"], failure["count"]) == ("401", "testclient", "1")
    assert "no token" in failure["detail"]
    # Health and metrics stay open: load balancers and Prometheus carry no token.
    assert api.get("/healthz", headers={"Authorization": ""}).status_code == 200
    assert api.get("/metrics", headers={"Authorization": ""}).status_code == 200


def test_roles_decide_who_sees_and_changes_which_job(api, small_scene):
    ana = _token(api, "ana", "artist", ["sh010"])
    bo = _token(api, "bo", "artist")
    vic = _token(api, "vic", "viewer", ["sh010"])
    scene = small_scene.read_bytes()

    def post(headers, spec):
        form = {"scene": ("shot.blend", scene)}
        return api.post("/jobs", files=form, data={"spec": json.dumps(spec)}, headers=headers)

    in_project = post(ana, {"frames": "1", "project": "sh010"}).json()
    private = post(bo, {"frames": "1"}).json()
    assert (in_project["owner"], private["owner"]) == ("ana", "bo")
    assert_error(post(vic, {"frames": "1"}), 403, "forbidden", "only artists and admins submit")
    assert_error(post(bo, {"frames": "1", "project": "sh010"}), 403, "forbidden", "not a member")

    # Another's job answers 404 on every route, as an unknown id would.
    for path in ("", "/status", "/frames", "/events", "/logs", "/outputs"):
        assert_error(api.get(f"/jobs/{private['id']}{path}", headers=ana), 404, "job_not_found", "")
    assert_error(api.post(f"/jobs/{private['id']}/cancel", headers=ana), 404, "job_not_found", "")
    # A project's job: its members read it; only its owner (or an admin) changes it.
    assert api.get(f"/jobs/{in_project['id']}", headers=vic).status_code == 200
    assert_error(
        api.post(f"/jobs/{in_project['id']}/cancel", headers=vic), 403, "forbidden", "ana's"
    )
    assert_error(api.post(f"/jobs/{in_project['id']}/cancel", headers=bo), 404, "job_not_found", "")
    assert api.post(f"/jobs/{in_project['id']}/cancel", headers=ana).json()["state"] == "CANCELLED"

    def listed(headers, **params):
        page = api.get("/jobs", params=params, headers=headers).json()
        return {j["id"] for j in page["jobs"]}, page["total"]

    assert listed(ana) == ({in_project["id"]}, 1)
    assert listed(vic) == ({in_project["id"]}, 1)
    assert listed(bo) == ({private["id"]}, 1)
    assert listed(AUTH) == ({in_project["id"], private["id"]}, 2)  # the admin
    assert listed(AUTH, owner="bo") == ({private["id"]}, 1)
    assert listed(AUTH, state="CANCELLED") == ({in_project["id"]}, 1)


def test_tokens_users_and_the_audit_log_are_for_admins(api, small_scene):
    ana = _token(api, "ana", "artist")
    assert api.get("/whoami", headers=ana).json() == {
        "user": "ana",
        "role": "artist",
        "projects": [],
    }
    assert_error(api.post("/tokens", json={"user": "eve", "role": "admin"}, headers=ana),
                 403, "forbidden", "for admins")  # fmt: skip
    assert_error(api.get("/audit", headers=ana), 403, "forbidden", "")
    assert_error(api.get("/users", headers=ana), 403, "forbidden", "")
    for body, fragment in [
        ({"user": "x y", "role": "artist"}, "user name"),
        ({"user": "zed"}, "no user zed"),
        ({"user": "ana", "role": "boss"}, "role 'boss'"),
        ({"user": "ana", "projects": ["p"]}, "give role too"),
        ({"user": "ana", "colour": "red"}, "JSON object"),
    ]:
        r = api.post("/tokens", json=body)
        assert 400 <= r.status_code < 500 and fragment in r.json()["error"]["message"], r.text
    names = [u["name"] for u in api.get("/users").json()["users"]]
    assert names == ["admin", "ana"]

    job = submit(api, small_scene.read_bytes(), {"frames": "1"}).json()
    api.post(f"/jobs/{job['id']}/cancel", headers=ana)  # not hers: 404, and audited
    api.post(f"/jobs/{job['id']}/cancel")
    records = api.get("/audit", params={"job": job["id"]}).json()["records"]
    assert [(r["who"], r["action"], r["outcome"]) for r in records] == [
        ("admin", f"POST /jobs/{job['id']}/cancel", "200"),
        ("ana", f"POST /jobs/{job['id']}/cancel", "404"),
        ("admin", "POST /jobs", "201"),
    ]
    assert all(r["at"] and r["from"] for r in records)
    assert api.get("/audit", params={"user": "ana"}).json()["records"][0]["outcome"] == "404"


def test_a_change_a_browser_sends_for_another_site_is_refused_and_audited(api):
    """A form on another site can make a visitor's browser POST to a farm it reaches: a
    foreign Origin (or Sec-Fetch-Site: cross-site) on a state change is 403, nothing is
    stored, the refusal is audited; the farm's own origin, API clients (no Origin) and
    reads pass."""
    spec = json.dumps({"frames": "1"})
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site"}):  # fmt: skip
        r = api.post("/jobs", files={"scene": ("shot.blend", b"BLENDER")},
                     data={"spec": spec}, headers=headers)  # fmt: skip
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden"
        assert "from another site" in r.json()["error"]["message"]
    assert_nothing_stored(api)
    (record, *_) = api.get("/audit", params={"action": "POST /jobs"}).json()["records"]
    assert record["outcome"] == "403"
    # Its own origin, and no Origin at all (the SDK, the CLI), reach the route.
    r = api.post("/jobs/0123456789abcdef/cancel", headers={"Origin": "http://testserver"})
    assert r.status_code == 404
    assert api.post("/jobs/0123456789abcdef/cancel").status_code == 404
    assert api.get("/whoami", headers={"Origin": "https://evil.example"}).status_code == 200
