"""Cycles' progress inside a task, reported while the render runs.

Blender calls ``render_stats`` handlers with its status line ("... | Sample 12/64")
as sampling goes; the worker's handler sends each line to its actor, and
``SampleProgress.update`` forwards samples done and total to a reporter (the
dispatcher's ``progress`` method), at most once per ``MIN_INTERVAL_S`` per task, so
a farm of many actors adds a few events a second, not thousands. Status lines that
are not a new sample count (scene sync, BVH, kernels) reach the dispatcher's
``alive`` at most once per ``ALIVE_INTERVAL_S``: no event, only a sign for its hang
watch that the render goes on. While sampling, Cycles in background mode (bpy, the
command line) updates its status only about every 30 s (it renders samples in
chunks that keep the device busy), so the hang timeout must be well above that.
"""

from __future__ import annotations

import re
import time
from typing import Any

from rayfarm.render.tasks import RenderTask

__all__ = ["ALIVE_INTERVAL_S", "MIN_INTERVAL_S", "SampleProgress", "parse_samples"]

#: At most one progress report per task this often (the issue's ~2 events/s/task).
MIN_INTERVAL_S = 0.5
#: At most one sign of life per task this often while Cycles works without sampling
#: (the dispatcher's hang watch, ``RAYFARM_HANG_TIMEOUT_S``, counts from the last one).
ALIVE_INTERVAL_S = 5.0
_SAMPLE = re.compile(r"\bSample (\d+)/(\d+)")


def parse_samples(stats: str) -> tuple[int, int] | None:
    """(done, total) from a Cycles status line, or None when it is not sampling."""
    m = _SAMPLE.search(stats)
    return (int(m[1]), int(m[2])) if m else None


class SampleProgress:
    """Turns a worker's status lines into reports; ``task`` (set around each render)
    says which task the samples belong to."""

    def __init__(self, reporter: Any, min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.reporter = reporter
        self.min_interval_s = min_interval_s
        self.task: RenderTask | None = None
        self._last_at = self._alive_at = 0.0
        self._last: tuple[int, int] | None = None

    def start(self, task: RenderTask) -> None:
        self.task, self._last, self._last_at, self._alive_at = task, None, 0.0, 0.0

    def stop(self) -> None:
        self.task = None

    def update(self, stats: str) -> None:
        task = self.task
        if task is None or self.reporter is None:
            return
        samples = parse_samples(stats)
        now = time.monotonic()
        try:
            new = samples is not None and samples != self._last
            if new and now - self._last_at >= self.min_interval_s:
                assert samples is not None
                self._last, self._last_at = samples, now
                self._alive_at = now
                self.reporter.progress.remote(
                    task.job_id, task.frame, task.tile, *samples, task.slice
                )
                return
            if now - self._alive_at >= ALIVE_INTERVAL_S:
                # Not sampling (syncing the scene, building the BVH, loading kernels), or
                # a report too soon after the last: no event, a sign for the hang watch.
                self._alive_at = now
                self.reporter.alive.remote(task.job_id, task.frame, task.tile, task.slice)
        except Exception:
            self.reporter = None  # the dispatcher is gone; the render goes on without reports
