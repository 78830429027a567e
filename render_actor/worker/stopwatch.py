"""Where a request's time goes, step by step (standard library only).

Each render step (open the scene, render, write the result, ...) is timed with one
``Stopwatch`` and its laps travel back with the answer (``"steps"``), so a job's
events say how long each step of each task took (``bench/overhead.py`` and
``bench/tiles.py`` add them up). Step names end in ``_s``: seconds.
"""

from __future__ import annotations

import time

__all__ = ["Stopwatch"]


class Stopwatch:
    """Laps of one request: ``lap(name)`` adds the time since the previous lap (or the
    start) to step ``name``."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> float:
        """Close the step ``name`` now; return its seconds so far."""
        now = time.perf_counter()
        self.steps[name] = self.steps.get(name, 0.0) + (now - self._last)
        self._last = now
        return self.steps[name]

    def rounded(self) -> dict[str, float]:
        """The steps, to the millisecond (as the job's events keep them)."""
        return {name: round(seconds, 3) for name, seconds in self.steps.items()}
