"""The live progress bar of ``Job.wait(progress=True)``: tqdm's auto mode, so a
terminal gets a text bar and Jupyter a widget.

The bar counts frames (its ETA follows from the rate frames land at); its postfix
shows the tasks done and the sampling of the tasks rendering now.
"""

from __future__ import annotations

from typing import Any

from rayfarm.events import Event, FrameStored, Progress, StateChanged, TaskDone, TaskFailed
from rayfarm.models import JobState, JobStatus, grid_of

__all__ = ["ProgressBar"]


class ProgressBar:
    """Feed it a job's events (``update``); ``close`` with the final status."""

    def __init__(self, job: Any, **tqdm_options: Any) -> None:
        from tqdm.auto import tqdm

        self.frames_total = job.frames_total
        self.tasks_total = job.tasks_total
        self.frames: set[int] = set()
        self.tasks: set[str] = set()
        self.sampling: dict[str, Progress] = {}
        self.state = job.state
        self.job_id = job.id
        options = {"total": job.frames_total, "unit": "frame", "dynamic_ncols": True}
        self.bar = tqdm(**{**options, **tqdm_options})
        self._describe()

    def update(self, event: Event) -> None:
        if isinstance(event, StateChanged):
            self.state = event.to
            self._describe()
        elif isinstance(event, FrameStored):
            if event.frame not in self.frames:
                self.frames.add(event.frame)
                self.bar.update(1)
        elif isinstance(event, Progress):
            self.sampling[event.task] = event
        elif isinstance(event, TaskDone):
            self.tasks.add(event.task)
            self.sampling.pop(event.task, None)
        elif isinstance(event, TaskFailed):
            self.sampling.pop(event.task, None)
        elif event.kind in ("tiles", "slices") and (tasks := getattr(event, "tasks", None)):
            self.tasks_total = int(tasks)  # what 'auto' chose, in tasks
        elif event.kind == "tiles" and isinstance(tiles := getattr(event, "tiles", None), str):
            nx, ny = grid_of(tiles)  # a farm that did not say the tasks
            self.tasks_total = self.frames_total * nx * ny
        else:
            return
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self.bar.refresh()

    def _describe(self) -> None:
        self.bar.set_description(f"{self.job_id[:8]} {self.state}", refresh=False)

    def _postfix(self) -> str:
        text = f"tasks {len(self.tasks)}/{self.tasks_total}"
        if self.sampling:
            now = sorted(self.sampling.values(), key=lambda p: (p.frame, p.tile))[:3]
            text += " | " + ", ".join(
                f"f{p.frame}" + (f"t{p.tile}" if self.tasks_total > self.frames_total else "")
                + (f"s{p.slice}" if p.slice is not None else "") + f" {p.samples}/{p.of}"
                for p in now
            )  # fmt: skip
        return text

    def close(self, status: JobStatus | None) -> None:
        """Settle the bar on the job's final numbers (the farm's, not the events'), or
        leave it as it is (None: waiting stopped early)."""
        if status is None:
            self.bar.close()
            return
        self.state = status.state
        self._describe()
        self.bar.n = status.frames_done
        self.sampling.clear()
        self.bar.set_postfix_str(
            f"tasks {status.tasks_done}/{status.tasks_total}"
            + (f" | {status.error}" if status.error else ""),
            refresh=False,
        )
        self.bar.refresh()
        self.bar.close()

    @property
    def is_done(self) -> bool:
        return JobState(self.state).is_terminal
