"""One farm per data directory, and nothing a farm started outlives it.

`rayfarm up` killed with SIGKILL takes every process it started with it (its reaper
stops them); a farm starting on a data directory first stops what an earlier one left
running there (found by that directory, never by port); a second farm on a data
directory in use is refused, naming the first one's pid; the CLI in another shell finds
the admin token of a farm started with --data-dir. Every check runs the real
`rayfarm up`, redis-server and Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis

from rayfarm import Farm, JobState
from rayfarm.cluster.farm_lock import FarmLock
from rayfarm.cluster.ports import free_port
from rayfarm.cluster.reaper import GRACE_S, MARK_ENV, REAP_S, leftovers, started, stop
from rayfarm.cluster.redis_server import RedisServer
from rayfarm.errors import FarmUnavailable
from rayfarm.paths import local_token, register_farm, token_file_text, unregister_farm

from helpers import PYTHON
from helpers.farms import FARM_MARK, LocalFarm, run_farm

#: Longest a test waits for processes to exit after their farm is gone (the reaper looks
#: for up to REAP_S, after giving Redis its GRACE_S).
GONE_S = REAP_S + GRACE_S + 30


def redis_servers(directory: Path) -> set[int]:
    """redis-servers running with their data in ``directory`` (redis-server works in
    its --dir), read from /proc independently of the code under test."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name, cwd = (entry / "comm").read_text().strip(), os.readlink(entry / "cwd")
        except OSError:
            continue
        if name == "redis-server" and Path(cwd) == directory.resolve():
            found.add(int(entry.name))
    return found


def carrying(mark: str) -> set[int]:
    """Every process, whatever its name, whose environment has the test farm's mark
    (``FARM_MARK``, inherited from `rayfarm up` by all it starts, its reaper included)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"{FARM_MARK}={mark}".encode() in (
                (entry / "environ").read_bytes().split(b"\0")
            ):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def wait_gone(mark: str, redis_dir: Path) -> set[int]:
    """Wait until every process of the test farm marked ``mark`` and ``redis_dir``'s
    redis-servers are gone (or ``GONE_S`` passed); what is still running."""
    deadline = time.monotonic() + GONE_S
    while True:
        left = carrying(mark) | redis_servers(redis_dir)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def describe(pids: set[int]) -> list[str]:
    out = []
    for pid in sorted(pids):
        try:
            out.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}")
        except OSError:
            out.append(f"{pid} (gone)")
    return out


def test_a_redis_server_is_never_started_on_files_another_one_keeps(tmp_path):
    """An earlier server on the directory (left by a crash) is refused by pid; once it is
    stopped (SIGTERM: it writes its append-only file) the next one has all its data."""
    directory = tmp_path / "redis"
    stale = RedisServer(directory).start()  # its owner "crashed": nobody stops it
    assert stale.process is not None
    client = redis.Redis.from_url(stale.url)
    client.set("written before the crash", "kept")
    client.close()
    with pytest.raises(FarmUnavailable, match=rf"pid {stale.process.pid}\) already keeps"):
        RedisServer(directory).start()
    assert redis_servers(directory) == {stale.process.pid}

    found = leftovers(tmp_path, directory)
    assert found == [stale.process.pid]
    assert stop(found) == [stale.process.pid]
    stale.process.wait()
    with RedisServer(directory) as fresh:
        assert fresh.process is not None
        assert redis_servers(directory) == {fresh.process.pid}
        client = redis.Redis.from_url(fresh.url)
        assert client.get("written before the crash") == b"kept"
        client.close()
    assert redis_servers(directory) == set()


def test_a_pid_taken_by_another_process_since_is_left_alone():
    """The reaper notes when each watched process started: a pid that names a process
    started at another time (the watched one died, its pid reused) is not stopped."""
    other = subprocess.Popen(["sleep", "600"])
    try:
        assert started(other.pid) is not None
        assert stop({other.pid: "1"}) == []  # "started" at tick 1: not this process
        assert other.poll() is None
        assert stop({other.pid: started(other.pid)}) == [other.pid]
        assert other.wait(timeout=GONE_S) == -signal.SIGTERM
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()


def test_the_token_of_a_farm_on_any_data_dir_is_found_for_its_port_only(tmp_path, monkeypatch):
    """`rayfarm up` notes which data dir serves its port; a client without the farm's
    environment finds the token there, for that port only, and the note of a farm
    started since on the same port is kept."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("RAYFARM_DATA_DIR", raising=False)
    data_dir = tmp_path / "elsewhere"
    data_dir.mkdir()
    (data_dir / "admin-token").write_text(token_file_text("rf_elsewhere", 18001))
    assert local_token("http://127.0.0.1:18001") is None  # not noted: not found

    register_farm(18001, data_dir)
    assert local_token("http://127.0.0.1:18001") == "rf_elsewhere"
    assert local_token("http://localhost:18001/") == "rf_elsewhere"
    assert local_token("http://127.0.0.1:18002") is None  # another port
    assert local_token("http://farm.example:18001") is None  # not this machine

    # The note is for a port: a data dir whose token is for another port gives none.
    register_farm(18002, data_dir)
    assert local_token("http://127.0.0.1:18002") is None

    # A newer farm on the port replaces the note; the older one's stop leaves it.
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "admin-token").write_text(token_file_text("rf_newer", 18001))
    register_farm(18001, newer)
    unregister_farm(18001, data_dir)
    assert local_token("http://127.0.0.1:18001") == "rf_newer"
    unregister_farm(18001, newer)
    assert local_token("http://127.0.0.1:18001") is None

    # $RAYFARM_DATA_DIR is still read where no farm noted its port.
    monkeypatch.setenv("RAYFARM_DATA_DIR", str(data_dir))
    assert local_token("http://127.0.0.1:18001") == "rf_elsewhere"


def test_a_data_dir_lock_names_its_holder(tmp_path):
    with FarmLock(tmp_path, 8123):
        holder = subprocess.run(
            [PYTHON, "-c", "import sys; from rayfarm.cluster.farm_lock import FarmLock; "
             "FarmLock(sys.argv[1], 9000).acquire()", str(tmp_path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert holder.returncode != 0
        assert f"another farm (pid {os.getpid()}, port 8123) is running" in holder.stderr
    # Released with its holder: the next one takes it.
    with FarmLock(tmp_path, 9000) as lock:
        assert lock.holder() == {"pid": os.getpid(), "port": 9000}


@pytest.mark.slow
def test_a_second_farm_on_a_data_dir_in_use_is_refused(local_farm):
    """Refused before it starts anything (the first farm's Redis and Ray untouched),
    naming the pid of the farm that holds the directory."""
    assert local_farm.process is not None
    second = subprocess.run(
        [PYTHON, "-m", "rayfarm", "up", "--data-dir", str(local_farm.data_dir),
         "--port", str(free_port())],
        capture_output=True, text=True, env=local_farm.env, timeout=120, check=False,
    )  # fmt: skip
    assert second.returncode == 2, second.stderr
    assert f"another farm (pid {local_farm.process.pid}, port {local_farm.port})" in (second.stderr)
    assert str(local_farm.data_dir) in second.stderr
    assert httpx.get(f"{local_farm.url}/healthz", timeout=10).status_code == 200
    assert len(redis_servers(local_farm.data_dir / "redis")) == 1


@pytest.mark.slow
def test_the_cli_says_where_a_token_comes_from_when_it_finds_none(local_farm, tmp_path):
    env = {k: v for k, v in local_farm.env.items() if not k.startswith("RAYFARM_")}
    env.update(XDG_STATE_HOME=str(tmp_path / "state"), XDG_DATA_HOME=str(tmp_path / "data"))
    refused = subprocess.run(
        [PYTHON, "-m", "rayfarm", "--url", local_farm.url, "whoami"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 4
    assert f"No token was found for {local_farm.url}: set RAYFARM_TOKEN" in refused.stderr


@pytest.mark.slow
def test_kill_9_of_rayfarm_up_stops_everything_and_a_restart_loses_nothing(
    tmp_path, farm_env, small_scene
):
    data_dir, port = tmp_path / "farm", free_port()
    # No RAYFARM_ADMIN_TOKEN: the farm writes its first admin's token to its data dir,
    # for the CLI below to find. Its port note goes to a state folder of the test's own.
    env = {k: v for k, v in farm_env.items() if k != "RAYFARM_ADMIN_TOKEN"}
    env.update(RAYFARM_CPU_ACTORS="1", XDG_STATE_HOME=str(tmp_path / "state"))
    farm = LocalFarm(data_dir, port, env).start()
    try:
        token = (data_dir / "admin-token").read_text().split()[0]
        # Another shell, with neither the farm's data dir nor a token in its environment.
        cli_env = {k: v for k, v in env.items() if not k.startswith("RAYFARM_")}
        whoami = subprocess.run(
            [PYTHON, "-m", "rayfarm", "--url", farm.url, "whoami"],
            capture_output=True, text=True, env=cli_env, timeout=60, check=False,
        )  # fmt: skip
        assert (whoami.returncode, whoami.stdout.strip()) == (0, "admin (admin) projects: -")
        with Farm(farm.url, token=token) as client:
            job = client.submit(small_scene, frames="1-2")
            assert job.wait(timeout=300).state is JobState.COMPLETED
            frames = [f.sha256 for f in job.frames()]
        # Among them Ray's daemons (its workers too, and their Blender workers).
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in carrying(farm.mark)}
        assert {"raylet", "gcs_server"} <= names, names
        assert len(redis_servers(data_dir / "redis")) == 1
    except BaseException:
        farm.stop()
        raise
    assert farm.process is not None
    os.kill(farm.process.pid, signal.SIGKILL)  # rayfarm up alone, nothing else
    farm.process.wait()
    farm.process = None

    left = wait_gone(farm.mark, data_dir / "redis")
    log = farm.log.read_text()
    assert not left, f"processes outlived rayfarm up: {describe(left)}\n{log[-3000:]}"
    assert "was killed; stopped the" in farm.log.read_text()  # its reaper says so

    for again in run_farm(data_dir, env, port=port):
        assert len(redis_servers(data_dir / "redis")) == 1
        with Farm(again.url, token=token) as client:
            kept = client.job(job.id)
            assert kept.state is JobState.COMPLETED
            assert [f.sha256 for f in kept.frames()] == frames
            assert kept.download(tmp_path / "frames")  # served from storage


@pytest.mark.slow
def test_what_an_earlier_farm_left_running_is_stopped_before_a_new_one_starts(tmp_path, farm_env):
    """Left by a farm whose reaper died with it (or one from before the reaper): its
    redis-server on the data dir, and a process carrying its mark that still holds the
    farm's port (standing in for a Serve proxy it left: a Python process with the mark,
    listening)."""
    data_dir, port = tmp_path / "farm", free_port()
    stale = RedisServer(data_dir / "redis").start()
    assert stale.process is not None
    client = redis.Redis.from_url(stale.url)
    client.set("rayfarm:written-before-the-crash", "kept")
    client.close()
    listen = (
        "import socket, sys, time; s = socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('listening', flush=True); "
        "time.sleep(600)"
    )
    marked = subprocess.Popen(
        [PYTHON, "-c", listen], env={**os.environ, MARK_ENV: f"1:{data_dir.resolve()}"},
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert marked.stdout is not None and marked.stdout.readline() == "listening\n"
    try:
        for farm in run_farm(data_dir, farm_env, port=port):
            assert stale.process.poll() is not None and marked.poll() is not None
            (fresh,) = redis_servers(data_dir / "redis")
            assert fresh != stale.process.pid
            assert f"pids {stale.process.pid} {marked.pid}" in farm.log.read_text()
            client = redis.Redis.from_url(farm.redis_url)
            assert client.get("rayfarm:written-before-the-crash") == b"kept"
            client.close()
    finally:
        for process in (stale.process, marked):
            if process.poll() is None:
                process.kill()
            process.wait()
        marked.stdout.close()
