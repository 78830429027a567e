"""Shared fixtures: a real redis-server, real .blend files built by bpy, and a real
local farm (`rayfarm up` in a subprocess: Ray, Redis, Serve, render actors).

bpy never loads in the test process: scenes, reference renders and EXR reads run in
a Blender environment's own interpreter (``blender_python``), the same environments the
farm's render actors use, so a reference is rendered by the Blender the farm used."""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from rayfarm import Farm, Job, JobState
from rayfarm.cluster.api import AppContext, create_app
from rayfarm.cluster.auth import new_token
from rayfarm.cluster.local import bootstrap_admin
from rayfarm.cluster.ports import free_port
from rayfarm.cluster.redis_server import RedisServer
from rayfarm.cluster.settings import Settings
from rayfarm.render import environments
from rayfarm.render.inputs import InputFile, Inputs, blob_key
from rayfarm.render.supervisor import LOADER, PACKAGE_DIR, run_tool

ROOT = Path(__file__).resolve().parent.parent

#: Every test farm's first admin (``RAYFARM_ADMIN_TOKEN``). The SDK reads
#: ``RAYFARM_TOKEN``, so every ``Farm()`` in the tests (and the notebook's kernel) sends it.
ADMIN_TOKEN = new_token()
os.environ["RAYFARM_TOKEN"] = ADMIN_TOKEN
#: Headers for raw HTTP requests to a test farm, as its admin.
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PYTHON = sys.executable
MAKE_SCENE = ROOT / "examples" / "make_scene.py"
FARM_START_TIMEOUT_S = 120
#: The Blender the tests build scenes with (so the farm renders them with it, too).
TEST_BLENDER = "5.0"


def blender_python(version: str = TEST_BLENDER) -> str:
    """The interpreter of the Blender environment for ``version`` (``make setup`` builds
    the offered ones; a missing one is built here)."""
    return str(environments.install(version).python)


def blender_code(code: str, *args: str, blender: str = TEST_BLENDER) -> list[str]:
    """The command that runs ``code`` with Blender ``blender``'s interpreter, the worker
    package importable as ``rayfarm_worker``."""
    return [blender_python(blender), "-c", f"_d = {PACKAGE_DIR!r}\n{LOADER}{code}", *args]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """An empty database for each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "rayfarm-test",
    "AWS_SECRET_ACCESS_KEY": "rayfarm-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 endpoint over HTTP: moto's server, as s3fs's own tests use."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(Path(PYTHON).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto_server did not start:\n{log.read_text()}") from None
            time.sleep(0.2)
    yield url
    server.terminate()
    server.wait(10)


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point s3fs (through botocore's AWS_ENDPOINT_URL) at the moto server."""
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


class SceneFactory:
    """Builds .blend files with examples/make_scene.py (real bpy, ``blender``'s version:
    the file says it saved it), cached per arguments."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __call__(self, *args: str, blender: str = TEST_BLENDER) -> Path:
        name = hashlib.sha1(" ".join((blender, *args)).encode()).hexdigest()[:12] + ".blend"
        path = self.directory / name
        if not path.exists():
            subprocess.run(
                [blender_python(blender), str(MAKE_SCENE), str(path), *args],
                check=True,
                capture_output=True,
                timeout=120,
            )
        return path


@pytest.fixture(scope="session")
def make_scene(tmp_path_factory: pytest.TempPathFactory) -> SceneFactory:
    return SceneFactory(tmp_path_factory.mktemp("scenes"))


SMALL = ("--width", "64", "--height", "48", "--samples", "4", "--frames", "8")


@pytest.fixture(scope="session")
def small_scene(make_scene: SceneFactory) -> Path:
    """A 64x48, 4-sample animated Cycles scene (fast to render)."""
    return make_scene(*SMALL)


def render_reference(
    scene: Path,
    out_dir: Path,
    frames: list[int],
    exr: bool = False,
    depth: int = 32,
    blender: str = TEST_BLENDER,
) -> dict[int, Path]:
    """Render frames directly with bpy ``blender`` in a fresh process (the ground truth):
    PNG, or with ``exr`` multi-layer OpenEXR with every pass (``depth`` 32 float or 16
    half)."""
    subprocess.run(
        [blender_python(blender), str(ROOT / "tests" / "helpers" / "render_reference.py"),
         str(scene), str(out_dir), *([f"--exr{depth}"] if exr else []), *map(str, frames)],
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    return {f: out_dir / f"{f:04d}.{'exr' if exr else 'png'}" for f in frames}


def exr_parts(
    path: Path, blender: str = TEST_BLENDER
) -> dict[str, tuple[tuple[str, ...], np.ndarray, str]]:
    """Every part of a multi-layer EXR (channels, float32 pixels, "half" or "float" as
    stored), read in a fresh process with the OpenImageIO bpy ships (the test process
    never loads bpy)."""
    out = path.with_suffix(".npz")
    run_tool(blender_python(blender), "dump-exr", str(path), str(out), timeout_s=120)
    with np.load(out) as data:
        names = [str(n) for n in data["names"]]
        return {
            name: (
                tuple(str(c) for c in data[f"channels{i}"]),
                data[f"pixels{i}"],
                str(data["stored"][i]),
            )
            for i, name in enumerate(names)
        }


#: Farm-wide keys a refused request may touch: counters (accepted uploads), accounts, and
#: the audit stream (a refusal is audited too); and the changes stream, which the app's
#: webhook sender makes when it starts (its consumer group lives there).
FARM_KEYS = {b"rayfarm:metrics", b"rayfarm:users", b"rayfarm:tokens", b"rayfarm:audit",
             b"rayfarm:changes"}  # fmt: skip
#: What an accepted upload leaves (the blob index: who uploaded what, for the quota) and
#: rate limits' buckets.
FARM_PREFIXES = (b"rayfarm:blob:", b"rayfarm:uploads:", b"rayfarm:upload_bytes",
                 b"rayfarm:blobs", b"rayfarm:limit:")  # fmt: skip


def job_keys(client: redis.Redis) -> list[bytes]:
    """Redis keys other than the farm-wide ones (what a job or a stored upload leaves)."""
    return [k for k in client.keys("rayfarm:*")
            if k not in FARM_KEYS and not k.startswith(FARM_PREFIXES)]  # fmt: skip


@contextmanager
def api_client(
    redis_url: str, tmp_path: Path, notify: Any = None, **overrides: Any
) -> Iterator[TestClient]:
    """The HTTP API as an ASGI app on a real Redis and ``file://`` storage under
    ``tmp_path`` (no Ray: nothing renders), its first admin ``ADMIN_TOKEN``, offering
    Blender 5.0; ``overrides`` are ``Settings`` fields. The client sends the admin's token
    and carries ``storage_dir`` and a ``redis`` client."""
    values = {"redis_url": redis_url, "storage": (tmp_path / "storage").as_uri(),
              "data_dir": str(tmp_path), "blender": ("5.0",), **overrides}  # fmt: skip
    settings = Settings(**values)
    ctx = AppContext.build(settings, notify=notify)
    bootstrap_admin(redis_url, ADMIN_TOKEN)
    with TestClient(create_app(ctx), raise_server_exceptions=False, headers=AUTH) as client:
        client.storage_dir = tmp_path / "storage"  # type: ignore[attr-defined]
        client.redis = redis.Redis.from_url(redis_url)  # type: ignore[attr-defined]
        try:
            yield client
        finally:
            client.redis.close()  # type: ignore[attr-defined]


def user_headers(api: Any, name: str, role: str = "artist", projects: Any = ()) -> dict[str, str]:
    """Headers with a new token for user ``name`` (made by the admin through ``api``)."""
    r = api.post("/tokens", json={"user": name, "role": role, "projects": list(projects)})
    return {"Authorization": f"Bearer {r.json()['token']}"}


def refused(response: Any, status: int, fragment: str) -> dict[str, Any]:
    """The error body of ``response``, which must be ``status`` with ``fragment`` in its
    message."""
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"], response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def stored_scene(scene: Path, storage: Path) -> Inputs:
    """``scene`` stored as a farm stores it: one blob under a file:// root, named
    ``scene.blend`` in the job's folder (for a RenderActor driven without a farm)."""
    data = scene.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    blob = storage / blob_key(digest)
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    return Inputs(storage.as_uri(), "scene.blend", (InputFile("scene.blend", digest, len(data)),))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGBA"))


_FARM_PROCESS_NAMES = ("raylet", "gcs_server", "redis-server", "ray::", "haproxy")


#: Environment variable each test farm's processes inherit (Ray's daemons and workers
#: and redis-server all descend from `rayfarm up`), naming the farm.
FARM_MARK = "RAYFARM_TEST_FARM"


def farm_processes(mark: str | None = None) -> set[int]:
    """Pids of Ray daemons, Ray workers and redis-servers running now; with ``mark``,
    only those of the farm started with that mark (other farms on this machine, from
    another test session say, are not this farm's to wait for or kill)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if not any(name in cmdline for name in _FARM_PROCESS_NAMES):
                continue
            if mark is not None and f"{FARM_MARK}={mark}".encode() not in (
                entry / "environ"
            ).read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        found.add(int(entry.name))
    return found


class LocalFarm:
    """`rayfarm up` running in a subprocess with its own data dir and port."""

    def __init__(
        self, data_dir: Path, port: int, env: dict[str, str], args: tuple[str, ...] = ()
    ) -> None:
        self.data_dir, self.port, self.args = data_dir, port, args
        self.mark = f"{os.getpid()}-{port}"
        self.env = {**env, FARM_MARK: self.mark}
        self.url = f"http://127.0.0.1:{port}"
        # Its own gRPC port too: several farms may run in one session.
        self.grpc_port = free_port()
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.log = data_dir / "up.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @property
    def redis_url(self) -> str:
        """The farm's Redis, named in the line `rayfarm up` printed when it was ready (this
        start's: the log is appended to by each start, each with a Redis port of its own)."""
        found = re.findall(r"rayfarm is up at .*?redis (redis://\S+?)\)", self.log.read_text())
        assert found, "rayfarm up did not print its Redis URL"
        return str(found[-1])

    def events(self, job_id: str) -> list[dict[str, str]]:
        """The job's event stream, read straight from the farm's Redis."""
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            return [fields for _, fields in client.xrange(f"rayfarm:job:{job_id}:events")]
        finally:
            client.close()

    def start(self) -> LocalFarm:
        self.before = farm_processes(self.mark)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        up_lines = self.log.read_bytes().count(b"rayfarm is up at") if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "rayfarm", "up", "--port", str(self.port),
                 "--grpc-port", str(self.grpc_port), "--data-dir", str(self.data_dir),
                 *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + FARM_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rayfarm up exited:\n{self.log.read_text()[-4000:]}")
            try:
                healthy = httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                healthy = False
            # Up once it also said so: its line (with the Redis URL tests read) comes a
            # moment after /healthz first answers.
            if healthy and self.log.read_bytes().count(b"rayfarm is up at") > up_lines:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"rayfarm up did not become healthy:\n{self.log.read_text()[-4000:]}")

    def stop_cleanly(self, timeout_s: float = 60) -> bool:
        """Ctrl-C, as a user would; True if `rayfarm up` exited and took everything it
        started with it (checked by the fixture)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            return False
        deadline = time.monotonic() + 30
        while farm_processes(self.mark) - self.before and time.monotonic() < deadline:
            time.sleep(0.2)
        self.process = None
        return True

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        # Anything the farm started and left behind (Ray workers, redis) dies with its group.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None


@pytest.fixture(scope="session")
def farm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYFARM_", "REDIS_URL"))}
    env.update(RAYFARM_CPU_ACTORS="2", RAY_USAGE_STATS_ENABLED="0", RAYFARM_ADMIN_TOKEN=ADMIN_TOKEN)
    return env


def run_farm(
    data_dir: Path, env: dict[str, str], args: tuple[str, ...] = (), port: int | None = None
) -> Iterator[LocalFarm]:
    """Start a farm (``rayfarm up`` with ``args``, on ``port`` or a free one), yield it,
    stop it with Ctrl-C and fail if it leaves anything behind."""
    farm = LocalFarm(data_dir, port or free_port(), env, args).start()
    # A test that fails inside `for farm in run_farm(...)` leaves this generator unclosed
    # (its traceback holds it): the farm is stopped when pytest exits at the latest.
    atexit.register(farm.stop)
    try:
        yield farm
    except BaseException:  # the test failed, or the generator was closed: stop it all
        farm.stop()
        raise
    finally:
        atexit.unregister(farm.stop)
    exited = farm.stop_cleanly()
    left = farm_processes(farm.mark) - farm.before
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail(f"rayfarm up left processes running after Ctrl-C: {sorted(left)}")
    assert exited, f"rayfarm up did not exit on Ctrl-C:\n{farm.log.read_text()[-3000:]}"


#: Longest a test waits for a job on the local farm.
WAIT_S = 300


@pytest.fixture(scope="module")
def farm(local_farm: LocalFarm) -> Iterator[Farm]:
    """An SDK client of the session's local farm."""
    with Farm(local_farm.url) as client:
        yield client


def completed(job: Job) -> Job:
    """Wait for ``job`` and fail the test unless it COMPLETED; return it refreshed."""
    status = job.wait(timeout=WAIT_S)
    job.refresh()
    assert status.state is JobState.COMPLETED, job.error
    return job


@pytest.fixture(scope="session")
def local_farm(
    tmp_path_factory: pytest.TempPathFactory, farm_env: dict[str, str]
) -> Iterator[LocalFarm]:
    """The embedded default: local Ray, local Redis, file:// storage, two CPU actors."""
    yield from run_farm(tmp_path_factory.mktemp("farm"), farm_env)
