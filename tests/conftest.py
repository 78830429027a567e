"""Shared fixtures: a real redis-server, a real S3 endpoint (moto's server), real .blend
files built by bpy, and a real local farm (`rayfarm up` in a subprocess: Ray, Redis,
Serve, render actors). The helpers they use, and tests import, are in ``helpers``
(tests/helpers/)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from rayfarm import Farm
from rayfarm.cluster.ports import free_port
from rayfarm.cluster.redis_server import RedisServer

from helpers import ADMIN_TOKEN, PYTHON
from helpers.api import S3_ENV
from helpers.blender import SMALL, SceneFactory
from helpers.farms import LocalFarm, run_farm


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


@pytest.fixture(scope="session")
def make_scene(tmp_path_factory: pytest.TempPathFactory) -> SceneFactory:
    return SceneFactory(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="session")
def small_scene(make_scene: SceneFactory) -> Path:
    """A 64x48, 4-sample animated Cycles scene (fast to render)."""
    return make_scene(*SMALL)


@pytest.fixture(scope="session")
def farm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYFARM_", "REDIS_URL"))}
    env.update(RAYFARM_CPU_ACTORS="2", RAY_USAGE_STATS_ENABLED="0", RAYFARM_ADMIN_TOKEN=ADMIN_TOKEN)
    return env


@pytest.fixture(scope="module")
def farm(local_farm: LocalFarm) -> Iterator[Farm]:
    """An SDK client of the session's local farm."""
    with Farm(local_farm.url) as client:
        yield client


@pytest.fixture(scope="session")
def local_farm(
    tmp_path_factory: pytest.TempPathFactory, farm_env: dict[str, str]
) -> Iterator[LocalFarm]:
    """The embedded default: local Ray, local Redis, file:// storage, two CPU actors."""
    yield from run_farm(tmp_path_factory.mktemp("farm"), farm_env)
