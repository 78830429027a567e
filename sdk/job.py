"""Handles on a job: ``Job`` (from a ``Farm``) and ``AsyncJob`` (from an ``AsyncFarm``).

Each is the farm's ``JobRecord`` plus methods that talk to the farm that returned
it. The requests they make and what the answers mean are ``rayfarm.protocol``'s;
the farm a handle is bound to only sends them (``Farm._call`` or ``AsyncFarm._call``),
so the two handles differ in little but ``await``.

>>> job = farm.submit("shot.blend", frames="1-8")   # doctest: +SKIP
>>> job.wait(progress=True).state                   # doctest: +SKIP
<JobState.COMPLETED: 'COMPLETED'>
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from pydantic import PrivateAttr

from rayfarm import protocol
from rayfarm.models import JobRecord

if TYPE_CHECKING:
    import os
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

    from rayfarm.aio import AsyncFarm
    from rayfarm.client import Farm
    from rayfarm.events import Event
    from rayfarm.models import FrameInfo, JobStatus

__all__ = ["AsyncJob", "Job"]


class _Handle(JobRecord):
    """What both handles share: keeping their record's fields current."""

    def _take(self, other: JobRecord) -> Self:
        for name in JobRecord.model_fields:
            setattr(self, name, getattr(other, name))
        return self


class Job(_Handle):
    """A job as the farm knows it.

    Returned by ``Farm.submit`` and ``Farm.job``; its methods talk to the farm
    that returned it:

    >>> job = farm.submit("shot.blend", frames="1-8")   # doctest: +SKIP
    >>> job.wait(progress=True).state                   # doctest: +SKIP
    <JobState.COMPLETED: 'COMPLETED'>
    """

    _farm: Farm | None = PrivateAttr(default=None)

    def _bound(self) -> Farm:
        if self._farm is None:
            raise RuntimeError("this Job is not bound to a Farm; get it from Farm.job(id)")
        return self._farm

    def refresh(self) -> Job:
        """Fetch the job again and update this object in place."""
        return self._take(self._bound()._call(protocol.get_job(self.id)))

    def status(self, after: str | None = None, wait_s: float = 0) -> JobStatus:
        """The compact status (state, frames and tasks done, error, newest event id).

        With ``after`` (the ``event`` of an earlier status) and ``wait_s``, the farm
        answers as soon as the job changes, or after ``wait_s`` seconds (a long-poll).
        """
        status = self._bound()._call(protocol.get_status(self.id, after, wait_s))
        return protocol.apply_status(self, status)

    def wait(
        self,
        timeout: float | None = None,
        on_change: Callable[[JobStatus], Any] | None = None,
        *,
        progress: bool = False,
    ) -> JobStatus:
        """Block until the job is COMPLETED, FAILED or CANCELLED; return its status.

        The farm answers as soon as anything changes (a long-poll, not a busy loop);
        ``on_change`` is called with each new status. With ``progress``, a live bar
        (a widget in Jupyter, text in a terminal) shows frames done, the ETA, and the
        samples of the tasks rendering now, from the job's event stream. Raises
        ``TimeoutError`` when ``timeout`` seconds pass first.
        """
        if progress:
            return self._bound()._wait_progress(self, timeout)
        return self._bound()._drive(protocol.waiting(self, timeout, on_change))

    def events(self, after: str | None = None) -> Iterator[Event]:
        """The job's execution log, live: every event so far (or those after the event
        id ``after``), then each new one as it happens, typed (``TaskDone``,
        ``Progress``, ``StateChanged``, ...). Ends after the job's terminal state; a
        dropped connection is resumed where it stopped, nothing lost or repeated.

        >>> for event in job.events():                     # doctest: +SKIP
        ...     print(event.kind, event.model_dump(exclude={"id", "kind"}))
        """
        return (e for e in self._bound()._events(self.id, after) if e is not None)

    def logs(self, task: str | None = None) -> str:
        """The job's execution log as text, one line per event; with ``task``
        (``"f0000012t003"``, as events name it), Blender's own output for that task,
        every attempt."""
        return self._bound()._call(protocol.get_logs(self.id, task))

    def cancel(self) -> Job:
        """Cancel the job (PENDING or PROCESSING); 409 ``InvalidTransition`` otherwise."""
        return self._take(self._bound()._call(protocol.job_action(self.id, "cancel")))

    def retry(self) -> Job:
        """Put a FAILED job back in the queue; only missing frames are rendered again."""
        return self._take(self._bound()._call(protocol.job_action(self.id, "retry")))

    def delete(self) -> dict[str, Any]:
        """Delete the job from the farm: its record and log, frames, outputs, and the
        input files no other job uses. Only a finished job (COMPLETED, FAILED,
        CANCELLED): cancel a running one first (409 ``InvalidTransition`` otherwise).
        Returns what it freed: ``objects`` and ``bytes`` of the job's files, ``blobs``
        and ``blob_bytes`` of its inputs.

        >>> job.cancel(); job.delete()                    # doctest: +SKIP
        """
        freed: dict[str, Any] = self._bound()._call(protocol.delete_job(self.id))
        return freed

    def frames(self) -> list[FrameInfo]:
        """The frames stored so far, with their URLs."""
        return self._bound()._call(protocol.get_frames(self.id))

    def image(self, frame: int) -> Any:
        """Frame ``frame`` as a PIL image: a PNG frame whole; an EXR frame (scene-linear,
        many passes) as its preview, through the scene's view transform; a frame split
        into sample slices that is still rendering, as the merge of the slices landed so
        far (noisier than the finished frame, not yet denoised or composited). Needs
        Pillow (``pip install pillow``)."""
        return self._bound()._image(self, frame)

    def show(self, frame: int) -> Any:
        """Show frame ``frame`` inline in a notebook (IPython), as ``image`` gives it (a
        sliced frame still rendering: its samples so far), and return None there (so
        the cell does not show it twice); elsewhere return the PIL image."""
        return self._bound()._show(self, frame)

    def download(self, directory: str | Path) -> list[Path]:
        """Download every stored frame into ``directory``; return the file paths.

        Each frame is checked against the farm's SHA-256; a frame already there with the
        right hash is not fetched again, and an interrupted download (``NNNN.ext.part``)
        resumes where it stopped.
        """
        return self._bound()._download(self, directory)


class AsyncJob(_Handle):
    """A job bound to an ``AsyncFarm``; the coroutine twin of ``Job``. Disk-bound work
    (``download``, ``image``, ``show``) runs ``Job``'s in a worker thread."""

    _farm: AsyncFarm | None = PrivateAttr(default=None)

    def _bound(self) -> AsyncFarm:
        if self._farm is None:
            raise RuntimeError("this AsyncJob is not bound to a farm; use AsyncFarm.job(id)")
        return self._farm

    async def refresh(self) -> AsyncJob:
        """As ``Job.refresh``."""
        return self._take(await self._bound()._call(protocol.get_job(self.id)))

    async def status(self, after: str | None = None, wait_s: float = 0) -> JobStatus:
        """As ``Job.status``: the compact status, optionally long-polled."""
        got = await self._bound()._call(protocol.get_status(self.id, after, wait_s))
        return protocol.apply_status(self, got)

    async def wait(self, timeout: float | None = None, *, progress: bool = False) -> JobStatus:
        """As ``Job.wait``: until COMPLETED, FAILED or CANCELLED (``TimeoutError`` after
        ``timeout`` s); ``progress`` shows the live bar."""
        return await self._bound()._wait(self, timeout, progress)

    async def events(self, after: str | None = None) -> AsyncIterator[Event]:
        """As ``Job.events``: typed events, live, resumed after a dropped connection."""
        async for event in self._bound()._events(self.id, after):
            if event is not None:
                yield event

    async def logs(self, task: str | None = None) -> str:
        """As ``Job.logs``."""
        return await self._bound()._call(protocol.get_logs(self.id, task))

    async def cancel(self) -> AsyncJob:
        """As ``Job.cancel``."""
        return self._take(await self._bound()._call(protocol.job_action(self.id, "cancel")))

    async def retry(self) -> AsyncJob:
        """As ``Job.retry``."""
        return self._take(await self._bound()._call(protocol.job_action(self.id, "retry")))

    async def delete(self) -> dict[str, Any]:
        """As ``Job.delete``: delete a finished job and what only it used; returns what
        it freed."""
        freed: dict[str, Any] = await self._bound()._call(protocol.delete_job(self.id))
        return freed

    async def frames(self) -> list[FrameInfo]:
        """As ``Job.frames``."""
        return await self._bound()._call(protocol.get_frames(self.id))

    async def download(self, directory: str | os.PathLike[str]) -> list[Path]:
        """As ``Job.download`` (verified, resumable), in a worker thread."""
        paths: list[Path] = await self._bound()._in_thread("_download", self, directory)
        return paths

    async def image(self, frame: int) -> Any:
        """As ``Job.image``, in a worker thread."""
        return await self._bound()._in_thread("_image", self, frame)

    async def show(self, frame: int) -> Any:
        """As ``Job.show``, in a worker thread."""
        return await self._bound()._in_thread("_show", self, frame)
