"""The Blender worker processes of one render actor: its render workers (one per
Blender version, the most recently used kept) and its finisher.

A render worker runs with the actor's share of the node's cores, pinned, and as many
Cycles threads. The finisher is a second worker of the same Blender that may use every
core of the node, with as many threads: an actor pinned to a share of the node
finishes tiled frames there (denoise, compositor; see ``RenderActor.finish``),
because a worker cannot widen itself once bpy has loaded (Blender's thread pool takes
its size from the cores the process had then, and Cycles' persistent session caps it
at the render's threads: measured with bpy 5.0.1, a widened worker still denoised on
one thread). The finisher starts in the background when the actor renders a tile,
and stops when it renders whole frames again, so its memory (the scene it opened) is
held only while frames are being tiled.

Workers start in the background too (``warm``): the thread that starts one keeps its
handle until the worker is up, so a task arriving meanwhile waits for it instead of
starting a second one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from rayfarm.render import environments
from rayfarm.render.supervisor import WorkerProcess

__all__ = ["Workers"]


class Workers:
    """Render workers (``keep`` versions at once) and finishers of one actor."""

    def __init__(
        self,
        workdir: str,
        threads: int,
        cores: list[int],
        node_cores: list[int],
        gpu_ids: list[Any],
        keep: int = 1,
        keep_finishers: int = 1,
    ) -> None:
        """Render workers run ``threads`` threads on ``cores`` (the actor's share);
        finishers run one thread per core of ``node_cores`` (the node's)."""
        self.workdir = workdir
        self.threads = threads
        self.cores = cores
        self.node_cores = node_cores
        self.gpu_ids = gpu_ids
        self.keep = keep
        self.keep_finishers = keep_finishers
        self.render: OrderedDict[str, WorkerProcess] = OrderedDict()  # version -> worker, LRU
        self.finish: OrderedDict[str, WorkerProcess] = OrderedDict()  # the same, finishers
        self.device = ""  # what the last render worker started renders on
        self._warming: dict[str, threading.Thread | None] = {"render": None, "finish": None}

    @property
    def narrow(self) -> bool:
        """Whether the actor renders on fewer cores or threads than the node has (so
        it finishes frames in a finisher)."""
        return self.cores != self.node_cores or self.threads < len(self.node_cores)

    def latest(self, role: str = "render") -> WorkerProcess | None:
        """The most recently used worker of ``role``, or None."""
        self.ready(role)
        workers = self.render if role == "render" else self.finish
        return next(reversed(workers.values()), None)

    def worker(self, version: str | None) -> WorkerProcess:
        """A running render worker of Blender ``version`` (started, and its environment
        built, if need be); the least recently used one goes when there are too many."""
        self.ready("render")
        if version is None:  # a task of a farm that predates versions: the newest here
            version = next(reversed(self.render), None) or environments.DEFAULT_VERSIONS[0]
        worker = self._start(self.render, self.keep, version, self.threads, self.cores, "render")
        self.device = worker.device
        return worker

    def finisher(self, version: str) -> WorkerProcess:
        """A running finisher of Blender ``version``, started if need be."""
        self.ready("finish")
        return self._start(
            self.finish, self.keep_finishers, version, len(self.node_cores), self.node_cores,
            "finish",
        )  # fmt: skip

    def _start(
        self,
        workers: OrderedDict[str, WorkerProcess],
        keep: int,
        version: str,
        threads: int,
        cores: list[int],
        role: str,
    ) -> WorkerProcess:
        worker = workers.get(version)
        if worker is not None and worker.alive:
            workers.move_to_end(version)
            return worker
        _close(workers.pop(version, None))
        env = environments.install(version)
        while len(workers) >= keep:
            _, old = workers.popitem(last=False)
            _close(old)
        worker = WorkerProcess(
            version, str(env.python), self.workdir, threads, cores, self.gpu_ids, role=role
        )
        workers[version] = worker
        return worker

    def warm(self, version: str, role: str = "render") -> None:
        """Start a worker of ``role`` and ``version`` in the background (a finisher only
        where the actor is ``narrow``), unless one is running or starting."""
        if role == "finish" and not self.narrow:
            return
        if self._warming[role] is not None:
            return
        running = (self.render if role == "render" else self.finish).get(version)
        if running is not None and running.alive:
            return
        start = self.worker if role == "render" else self.finisher

        def run() -> None:
            try:
                start(version)
            except Exception:
                pass  # the task that needs it tries again and reports why

        thread = threading.Thread(target=run, name=f"warm-{role}", daemon=True)
        self._warming[role] = thread
        thread.start()

    def ready(self, role: str) -> None:
        """Wait for a worker of ``role`` starting in the background. Not from the
        starting thread itself: it keeps its handle until the worker is up, so that no
        caller meanwhile starts a second one."""
        warming = self._warming[role]
        if warming is not None and warming is not threading.current_thread():
            warming.join()
            self._warming[role] = None

    def drop(self, version: str) -> None:
        """Stop the render worker of ``version`` (it ran a job's own Python)."""
        _close(self.render.pop(version, None))

    def close_finishers(self) -> None:
        """Stop the finishers (each holds a scene in memory)."""
        self.ready("finish")
        while self.finish:
            _close(self.finish.popitem()[1])

    def interrupt(self, reason: str) -> bool:
        """Stop every running worker now (a cancel, a hung render); True if one was."""
        stopped = False
        for worker in [*self.render.values(), *self.finish.values()]:
            if worker.alive:
                worker.stop(reason)
                stopped = True
        return stopped

    def close(self) -> None:
        """Stop them all (the actor goes)."""
        for worker in [*self.render.values(), *self.finish.values()]:
            try:
                worker.close()
            except Exception:
                pass


def _close(worker: WorkerProcess | None) -> None:
    if worker is not None:
        worker.close()
