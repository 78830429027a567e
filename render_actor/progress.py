"""Cycles' progress inside a task, reported while the render runs.

Blender calls ``render_stats`` handlers with its status line ("... | Sample 12/64")
as sampling goes; the handler forwards samples done and total to a reporter (the
dispatcher's ``progress`` method), at most once per ``MIN_INTERVAL_S`` per task, so
a farm of many actors adds a few events a second, not thousands.
"""

from __future__ import annotations

import re
import time
from typing import Any

from rayfarm.render.tasks import RenderTask

__all__ = ["MIN_INTERVAL_S", "SampleProgress", "parse_samples"]

#: At most one progress report per task this often (the issue's ~2 events/s/task).
MIN_INTERVAL_S = 0.5
_SAMPLE = re.compile(r"\bSample (\d+)/(\d+)")


def parse_samples(stats: str) -> tuple[int, int] | None:
    """(done, total) from a Cycles status line, or None when it is not sampling."""
    m = _SAMPLE.search(stats)
    return (int(m[1]), int(m[2])) if m else None


class SampleProgress:
    """Installs one persistent ``render_stats`` handler into bpy; ``task`` (set around
    each render) says which task the samples belong to."""

    def __init__(self, bpy: Any, reporter: Any, min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.reporter = reporter
        self.min_interval_s = min_interval_s
        self.task: RenderTask | None = None
        self._last_at = 0.0
        self._last: tuple[int, int] | None = None

        # Persistent: opening a .blend clears every handler not marked so.
        @bpy.app.handlers.persistent
        def on_stats(stats: Any, *_: Any) -> None:
            self.update(str(stats))

        bpy.app.handlers.render_stats.append(on_stats)

    def start(self, task: RenderTask) -> None:
        self.task, self._last, self._last_at = task, None, 0.0

    def stop(self) -> None:
        self.task = None

    def update(self, stats: str) -> None:
        task = self.task
        samples = parse_samples(stats)
        if task is None or samples is None or samples == self._last or self.reporter is None:
            return
        now = time.monotonic()
        if now - self._last_at < self.min_interval_s:
            return
        self._last, self._last_at = samples, now
        try:
            self.reporter.progress.remote(task.job_id, task.frame, task.tile, *samples)
        except Exception:
            self.reporter = None  # the dispatcher is gone; the render goes on without reports
