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


def test_a_restart_loses_nothing_and_a_waiting_client_rides_it_out(
    tmp_path, farm_env, make_scene, small_scene, monkeypatch
):
    """One farm's life over three starts on one data dir (each start costs ~20 s, so the
    checks share them). First start: the first admin's token is made, shown once and kept
    private; a job completes, one is cancelled, and one is rendering when the farm stops,
    a client waiting on it. Second start, same port: the finished jobs and their frames are
    all there, the waiting client rides the restart out and its job completes, and the
    farm renders. Third start, another port: no new token, and the token file follows the
    farm to its port, so a client with no token finds it."""
    import re
    import stat

    # Slow enough per frame that the farm stops with frames still to render.
    slow = make_scene("--width", "96", "--height", "72", "--samples", "256", "--frames", "6")
    data_dir, port = tmp_path / "farm", free_port()
    env = {k: v for k, v in farm_env.items() if k != "RAYFARM_ADMIN_TOKEN"}
    env["RAYFARM_CPU_ACTORS"] = "1"
    path = data_dir / "admin-token"
    with ThreadPoolExecutor(1) as pool:
        for farm in run_farm(data_dir, env, port=port):
            (line,) = [x for x in farm.log.read_text().splitlines() if "first admin's token" in x]
            token = re.search(r"(rf_[A-Za-z0-9_-]{43})$", line)[1]
            # The token, then the port of the farm it is for (the SDK sends it there only).
            assert path.read_text().splitlines() == [token, f"port={farm.port}"]
            assert f"also in {path}" in line
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            with Farm(farm.url, token="") as anonymous, pytest.raises(Unauthorized):
                anonymous.jobs()
            client = Farm(farm.url, token=token)
            assert client.whoami() == {"user": "admin", "role": "admin", "projects": []}
            done = client.submit(small_scene, frames="1-2")
            assert done.wait(timeout=300).state is JobState.COMPLETED
            cancelled = client.submit(small_scene, frames="1-5000", priority=0)
            cancelled.cancel()
            before = done.download(tmp_path / "before")
            job = client.submit(slow, frames="1-6")
            deadline = time.monotonic() + 300
            while job.status().frames_done < 1:
                assert time.monotonic() < deadline, "no frame rendered"
                time.sleep(0.2)
            waited = pool.submit(job.wait, 600)
        # The farm is down now, mid-job; the waiter keeps asking.
        assert not waited.done()
        assert (data_dir / "redis" / "appendonlydir").is_dir()

        for _ in run_farm(data_dir, env, port=port):
            status = waited.result(timeout=600)
            assert status.state is JobState.COMPLETED, status.error
            assert [f.frame for f in job.frames()] == [1, 2, 3, 4, 5, 6]
            again = client.job(done.id)
            assert again.state is JobState.COMPLETED and again.frames_done == 2
            assert client.job(cancelled.id).state is JobState.CANCELLED
            assert {j.id for j in client.jobs()} == {done.id, cancelled.id, job.id}
            after = again.download(tmp_path / "after")
            for a, b in zip(before, after, strict=True):
                assert np.array_equal(pixels(a), pixels(b))
            # The restarted farm renders too.
            assert client.submit(small_scene, frames="3").wait(300).state is JobState.COMPLETED
        client.close()

    # The same data dir on another port: the file follows the farm to it.
    monkeypatch.delenv("RAYFARM_TOKEN")
    monkeypatch.setenv("RAYFARM_DATA_DIR", str(data_dir))
    for farm in run_farm(data_dir, env):
        assert farm.port != port
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
