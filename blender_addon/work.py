"""The add-on's background work: each task is a thread that talks to the farm and
posts ``Message``s to one queue, which ``session.drain`` empties on Blender's main
thread within a time budget. Nothing here imports ``bpy`` (it is not thread-safe).
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .comms import Cancelled, FarmClient, FarmError
from .packing import pack_scene

#: Job states in which a job can still change.
ACTIVE_STATES = ("PENDING", "PROCESSING")
#: How often the job list is fetched while someone looks at it or a job is running.
POLL_S = 2.0
#: After the panel was last drawn, keep the list fresh this long.
WATCH_FOR_S = 60.0


@dataclass
class Message:
    task: object  # the Task (or Watcher) that sent it
    kind: str  # progress | report | job | jobs | health | frames | done
    data: dict[str, Any] = field(default_factory=dict)


class Task(threading.Thread):
    """One piece of background work. ``cancel()`` asks it to stop at the next chunk; it
    always ends with a ``done`` message (``data["outcome"]``: ok, error, cancelled)."""

    label = "work"

    def __init__(self, outbox: queue.Queue[Message], client: FarmClient) -> None:
        super().__init__(name=f"rayfarm-{self.label}", daemon=True)
        self.outbox, self.client = outbox, client
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def post(self, kind: str, **data: Any) -> None:
        self.outbox.put(Message(self, kind, data))

    def run(self) -> None:
        outcome = "ok"
        try:
            self.work()
        except Cancelled:
            outcome = "cancelled"
            self.post("report", level="WARNING", text=f"rayfarm: {self.label} cancelled")
        except FarmError as exc:
            outcome = "error"
            self.post("report", level="ERROR", text=str(exc), code=exc.code)
        except Exception as exc:  # a bug of ours: still a report, never a silent thread death
            outcome = "error"
            self.post("report", level="ERROR", text=f"rayfarm {self.label} failed: {exc!r}")
        finally:
            self.cleanup()
            self.post("done", outcome=outcome)

    def work(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass


class Submit(Task):
    """Pack the saved copy ``blend`` (in its own temp folder, removed afterwards),
    upload what the farm lacks, and queue the job."""

    label = "upload"

    def __init__(
        self, outbox: queue.Queue[Message], client: FarmClient, blend: Path, spec: dict[str, Any]
    ) -> None:
        super().__init__(outbox, client)
        self.blend, self.spec = blend, spec

    def work(self) -> None:
        self.post("progress", stage="Packing", fraction=0.0)
        pack = pack_scene(self.blend, bool(self.spec.get("allow_missing")), self.cancelled)
        try:
            self._send(pack)
        finally:
            pack.close()

    def _send(self, pack: Any) -> None:
        unique = {f.sha256: f for f in pack.files}
        self.post("progress", stage="Checking", fraction=0.0)
        missing = self.client.missing(list(unique))
        total = sum(unique[d].size for d in missing) or 1
        sent = 0
        last = 0.0

        def on_bytes(n: int) -> None:
            nonlocal sent, last
            sent += n
            if time.monotonic() - last > 0.1:  # progress at most 10 times a second
                last = time.monotonic()
                self.post("progress", stage="Uploading", fraction=sent / total, sent=sent)

        for digest in missing:
            f = unique[digest]
            self.client.put_blob(digest, f.source, f.size, on_bytes, self.cancelled)
        if self.cancelled.is_set():
            raise Cancelled()
        self.post("progress", stage="Submitting", fraction=1.0)
        files = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in pack.files]
        job = self.client.submit(self.spec, pack.main, files)
        self.post(
            "job",
            job=job,
            files=len(pack.files),
            files_sent=len(missing),
            bytes_sent=sent,
            bytes_total=pack.size,
        )

    def cleanup(self) -> None:
        shutil.rmtree(self.blend.parent, ignore_errors=True)


class Probe(Task):
    """Test connection: the farm's health report, and who the token signs in as."""

    label = "connection test"

    def work(self) -> None:
        health = self.client.health()
        try:
            who: dict[str, Any] = {"user": self.client.whoami()}
        except FarmError as exc:
            if exc.status not in (401, 403):
                raise
            who = {"refused": exc.message}
        self.post("health", health=health, url=self.client.url, **who)


class JobAction(Task):
    """Cancel or retry one job."""

    label = "job action"

    def __init__(
        self, outbox: queue.Queue[Message], client: FarmClient, job_id: str, action: str
    ) -> None:
        super().__init__(outbox, client)
        self.job_id, self.action = job_id, action

    def work(self) -> None:
        self.post("job", job=self.client.action(self.job_id, self.action), action=self.action)


class Download(Task):
    """Fetch a job's stored frames into ``directory``."""

    label = "download"

    def __init__(
        self, outbox: queue.Queue[Message], client: FarmClient, job: dict[str, Any], directory: Path
    ) -> None:
        super().__init__(outbox, client)
        self.job, self.directory = job, directory

    def work(self) -> None:
        frames = self.client.frames(self.job["id"])
        if not frames:
            raise FarmError(f"job {self.job['id']} has no stored frames yet", "no_frames")
        self.directory.mkdir(parents=True, exist_ok=True)
        ext = "exr" if self.job.get("spec", {}).get("format") == "exr" else "png"
        paths = []
        for i, frame in enumerate(frames):
            target = self.directory / f"{int(frame['frame']):04d}.{ext}"
            self.client.download(self.job["id"], frame, target, self.cancelled)
            paths.append(str(target))
            self.post("progress", stage="Downloading", fraction=(i + 1) / len(frames))
        self.post("frames", job_id=self.job["id"], paths=paths)


class Watcher(threading.Thread):
    """Keeps the recent-jobs list fresh: every ``POLL_S`` while the panel has been drawn
    recently (``watch()``) or a listed job is still running; idle otherwise. ``config``
    (url, token) is set from the main thread, which alone may read preferences."""

    def __init__(self, outbox: queue.Queue[Message], limit: int = 10) -> None:
        super().__init__(name="rayfarm-jobs", daemon=True)
        self.outbox, self.limit = outbox, limit
        self.config: tuple[str, str] = ("", "")
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.watch_until = 0.0
        self.has_active = False
        # Jobs submitted from this Blender that have not ended: followed (fetched one by
        # one when the recent list no longer holds them) until they end, however many
        # jobs others submit meanwhile, so their end is always announced.
        self.tracked: set[str] = set()

    def track(self, job_id: str) -> None:
        """Follow ``job_id`` until it ends (called from the main thread)."""
        self.tracked.add(job_id)
        self.refresh()

    def watch(self) -> None:
        """Someone is looking at the list (cheap: no network; the thread fetches)."""
        self.watch_until = time.monotonic() + WATCH_FOR_S

    def refresh(self) -> None:
        self.watch()
        self.wake.set()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()

    def run(self) -> None:
        while not self.stopped.is_set():
            url, token = self.config
            if url and (self.has_active or time.monotonic() < self.watch_until):
                try:
                    client = FarmClient(url, token)
                    jobs = client.jobs(self.limit)
                    jobs += self._tracked_beyond(client, {j["id"] for j in jobs})
                    for job in jobs:
                        if job.get("state") not in ACTIVE_STATES:
                            self.tracked.discard(job["id"])
                    active = any(j.get("state") in ACTIVE_STATES for j in jobs)
                    self.has_active = active or bool(self.tracked)
                    self.outbox.put(Message(self, "jobs", {"jobs": jobs, "url": url}))
                except FarmError as exc:
                    self.outbox.put(Message(self, "jobs", {"error": str(exc), "url": url}))
                except Exception as exc:
                    self.outbox.put(Message(self, "jobs", {"error": repr(exc), "url": url}))
            self.wake.wait(POLL_S)
            self.wake.clear()

    def _tracked_beyond(self, client: FarmClient, listed: set[str]) -> list[dict[str, Any]]:
        """Tracked jobs the recent list left out, fetched one by one (a job gone from the
        farm is no longer followed)."""
        found = []
        for job_id in sorted(self.tracked - listed):
            try:
                found.append(client.job(job_id))
            except FarmError as exc:
                if exc.status == 404:
                    self.tracked.discard(job_id)
        return found
