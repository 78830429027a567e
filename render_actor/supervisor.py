"""The render actor's side of its Blender worker: start it, talk to it, stop it.

A worker is a child process run by a Blender environment's interpreter
(``rayfarm.render.environments``), so the actor's own Python never loads bpy and one
farm runs several Blender versions. Cancel and the hang watch stop the worker alone
(SIGTERM, then SIGKILL): the Ray actor, its GPU and its place in the pool stay, and
the next request starts a fresh worker. A worker that crashes (a bpy segfault or
abort) fails the request it was doing with ``WorkerLost``, naming its signal and
quoting the last lines it printed.

The worker's stdout and stderr (Blender's C code prints there) go to a log file the
actor owns; it is emptied before each request, so its tail is that request's log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from rayfarm.errors import BlenderUnavailable, RenderError, SceneOpenError, WorkerLost
from rayfarm.render.worker import protocol
from rayfarm.render.worker.files import tail

__all__ = ["BOOT", "LOADER", "PACKAGE_DIR", "WorkerProcess", "run_tool"]

#: Where the worker package lives; the worker loads it from here by path.
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker")
#: Python source that imports the worker package from the folder named ``_d`` as
#: ``rayfarm_worker`` (its modules import one another relatively), without the
#: ``rayfarm`` package: what a Blender environment's interpreter runs first.
LOADER = (
    "import importlib.util as _u, sys as _s\n"
    "_spec = _u.spec_from_file_location('rayfarm_worker', _d + '/__init__.py', "
    "submodule_search_locations=[_d])\n"
    "_m = _u.module_from_spec(_spec); _s.modules['rayfarm_worker'] = _m\n"
    "_spec.loader.exec_module(_m)\n"
)
#: The worker's command line: ``python -I -c BOOT PACKAGE_DIR ARGS...`` runs ``main(ARGS)``.
#: ``-I`` keeps the user's site-packages and PYTHONPATH out of it.
BOOT = (
    "import sys\n_d = sys.argv[1]\n"
    + LOADER
    + "from rayfarm_worker.main import main\nsys.exit(main(sys.argv[2:]))\n"
)
#: How long a worker may take to load bpy and say hello.
START_TIMEOUT_S = 300.0
#: How long a stopped worker has between SIGTERM and SIGKILL.
TERM_GRACE_S = 2.0
#: How much of a worker's output a crash report quotes.
CRASH_TAIL_BYTES = 4096
_ERRORS: dict[str, type[RenderError]] = {"RenderError": RenderError,
                                         "SceneOpenError": SceneOpenError}  # fmt: skip


def run_tool(python: str, *args: str, timeout_s: float = 300) -> None:
    """Run the worker's command line (``dump-exr IN OUT``) with ``python``, a Blender
    environment's interpreter."""
    subprocess.run(
        [python, "-I", "-c", BOOT, PACKAGE_DIR, *args],
        check=True, capture_output=True, timeout=timeout_s,
    )  # fmt: skip


class WorkerProcess:
    """One running Blender worker of Blender ``version``."""

    def __init__(
        self,
        version: str,
        python: str,
        workdir: str,
        threads: int,
        cores: list[int],
        gpu_ids: list[Any],
        role: str = "render",
    ) -> None:
        """Start the worker and wait for its hello. It renders with ``threads`` Cycles
        threads pinned to ``cores`` (its actor's share of the node), on the GPUs Ray
        assigned its actor (``gpu_ids``; none: the CPU). ``role`` names a second worker
        of the same version beside the actor's render worker (``"finish"``: the one
        that finishes tiled frames on every core of the node), so their logs and
        scratch folders stay apart."""
        self.version = version
        self.role = role
        self.cores = list(cores)
        self.threads = threads
        name = version if role == "render" else f"{version}-{role}"
        self.log_path = os.path.join(workdir, f"blender-{name}.log")
        self.stopping: str | None = None  # why the actor stopped it (a cancel, a hang)
        self._lock = threading.Lock()  # one request at a time
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        config = {"fd": theirs.fileno(), "parent": os.getpid(), "threads": threads,
                  "cores": cores, "gpu_ids": [str(g) for g in gpu_ids],
                  "workdir": os.path.join(workdir, f"scratch-{name}")}  # fmt: skip
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            self.process = subprocess.Popen(
                [python, "-I", "-c", BOOT, PACKAGE_DIR, "serve", json.dumps(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(theirs.fileno(),),
                close_fds=True,
            )  # fmt: skip
        except OSError as exc:
            ours.close()
            raise BlenderUnavailable(
                f"could not start Blender {version}'s worker with {python}: {exc}"
            ) from None
        finally:
            os.close(log)
            theirs.close()
        self.sock = ours
        self.sock.settimeout(START_TIMEOUT_S)
        try:
            hello = protocol.receive(self.sock)
        except (OSError, protocol.ProtocolError):
            raise self._lost("while starting") from None
        finally:
            self.sock.settimeout(None)
        if hello.get("kind") != "hello" or hello.get("protocol") != protocol.PROTOCOL:
            self.stop("it speaks another protocol")
            raise BlenderUnavailable(
                f"Blender {version}'s worker speaks protocol {hello.get('protocol')!r}, this "
                f"actor {protocol.PROTOCOL}: the node runs mixed rayfarm versions"
            )
        self.blender: str = hello["blender"]
        self.device: str = hello["device"]
        self.pid: int = hello["pid"]
        if not self.blender.startswith(f"{version}."):
            self.stop("wrong Blender")
            raise BlenderUnavailable(
                f"the environment for Blender {version} ({python}) runs Blender {self.blender}"
            )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None and self.stopping is None

    def call(self, op: str, on_stats: Callable[[str], None] | None = None,
             **args: Any) -> Any:  # fmt: skip
        """Run one request and return its value; Cycles' status lines go to
        ``on_stats`` meanwhile. The log is emptied first (its tail is this request's)."""
        with self._lock:
            if not self.alive:
                raise self._lost("before the request")
            os.truncate(self.log_path, 0)
            try:
                protocol.send(self.sock, {"op": op, "args": args})
                while True:
                    message = protocol.receive(self.sock)
                    kind = message.get("kind")
                    if kind == "stats":
                        if on_stats is not None:
                            on_stats(str(message.get("line", "")))
                    elif kind == "done":
                        return message.get("value")
                    elif kind == "error":
                        cls = _ERRORS.get(str(message.get("type")), RenderError)
                        raise cls(str(message.get("message")), dict(message.get("detail") or {}))
                    else:
                        raise protocol.ProtocolError(f"unexpected message {kind!r}")
            except (OSError, protocol.ProtocolError):
                raise self._lost("during the task") from None

    def log(self, limit: int) -> str:
        return tail(self.log_path, limit)

    def stop(self, reason: str) -> None:
        """Stop the worker now: SIGTERM, then SIGKILL after ``TERM_GRACE_S`` (a frozen or
        stubborn Blender); a request in progress fails with ``WorkerLost(reason)``."""
        if self.stopping is None:
            self.stopping = reason
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Ask an idle worker to quit, then make sure it has."""
        if self.process.poll() is None and self.stopping is None:
            try:
                protocol.send(self.sock, {"op": "quit"})
                self.process.wait(TERM_GRACE_S)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.stop("closed")
        self.sock.close()

    def _lost(self, when: str) -> WorkerLost:
        """The error for a worker that went away ``when``: why the actor stopped it, or
        how it died and what it printed last."""
        try:
            code = self.process.wait(TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self.stopping is not None:
            return WorkerLost(self.stopping, {"blender": self.version, "stopped": True})
        how = f"exit status {code}"
        if code < 0:
            try:
                how = f"signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        self.stopping = f"it died ({how})"
        last = self.log(CRASH_TAIL_BYTES).strip()
        return WorkerLost(
            f"the Blender {self.version} worker (pid {self.process.pid}) died {when} "
            f"({how})" + (f"; its last output:\n{last}" if last else ""),
            {"blender": self.version, "exit": code},
        )
