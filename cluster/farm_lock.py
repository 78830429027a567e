"""One farm per data directory: ``rayfarm up`` holds an exclusive lock on
``<data dir>/farm.lock`` for as long as it runs.

Two farms on one data directory would run two redis-servers on one append-only file
(each rewrites it without the other's writes: data lost) and share one storage folder.
The lock is an ``flock`` on an open file, so the kernel releases it when its holder
dies, however it dies (``kill -9`` included): no stale lock is ever left to clear by
hand. The file names the holder (``pid=``, ``port=``) for the error a second farm
gets; a process only ever reads it while the lock is held by someone else.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from rayfarm.errors import InvalidRequest

__all__ = ["LOCK_FILE", "FarmLock"]

LOCK_FILE = "farm.lock"


class FarmLock:
    """The lock on ``data_dir``, taken by ``acquire`` (or ``with``) for the farm on
    ``port``; an ``InvalidRequest`` naming the holder's pid when another farm has it."""

    def __init__(self, data_dir: str | Path, port: int) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILE
        self.port = port
        self.fd: int | None = None

    def holder(self) -> dict[str, int]:
        """What the lock file says of the farm that holds (or last held) it."""
        try:
            text = self.path.read_text()
        except OSError:
            return {}
        fields = {}
        for line in text.splitlines():
            name, _, value = line.partition("=")
            if value.strip().isdigit():
                fields[name.strip()] = int(value)
        return fields

    def acquire(self) -> FarmLock:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Not inherited by any process the farm starts (Python's descriptors are
        # close-on-exec): the lock lives and dies with this process alone.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            who = f"pid {holder['pid']}" if "pid" in holder else "another process"
            port = f", port {holder['port']}" if "port" in holder else ""
            raise InvalidRequest(
                f"another farm ({who}{port}) is running on the data directory "
                f"{self.data_dir}: stop it first, or give this one its own --data-dir",
                {"data_dir": str(self.data_dir), **holder},
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()}\nport={self.port}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def __enter__(self) -> FarmLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
