"""Whole local farms: `rayfarm up` in a subprocess with its own data dir and ports, the
processes it started (found by a mark in their environment), and waiting for its jobs."""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from rayfarm import Job, JobState
from rayfarm.cluster.ports import free_port

from helpers import PYTHON

FARM_START_TIMEOUT_S = 120


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


def completed(job: Job) -> Job:
    """Wait for ``job`` and fail the test unless it COMPLETED; return it refreshed."""
    status = job.wait(timeout=WAIT_S)
    job.refresh()
    assert status.state is JobState.COMPLETED, job.error
    return job
