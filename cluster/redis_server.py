"""A local ``redis-server`` for the embedded default, with AOF in the data dir.

Two servers on one append-only file lose data (each rewrites it without the other's
writes), so a server is never started on a directory another one still keeps its data
in. Such a server is found by that directory, its working directory (redis-server
changes into ``--dir``), not by its port, which changes with every start, nor by its
command line or environment, which it overwrites with its title.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import redis

from rayfarm.cluster.ports import free_port
from rayfarm.errors import FarmUnavailable

__all__ = ["RedisServer", "servers_in"]

START_TIMEOUT_S = 15.0
#: Linux's /proc: where running processes are found (none are found without it).
PROC = Path("/proc")


def servers_in(directory: str | Path) -> list[int]:
    """Pids of the redis-servers running now with their data in ``directory`` (this
    user's: another user's processes cannot be read)."""
    wanted = Path(directory).resolve()
    found = []
    try:
        entries = list(PROC.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "redis-server":
                continue
            # A zombie has no working directory: it keeps no data.
            if Path(os.readlink(entry / "cwd")) == wanted:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


class RedisServer:
    """Start and stop a redis-server on 127.0.0.1 that keeps its data in ``directory``.

    AOF (``appendfsync everysec``) is on, so a restart loses at most a second;
    ``stop()`` shuts down cleanly and loses nothing.
    """

    def __init__(self, directory: str | Path, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FarmUnavailable(
                "redis-server is not on PATH: install it (`make setup` does, or "
                "`apt-get install redis-server`) or point REDIS_URL at a Redis"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        running = servers_in(self.directory)
        if running:
            raise FarmUnavailable(
                f"a redis-server (pid {', '.join(map(str, running))}) already keeps its data "
                f"in {self.directory}: stop it first (two servers on one append-only file "
                "lose data)",
                {"directory": str(self.directory), "pids": running},
            )
        cmd = [
            exe,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        # Its own session: a Ctrl-C in the terminal must not stop Redis before the farm
        # has drained; stop() shuts it down last.
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.exceptions.RedisError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                    raise FarmUnavailable(f"redis-server did not start:\n{log}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis flushes the AOF and exits
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
