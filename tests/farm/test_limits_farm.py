"""What one request may cost, over a real farm (``rayfarm up``: Ray, Serve behind
HAProxy, Redis, file storage), through its public port: uploads refused early with the
replica's memory flat, nothing stored by a refused request, a zstd bomb refused at its
bound, and answers that never carry the server's internals."""

from __future__ import annotations

import hashlib
import os
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import ADMIN_TOKEN, AUTH
from helpers.blends import zstd_bomb
from helpers.farms import LocalFarm, farm_processes, run_farm

pytestmark = pytest.mark.slow

LIMIT = 512 * 1024**2
#: The issue's bound on one replica's growth while refusing a 1 GiB upload.
MAX_GROWTH_BYTES = 256 * 1024**2
GIB = 1024**3
BOUNDARY = "rayfarm-limits"


@pytest.fixture(scope="module")
def limit_farm(tmp_path_factory, farm_env) -> Iterator[LocalFarm]:
    """One API replica behind HAProxy (every upload reaches the same process), a
    512 MiB upload limit, one render actor (for the scene inspector)."""
    env = {**farm_env, "RAYFARM_MAX_UPLOAD_BYTES": str(LIMIT), "RAYFARM_API_REPLICAS": "1",
           "RAYFARM_CPU_ACTORS": "1", "RAYFARM_FAST_INGRESS": "1"}  # fmt: skip
    for farm in run_farm(tmp_path_factory.mktemp("limits"), env):
        wait_for_direct_ingress(farm)
        yield farm


# --- the farm's processes ----------------------------------------------------------------


def wait_for_direct_ingress(farm: LocalFarm, timeout_s: float = 120) -> None:
    """Wait until HAProxy sends requests to the API replica itself: until then it sends
    them to Serve's fallback proxy, a different path (the replica's own bound does not
    apply there: tests would measure the wrong process). Read from HAProxy's admin
    socket ("show stat"), next to the config its command line names."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for row in _haproxy_stats(farm):
            if (row["pxname"].startswith("http-") and row["svname"].startswith("SERVE_REPLICA")
                    and row["status"] == "UP" and row["bck"] == "0"):  # fmt: skip
                return
        time.sleep(0.5)
    pytest.fail(f"HAProxy never routed to the API replica: {_haproxy_stats(farm)}")


def _haproxy_stats(farm: LocalFarm) -> list[dict[str, str]]:
    for pid in farm_processes(farm.mark):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if argv[0].endswith(b"/haproxy") and b"-f" in argv:
            config = argv[argv.index(b"-f") + 1].decode()
            break
    else:
        pytest.fail("the farm runs no HAProxy (RAYFARM_FAST_INGRESS=1)")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.path.join(os.path.dirname(config), "admin.sock"))
        s.sendall(b"show stat\n")
        text = b"".join(iter(lambda: s.recv(65536), b"")).decode()
    lines = text.splitlines()
    names = lines[0].lstrip("# ").split(",")
    return [dict(zip(names, line.split(","), strict=False)) for line in lines[1:] if line]


def replicas(farm: LocalFarm) -> list[int]:
    """Pids of the farm's API replica processes."""
    found = []
    for pid in farm_processes(farm.mark):
        try:
            if b"ServeReplica:rayfarm:api" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    assert found, "no API replica found"
    return found


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def deleted_files_open(pid: int) -> int:
    """Files the process holds open that are gone from disk (anonymous spools)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).endswith(" (deleted)")
        except OSError:
            pass
    return count


class PeakRss:
    """The largest RSS each process reached while the block ran (sampled every 20 ms)."""

    def __init__(self, pids: list[int]) -> None:
        self.before = {pid: rss(pid) for pid in pids}
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            for pid in self.peak:
                self.peak[pid] = max(self.peak[pid], rss(pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return max(self.peak[pid] - self.before[pid] for pid in self.peak)


def storage_use(farm: LocalFarm) -> tuple[int, int]:
    """(files, bytes) under the farm's storage."""
    files = [p for p in farm.storage_dir.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


# --- a client that streams a body and stops when the farm answers --------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # bytes of the request sent when the answer came (or the body ended)


def stream_post(farm: LocalFarm, body: Iterator[bytes], timeout_s: float = 300) -> Answer:
    """POST /jobs a multipart body chunked (no Content-Length), the chunks made lazily
    by ``body``, as fast as the farm takes them; stop sending the moment it answers."""
    head = (
        f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:{farm.port}\r\n"
        f"Authorization: Bearer {ADMIN_TOKEN}\r\nTransfer-Encoding: chunked\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", farm.port))
    sock.setblocking(False)
    pending, sent, answer, sending = memoryview(head), 0, b"", True
    deadline = time.monotonic() + timeout_s  # a hung farm fails the test, not CI
    try:
        while _incomplete(answer):
            assert time.monotonic() < deadline, f"no answer after {sent} bytes"
            readable, writable, _ = select.select([sock], [sock] if sending else [], [], 1)
            if readable:
                try:
                    data = sock.recv(1 << 16)
                except ConnectionResetError:
                    break
                if not data:
                    break
                answer, sending = answer + data, False
            elif writable:
                if not pending:
                    chunk = next(body, None)
                    frame = b"0\r\n\r\n" if chunk is None else b"%x\r\n%s\r\n" % (len(chunk), chunk)
                    sending = chunk is not None
                    pending = memoryview(frame)
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    sending = False
                    continue
                pending, sent = pending[n:], sent + n
    finally:
        sock.close()
    head_bytes, _, content = answer.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return Answer(int(lines[0].split()[1]), headers, content, sent)


def _incomplete(answer: bytes) -> bool:
    head, found, content = answer.partition(b"\r\n\r\n")
    if not found:
        return True
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return length is None or len(content) < int(length[1])


def upload(scene_bytes: int, spec: str = '{"frames": "1"}') -> Iterator[bytes]:
    """A multipart body of ``spec`` and a scene of ``scene_bytes`` zeros after a .blend
    header, made 1 MiB at a time (never held whole)."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{spec}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="scene"; filename="big.blend"'
        "\r\nContent-Type: application/octet-stream\r\n\r\nBLENDER17-01v0500"
    ).encode()
    block = bytes(1 << 20)
    for _ in range(scene_bytes >> 20):
        yield block
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def multipart(spec: str, scene: bytes) -> dict[str, Any]:
    return {"files": {"scene": ("shot.blend", scene)}, "data": {"spec": spec}}


def assert_no_internals(response_text: str, farm: LocalFarm) -> None:
    for leak in ("Traceback", 'File "', "site-packages", "/tmp/", str(farm.data_dir), "Errno",
                 "RayTaskError", "pid=", "ip="):  # fmt: skip
        assert leak not in response_text, (leak, response_text)


# --- uploads ---------------------------------------------------------------------------


def test_a_chunked_1gib_upload_is_refused_early_with_the_replica_flat(limit_farm):
    (replica,) = replicas(limit_farm)
    stored, spools = storage_use(limit_farm), deleted_files_open(replica)
    with PeakRss([replica]) as memory:
        answer = stream_post(limit_farm, upload(GIB))
    assert answer.status == 413, answer
    assert b"RAYFARM_MAX_UPLOAD_BYTES" in answer.body and b'"limit":%d' % LIMIT in answer.body
    # Answered once the limit was passed, not after the whole GiB (what was sent past the
    # limit sat in socket and proxy buffers).
    assert LIMIT < answer.sent < LIMIT + 64 * 1024**2, answer.sent
    assert memory.growth < MAX_GROWTH_BYTES, memory.peak
    assert storage_use(limit_farm) == stored  # nothing stored
    assert deleted_files_open(replica) == spools  # its spool closed, its disk freed
    assert httpx.get(f"{limit_farm.url}/healthz").status_code == 200


def test_concurrent_chunked_uploads_keep_the_replica_flat(limit_farm):
    """Three 1 GiB uploads at once into one replica: the app reads each at a third of
    its speed while the clients send at full speed. Serve's own receive queue would
    hold the difference (without the bound this test measured the replica 1.8 GB up)."""
    (replica,) = replicas(limit_farm)
    stored = storage_use(limit_farm)
    answers: list[Answer] = []
    with PeakRss([replica]) as memory:
        threads = [threading.Thread(target=lambda: answers.append(stream_post(limit_farm,
                   upload(GIB)))) for _ in range(3)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(a.status for a in answers) == [413, 413, 413], answers
    assert memory.growth < MAX_GROWTH_BYTES, memory.peak
    assert storage_use(limit_farm) == stored


def test_a_refused_upload_leaves_nothing_stored(limit_farm, small_scene):
    """Every refusal of a multipart upload, a blob and a listing, with the storage's
    files and bytes counted before and after; the last refusal comes from the farm's
    scene inspector, after the upload was stored to be inspected."""
    scene = small_scene.read_bytes()
    stored = storage_use(limit_farm)
    with httpx.Client(base_url=limit_farm.url, headers=AUTH, timeout=120) as http:
        refusals = [
            http.post("/jobs", **multipart('{"frames": "0-"}', scene)),  # a bad spec
            http.post("/jobs", **multipart('{"frames": "1"}', scene[: len(scene) // 2])),
            http.post("/jobs", **multipart('{"frames": "1"}', zstd_bomb())),
            http.put(f"/blobs/{'0' * 64}", content=scene),  # not its hash
            http.post(
                "/jobs",
                json={
                    "spec": {"frames": "1"},
                    "main": "a.blend",
                    "files": [
                        {
                            "path": "a.blend",
                            "sha256": hashlib.sha256(scene).hexdigest(),
                            "size": len(scene),
                        }
                    ],
                },
            ),  # fmt: skip  (not uploaded)
            http.post("/jobs", **multipart('{"frames": "1", "scene": "Nope"}', scene)),
        ]
        assert [r.status_code for r in refusals] == [422, 422, 413, 400, 400, 422], [
            r.text for r in refusals
        ]
        assert "has no scene 'Nope'" in refusals[-1].json()["error"]["message"]
        assert storage_use(limit_farm) == stored
        # The same upload, accepted: stored once (which is what the refusal undid).
        r = http.post("/jobs", **multipart('{"frames": "1"}', scene))
        assert r.status_code == 201, r.text
        assert storage_use(limit_farm) == (stored[0] + 1, stored[1] + len(scene))
        http.post(f"/jobs/{r.json()['id']}/cancel")  # its render is not under test


# --- compressed scenes -------------------------------------------------------------------


def test_a_zstd_bomb_is_refused_naming_the_limit(limit_farm):
    bomb = zstd_bomb()  # 4.2 MB, 128 GiB expanded
    stored = storage_use(limit_farm)
    r = httpx.post(f"{limit_farm.url}/jobs", headers=AUTH, timeout=120,
                   **multipart('{"frames": "1"}', bomb))  # fmt: skip
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "scene_too_large" and "RAYFARM_MAX_BLEND_RATIO" in err["message"]
    # The farm stopped at its bound: 256 MiB plus 64 times the file, not 128 GiB.
    assert err["detail"]["limit"] == 256 * 1024**2 + 64 * len(bomb)
    assert err["detail"]["expanded_bytes"] == err["detail"]["limit"] + 1
    assert storage_use(limit_farm) == stored


# --- errors ------------------------------------------------------------------------------


def test_nested_json_and_a_file_inside_a_file_are_4xx_without_internals(limit_farm, small_scene):
    scene = small_scene.read_bytes()
    digest = hashlib.sha256(scene).hexdigest()
    with httpx.Client(base_url=limit_farm.url, headers=AUTH, timeout=120) as http:
        r = http.post("/jobs", content="[" * 1000 + "]" * 1000,
                      headers={"Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 400 and "RAYFARM_MAX_JSON_DEPTH" in r.text, r.text
        assert_no_internals(r.text, limit_farm)

        assert http.put(f"/blobs/{digest}", content=scene).status_code == 201
        files = [{"path": p, "sha256": digest, "size": len(scene)} for p in ("x", "x/y", "s.blend")]
        for route, extra in (("/jobs", {"spec": {"frames": "1"}}), ("/scenes", {})):
            r = http.post(route, json={**extra, "main": "s.blend", "files": files})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["detail"] == {"path": "x", "inside": "x/y"}
            assert_no_internals(r.text, limit_farm)


def test_an_internal_error_is_a_generic_500_whose_detail_is_logged(limit_farm):
    # A real fault: the storage's folder of blobs is a file now (a broken disk layout).
    blobs = limit_farm.storage_dir / "blobs"
    aside = blobs.with_name("blobs.aside")
    if blobs.exists():
        blobs.rename(aside)
    blobs.write_bytes(b"not a folder")
    try:
        r = httpx.put(f"{limit_farm.url}/blobs/{hashlib.sha256(b'x').hexdigest()}",
                      content=b"x", headers=AUTH)  # fmt: skip
    finally:
        blobs.unlink()
        if aside.exists():
            aside.rename(blobs)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    rid = err["detail"]["request_id"]
    assert err["code"] == "server_error" and err["detail"] == {"request_id": rid}
    assert r.headers.get_list("x-request-id") == [rid]  # Serve's id, once
    assert_no_internals(r.text, limit_farm)
    assert "NotADirectory" not in r.text and "blobs" not in r.text
    # The detail is in the replica's log, under that id.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        logged = [p for p in _ray_logs(limit_farm) if rid in p.read_text(errors="replace")]
        if logged:
            break
        time.sleep(0.5)
    assert logged, f"request {rid} is in no log of the farm"
    text = logged[0].read_text(errors="replace")
    assert "NotADirectoryError" in text[text.index(rid) :]


def _ray_logs(farm: LocalFarm) -> list[Path]:
    """The farm's own log and its Ray session's worker logs."""
    found = [farm.log]
    for pid in farm_processes(farm.mark):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        match = re.search(r"--session[-_]dir=([^\x00 ]+)", argv)
        if match:
            logs = Path(match[1], "logs")
            found += sorted(logs.glob("worker-*")) + sorted(logs.glob("serve/*.log"))
            break
    return found
