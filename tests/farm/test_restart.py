"""A full stop and restart of `rayfarm up` on the same data dir loses nothing:
Redis comes back from its AOF and the frames are still served from storage; a job
rendering when the farm stopped finishes after it restarts, and a client waiting on it
rides the restart out."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rayfarm import Farm, JobState, Unauthorized
from rayfarm.cluster.ports import free_port

from helpers.blender import pixels
from helpers.farms import run_farm

pytestmark = pytest.mark.slow


def test_jobs_and_frames_survive_a_farm_restart(tmp_path, farm_env, small_scene):
    data_dir = tmp_path / "farm"
    env = {**farm_env, "RAYFARM_CPU_ACTORS": "1"}
    for farm in run_farm(data_dir, env):
        with Farm(farm.url) as client:
            done = client.submit(small_scene, frames="1-2")
            assert done.wait(timeout=300).state is JobState.COMPLETED
            cancelled = client.submit(small_scene, frames="1-5000", priority=0)
            cancelled.cancel()
            before = done.download(tmp_path / "before")
    assert (data_dir / "redis" / "appendonlydir").is_dir()

    for farm in run_farm(data_dir, env):
        with Farm(farm.url) as client:
            again = client.job(done.id)
            assert again.state is JobState.COMPLETED and again.frames_done == 2
            assert client.job(cancelled.id).state is JobState.CANCELLED
            assert {j.id for j in client.jobs()} == {done.id, cancelled.id}
            after = again.download(tmp_path / "after")
            for a, b in zip(before, after, strict=True):
                assert np.array_equal(pixels(a), pixels(b))
            # The restarted farm renders too.
            assert client.submit(small_scene, frames="3").wait(300).state is JobState.COMPLETED


def test_a_waiting_client_rides_out_a_restart_mid_job(tmp_path, farm_env, make_scene):
    # Slow enough per frame that the farm stops with frames still to render.
    scene = make_scene("--width", "96", "--height", "72", "--samples", "256", "--frames", "6")
    data_dir, port = tmp_path / "farm", free_port()
    env = {**farm_env, "RAYFARM_CPU_ACTORS": "1"}
    with ThreadPoolExecutor(1) as pool:
        for farm in run_farm(data_dir, env, port=port):
            client = Farm(farm.url)
            job = client.submit(scene, frames="1-6")
            deadline = time.monotonic() + 300
            while job.status().frames_done < 1:
                assert time.monotonic() < deadline, "no frame rendered"
                time.sleep(0.2)
            waited = pool.submit(job.wait, 600)
        # The farm is down now, mid-job; the waiter keeps asking.
        assert not waited.done()
        for _ in run_farm(data_dir, env, port=port):
            status = waited.result(timeout=600)
            assert status.state is JobState.COMPLETED, status.error
            assert [f.frame for f in job.frames()] == [1, 2, 3, 4, 5, 6]
        client.close()


def test_the_first_admin_token_is_made_once_and_kept_private(tmp_path, farm_env, monkeypatch):
    import re
    import stat

    data_dir = tmp_path / "farm"
    env = {k: v for k, v in farm_env.items() if k != "RAYFARM_ADMIN_TOKEN"}
    for farm in run_farm(data_dir, env):
        (line,) = [x for x in farm.log.read_text().splitlines() if "first admin's token" in x]
        token = re.search(r"(rf_[A-Za-z0-9_-]{43})$", line)[1]
        path = data_dir / "admin-token"
        # The token, then the port of the farm it is for (the SDK sends it there only).
        assert path.read_text().splitlines() == [token, f"port={farm.port}"]
        assert f"also in {path}" in line
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with Farm(farm.url, token=token) as client:
            assert client.whoami() == {"user": "admin", "role": "admin", "projects": []}
        with Farm(farm.url, token="") as anonymous, pytest.raises(Unauthorized):
            anonymous.jobs()
    # The same data dir on another port: the file follows the farm to it.
    monkeypatch.delenv("RAYFARM_TOKEN")
    monkeypatch.setenv("RAYFARM_DATA_DIR", str(data_dir))
    for farm in run_farm(data_dir, env):
        assert farm.log.read_text().count("first admin's token") == 1  # the first run's only
        assert path.read_text().splitlines() == [token, f"port={farm.port}"]
        with Farm(farm.url, token=token) as client:
            assert client.whoami()["user"] == "admin"  # the same admin, its token kept
        with Farm(farm.url) as local:  # no token given: the one this farm wrote
            assert local.whoami()["user"] == "admin"


def test_a_redis_restart_mid_job_loses_nothing(tmp_path, farm_env, make_scene):
    """Redis (AOF on) stopped and started again while a job renders: the service and the
    dispatcher reconnect, and the job completes with every frame stored and reported once."""
    import os
    import re
    import signal
    from collections import Counter
    from pathlib import Path

    from rayfarm.cluster.redis_server import RedisServer

    from helpers.farms import farm_processes

    scene = make_scene("--width", "96", "--height", "72", "--samples", "128", "--frames", "12")
    env = {**farm_env, "RAYFARM_CPU_ACTORS": "1"}
    for farm in run_farm(tmp_path / "farm", env):
        client = Farm(farm.url)
        job = client.submit(scene, frames="1-12")
        deadline = time.monotonic() + 300
        while job.status().frames_done < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # redis-server rewrites its title (and with it its environment, the farm's mark):
        # it is found by the port the farm printed.
        port = int(re.search(r"redis redis://127\.0\.0\.1:(\d+)/", farm.log.read_text())[1])
        (pid,) = [p for p in farm_processes()
                  if f"redis-server 127.0.0.1:{port}".encode() in
                  Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
        os.kill(pid, signal.SIGTERM)  # Redis writes its AOF and exits
        while _answers(port):  # (its parent reaps it later: /proc keeps a zombie)
            time.sleep(0.05)
        time.sleep(2)  # an outage the farm notices
        redis = RedisServer(farm.data_dir / "redis", port).start()  # the same AOF and port
        try:
            status = job.wait(timeout=300)
            assert status.state is JobState.COMPLETED, status.error
            assert [f.frame for f in job.frames()] == list(range(1, 13))
            frames = Counter(e["frame"] for e in farm.events(job.id) if e["kind"] == "frame")
            assert sorted(map(int, frames)) == list(range(1, 13)) and set(frames.values()) == {1}
            assert client.submit(scene, frames="1").wait(timeout=300).state is JobState.COMPLETED
        finally:
            client.close()
            redis.stop()


def _answers(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
