"""What a farm leaves behind when ``rayfarm up`` dies without stopping it.

``rayfarm up`` stops what it started when it is stopped (Ctrl-C, SIGTERM). Killed
(``kill -9``, the OOM killer, a closed terminal's SIGHUP), it cannot: Ray's daemons
follow their driver only partly (its dashboard and runtime-env agents lived on, seen),
and redis-server runs in a session of its own on purpose (a Ctrl-C must not stop Redis
before the farm has drained), so nothing stops it. Two guards:

- **The reaper**, a small process ``rayfarm up`` starts first, in a session of its own,
  reading a pipe only ``rayfarm up`` writes to. When the pipe closes (``rayfarm up``
  exited, however) it stops every process of that farm still running: those carrying
  the farm's mark in their environment (``MARK_ENV``, set before anything starts and
  inherited by Ray's daemons and workers, Serve's HAProxy and the Blender workers) and
  the pids ``rayfarm up`` told it (redis-server, which overwrites its environment).
- **The sweep** (``leftovers``): a farm starting on a data directory first stops what an
  earlier farm on it left running (its reaper killed too, or a farm from before the
  reaper): processes marked for that directory and redis-servers keeping their data
  there. It runs under the directory's lock (``farm_lock``), so none of them belongs
  to a live farm.

Processes are found in Linux's /proc; elsewhere neither guard finds anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from rayfarm.cluster.redis_server import PROC, servers_in

__all__ = ["MARK_ENV", "Reaper", "leftovers", "stop"]

#: The environment variable marking a farm's processes: ``<pid of rayfarm up>:<data dir>``.
MARK_ENV = "RAYFARM_UP"
#: How long a process is given to exit on SIGTERM (Redis writes its AOF) before SIGKILL.
GRACE_S = 10.0
#: The same for marked processes (Ray's daemons and workers, Blender workers): they keep
#: nothing that a SIGKILL would lose, and a slow exit only keeps their GPU busy.
MARKED_GRACE_S = 3.0
#: How long the reaper keeps looking for marked processes; it ends sooner once a look,
#: a moment after the last process it stopped, finds none.
REAP_S = 120.0
#: The pause between two looks: a process being started as the others were stopped (an
#: agent or a worker its raylet was starting) shows up by the next one.
SETTLE_S = 1.0
#: What ``rayfarm up`` writes to its reaper: a pid to stop with it, and a clean exit.
WATCH, CLEAN = "pid", "clean"


def _marks() -> Iterable[tuple[int, str]]:
    """(pid, mark) of every process of this user carrying a farm's mark."""
    prefix = f"{MARK_ENV}=".encode()
    try:
        entries = list(PROC.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(prefix):
                yield int(entry.name), item[len(prefix) :].decode(errors="replace")
                break


def _name(pid: int) -> str | None:
    """The process's name (its title, for Ray's: ``ray::DashboardAgent``), for the log."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return None
    return argv.decode(errors="replace")[:60] or None


def started(pid: int) -> str | None:
    """When ``pid`` started (``/proc/PID/stat``'s 22nd field, clock ticks since boot): with
    the pid, what tells a process from a later one given the same pid. None when it does not
    run (a zombie, dead but not yet reaped, included)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] == "Z" else fields[19]


def stop(pids: Iterable[int] | dict[int, str | None], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM each of ``pids`` that runs, SIGKILL those still running after ``grace_s``; a
    pid that another process has taken since is left alone (``pids`` may map each to when
    it started). The pids that were running."""
    known = pids if isinstance(pids, dict) else dict.fromkeys(pids)
    running = {}
    for pid, when in known.items():
        now = started(pid)
        if now is not None and when in (None, now):
            running[pid] = now

    def alive(pid: int) -> bool:
        return started(pid) == running[pid]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 0)
        for pid in filter(alive, running):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        while any(map(alive, running)) and time.monotonic() < deadline:
            time.sleep(0.1)
    return list(running)


def _data_dir(mark: str) -> str:
    return mark.partition(":")[2]


def leftovers(data_dir: str | Path, redis_dir: str | Path) -> list[int]:
    """Processes an earlier farm on ``data_dir`` left running: those marked for it, and
    redis-servers keeping their data in ``redis_dir``."""
    wanted = str(Path(data_dir).resolve())
    marked = [pid for pid, mark in _marks() if _data_dir(mark) == wanted]
    return [*servers_in(redis_dir), *marked]


class Reaper:
    """``rayfarm up``'s side of the reaper: starts it, marks the processes started from
    here on (``MARK_ENV`` in this process's environment, inherited), and tells it the
    pids it must stop that carry no mark (``watch``). ``close`` ends it: the farm
    stopped cleanly, it stops what lingers, quietly."""

    def __init__(self, data_dir: str | Path) -> None:
        self.mark = f"{os.getpid()}:{Path(data_dir).resolve()}"
        read, self._pipe = os.pipe()  # neither end is inherited by later children
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rayfarm.cluster.reaper", self.mark],
                stdin=read,
                # Its own session: the terminal's Ctrl-C and hangup, and a kill of this
                # process group, leave it to do its work.
                start_new_session=True,
            )
        finally:
            os.close(read)
        os.environ[MARK_ENV] = self.mark

    def watch(self, pid: int) -> None:
        """Stop ``pid`` too when ``rayfarm up`` dies."""
        self._tell(f"{WATCH} {pid}")

    def _tell(self, line: str) -> None:
        try:
            os.write(self._pipe, f"{line}\n".encode())
        except OSError:
            pass  # the reaper is gone (killed): a farm starting later sweeps instead

    def close(self) -> None:
        if os.environ.get(MARK_ENV) == self.mark:
            del os.environ[MARK_ENV]
        self._tell(CLEAN)
        os.close(self._pipe)
        self.process.wait()

    def __enter__(self) -> Reaper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reap(mark: str, lines: Iterable[str], say: Callable[[str], None]) -> list[int]:
    """The reaper's work: read ``lines`` (from ``rayfarm up``) to their end, then stop
    every process carrying ``mark`` and every pid it was told to watch (the one that had
    the pid then: each is noted with when it started)."""
    watched: dict[int, str | None] = {}
    clean = False
    for line in lines:
        kind, _, value = line.strip().partition(" ")
        if kind == WATCH and value.isdigit() and (when := started(int(value))):
            watched[int(value)] = when
        clean = kind == CLEAN
    names = {pid: _name(pid) for pid in watched}
    stopped = stop(watched)
    # Look again until a look finds none: a process being started as the others were
    # stopped (a Ray worker or agent its raylet was starting) is found by a later look.
    deadline = time.monotonic() + REAP_S
    while time.monotonic() < deadline:
        marked = [pid for pid, m in _marks() if m == mark]
        names.update((pid, _name(pid)) for pid in marked)
        found = stop(marked, MARKED_GRACE_S)
        stopped += found
        if not found:
            if clean:  # rayfarm up stopped its farm: what it left was found by now
                break
            time.sleep(SETTLE_S)
            if not any(m == mark for _, m in _marks()):
                break
    if stopped and not clean:
        say(
            f"rayfarm: the farm (pid {mark.partition(':')[0]}) was killed; stopped the "
            f"{len(stopped)} process(es) it left running: "
            + " ".join(f"{pid} ({names.get(pid) or '?'})" for pid in stopped)
        )
    return stopped


def main() -> None:
    """``python -m rayfarm.cluster.reaper MARK``, started by ``Reaper``."""
    reap(sys.argv[1], sys.stdin, lambda line: print(line, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
