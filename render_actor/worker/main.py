"""The Blender worker process: ``serve`` answers one render actor's requests until it
says ``quit`` or goes away; ``dump-exr`` is a tool for tests and benchmarks.

Started by the actor (``supervisor.WorkerProcess``) with the Blender environment's own
interpreter as ``python -I -c BOOT PACKAGE_DIR serve CONFIG_JSON``: the socket it talks
over is the inherited file descriptor the config names, its stdout and stderr are the
actor's task log. It loads bpy once, turns Python auto-execution off, picks the Cycles
device for the GPUs Ray gave its actor, says hello, and serves.

It never outlives its actor: a watchdog thread exits the process once its parent is
gone (a killed actor cannot say ``quit``), so no orphaned Blender keeps a GPU.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from . import protocol
from .errors import RenderError

__all__ = ["main"]

#: How often the watchdog looks for its parent.
PARENT_CHECK_S = 1.0


def _flush() -> None:
    """Write what Python and Blender's C code buffered for stdout/stderr now, so a task's
    log is whole when its answer goes out."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _watch_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class Server:
    """The request loop over the actor's socket."""

    def __init__(self, sock: socket.socket, config: dict[str, Any]) -> None:
        import bpy  # only here: the worker is the one process that loads Blender

        from .devices import select
        from .session import Session, on_stats

        self.sock = sock
        self.busy = False
        self._last_stats = ""
        bpy.context.preferences.filepaths.use_scripts_auto_execute = False
        prefs = bpy.context.preferences.addons["cycles"].preferences
        device = select(prefs, config.get("gpu_ids") or []).label
        os.makedirs(config["workdir"], exist_ok=True)
        self.session = Session(bpy, int(config["threads"]), device, config["workdir"])
        on_stats(bpy, self._stats)
        self.hello = {
            "kind": "hello",
            "protocol": protocol.PROTOCOL,
            "blender": bpy.app.version_string,
            "python": ".".join(map(str, sys.version_info[:3])),
            "pid": os.getpid(),
            "device": device,
        }

    def _stats(self, line: str) -> None:
        """Cycles' status line: to the actor (progress, the hang watch), and into the
        task's log as the command line's ``blender -b`` prints it, so a log says how far
        a render got (a crashed one's most of all)."""
        if self.busy:
            if line != self._last_stats:
                self._last_stats = line
                print(line, flush=True)
            protocol.send(self.sock, {"kind": "stats", "line": line})

    def serve(self) -> None:
        _flush()
        protocol.send(self.sock, self.hello)
        ops: dict[str, Callable[..., dict[str, Any]]] = {
            "render": self.session.render,
            "tile": self.session.tile,
            "finish": self.session.finish,
            "probe": self.session.probe,
            "preview": self.session.preview,
            "catalogue": self.session.catalogue,
        }
        while True:
            try:
                request = protocol.receive(self.sock)
            except protocol.ProtocolError:
                return  # the actor is gone
            op, args = request.get("op"), dict(request.get("args") or {})
            if op == "quit":
                return
            self.busy = True
            try:
                handler = ops.get(str(op))
                if handler is None:
                    raise RenderError(f"the worker has no operation {op!r}")
                if "task" in args:
                    from .session import Task

                    args["task"] = Task.from_message(args["task"])
                answer: dict[str, Any] = {"kind": "done", "value": handler(**args)}
            except RenderError as exc:
                answer = {"kind": "error", "type": exc.kind, "message": exc.message,
                          "detail": exc.detail}  # fmt: skip
            except Exception as exc:
                traceback.print_exc()
                answer = {"kind": "error", "type": "RenderError",
                          "message": f"{type(exc).__name__}: {exc}", "detail": {}}  # fmt: skip
            finally:
                self.busy = False
            _flush()
            protocol.send(self.sock, answer)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args else ""
    if command == "serve":
        config = json.loads(args[0])
        if config.get("cores"):
            # Before any thread starts (bpy's, the watchdog): each inherits these cores,
            # and Blender sizes its thread pool from them when it loads.
            os.sched_setaffinity(0, config["cores"])
        _watch_parent(int(config["parent"]))
        # Cancel and the hang watch stop a render with SIGTERM: die at once, as by default
        # (in case anything imported on the way installed a handler).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sock = socket.socket(fileno=int(config["fd"]))
        try:
            Server(sock, config).serve()
        finally:
            _flush()
        return 0
    if command == "dump-exr":
        from .exr import dump

        dump(*args)
        return 0
    print("usage: serve CONFIG_JSON | dump-exr IN.exr OUT.npz", file=sys.stderr)
    return 2
