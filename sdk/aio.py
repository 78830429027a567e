"""The SDK for asyncio: ``AsyncFarm`` and ``AsyncJob`` mirror ``Farm`` and ``Job``
with coroutines, so a service can watch many jobs on one event loop.

>>> async with rayfarm.AsyncFarm() as farm:                     # doctest: +SKIP
...     job = await farm.submit("shot.blend", frames="1-8", tiles="2x2")
...     async for event in job.events():
...         print(event.kind)
...     await job.download("renders/")

Status, waiting, events, cancel and retry are native coroutines over one
``httpx.AsyncClient``. Packing and uploading a scene, downloading frames and
decoding an image for ``show`` are disk-bound work that the sync client already
does carefully (hashing, resume, verification); they run it in a worker thread
(``asyncio.to_thread``) instead of repeating it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from pydantic import PrivateAttr

from rayfarm.client import (
    DEFAULT_URL,
    LONG_POLL_S,
    RECONNECT_FOR_S,
    RECONNECT_S,
    STREAM_READ_TIMEOUT_S,
    Farm,
    Outage,
)
from rayfarm.errors import FarmUnavailable, ServerError, error_from_body
from rayfarm.events import END, Event, SSEParser, parse_event
from rayfarm.models import FROM_FARM, FrameInfo, Job, JobRecord, JobState, JobStatus
from rayfarm.paths import local_token
from rayfarm.progress import ProgressBar

__all__ = ["AsyncFarm", "AsyncJob"]


class AsyncJob(JobRecord):
    """A job bound to an ``AsyncFarm``; the coroutine twin of ``Job``."""

    _farm: AsyncFarm | None = PrivateAttr(default=None)

    def _bound(self) -> AsyncFarm:
        if self._farm is None:
            raise RuntimeError("this AsyncJob is not bound to a farm; use AsyncFarm.job(id)")
        return self._farm

    def _update(self, other: JobRecord) -> AsyncJob:
        for name in JobRecord.model_fields:
            setattr(self, name, getattr(other, name))
        return self

    async def refresh(self) -> AsyncJob:
        return self._update(await self._bound()._get_json(f"/jobs/{self.id}", JobRecord))

    async def status(self, after: str | None = None, wait_s: float = 0) -> JobStatus:
        """As ``Job.status``: the compact status, optionally long-polled."""
        params: dict[str, Any] = {}
        if after is not None and wait_s > 0:
            params = {"after": after, "wait_s": round(wait_s, 3)}
        status = await self._bound()._get_json(f"/jobs/{self.id}/status", JobStatus, params)
        self.state, self.error = status.state, status.error
        self.frames_done, self.tasks_done = status.frames_done, status.tasks_done
        return status

    async def wait(self, timeout: float | None = None, *, progress: bool = False) -> JobStatus:
        """As ``Job.wait``: until COMPLETED, FAILED or CANCELLED (``TimeoutError`` after
        ``timeout`` s); ``progress`` shows the live bar."""
        async with asyncio.timeout(timeout):
            if progress:
                bar, status = ProgressBar(self), None
                try:
                    async for event in self.events():
                        bar.update(event)
                    status = await self.status()
                    return status
                finally:
                    bar.close(status)
            outage, got = Outage(), None
            while got is None or not got.state.is_terminal:
                try:
                    if got is None:
                        got = await self.status()
                    elif got.event is None:
                        await asyncio.sleep(0.2)
                        got = await self.status()
                    else:
                        got = await self.status(after=got.event, wait_s=LONG_POLL_S)
                except Outage.TRANSIENT as exc:
                    outage.failed(exc)
                    await asyncio.sleep(RECONNECT_S)
                    continue
                outage.ended()
            return got

    async def events(self, after: str | None = None) -> AsyncIterator[Event]:
        """As ``Job.events``: typed events, live, resumed after a dropped connection."""
        async for event in self._bound()._events(self.id, after):
            if event is not None:
                yield event

    async def logs(self, task: str | None = None) -> str:
        url = f"/jobs/{self.id}/logs" if task is None else f"/jobs/{self.id}/tasks/{task}/log"
        async with self._bound()._request("GET", url) as r:
            return r.text

    async def cancel(self) -> AsyncJob:
        return self._update(await self._bound()._post_json(f"/jobs/{self.id}/cancel"))

    async def retry(self) -> AsyncJob:
        return self._update(await self._bound()._post_json(f"/jobs/{self.id}/retry"))

    async def delete(self) -> dict[str, Any]:
        """As ``Job.delete``: delete a finished job and what only it used; returns what
        it freed."""
        async with self._bound()._request("DELETE", f"/jobs/{self.id}") as r:
            freed: dict[str, Any] = r.json()
            return freed

    async def frames(self) -> list[FrameInfo]:
        async with self._bound()._request("GET", f"/jobs/{self.id}/frames") as r:
            return [FrameInfo.model_validate(f) for f in r.json()["frames"]]

    async def download(self, directory: str | os.PathLike[str]) -> list[Path]:
        """As ``Job.download`` (verified, resumable), in a worker thread."""
        farm = self._bound()
        return await asyncio.to_thread(farm._sync()._download, farm._as_job(self), directory)

    async def image(self, frame: int) -> Any:
        """As ``Job.image``, in a worker thread."""
        farm = self._bound()
        return await asyncio.to_thread(farm._sync()._image, farm._as_job(self), frame)

    async def show(self, frame: int) -> Any:
        """As ``Job.show``, in a worker thread."""
        farm = self._bound()
        return await asyncio.to_thread(farm._sync()._show, farm._as_job(self), frame)


class AsyncFarm:
    """A connection to a rayfarm service for asyncio code; see ``Farm`` for the
    arguments."""

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout_s: float = 60.0
    ) -> None:
        self.url = (url or os.environ.get("RAYFARM_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("RAYFARM_TOKEN")
        if self.token is None:
            self.token = local_token(self.url)
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, headers=headers)
        self._farm: Farm | None = None

    def __repr__(self) -> str:
        return f"AsyncFarm({self.url!r})"

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._farm is not None:
            self._farm.close()

    async def __aenter__(self) -> AsyncFarm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- public API ---------------------------------------------------------------------

    async def submit(
        self,
        path: str | os.PathLike[str],
        frames: str | int,
        tiles: int | str = 1,
        *,
        root: str | os.PathLike[str] | None = None,
        **overrides: Any,
    ) -> AsyncJob:
        """As ``Farm.submit``: pack, upload what the farm lacks (in a worker thread) and
        queue the job."""
        sync = self._sync()
        job = await asyncio.to_thread(sync.submit, path, frames, tiles, root=root, **overrides)
        return self._bind(AsyncJob.model_validate(job.model_dump()))

    async def inspect(
        self, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
    ) -> dict[str, Any]:
        """As ``Farm.inspect``, in a worker thread."""
        return await asyncio.to_thread(self._sync().inspect, path, root)

    async def job(self, job_id: str) -> AsyncJob:
        return self._bind(await self._get_json(f"/jobs/{job_id}", AsyncJob))

    async def jobs(self, state: JobState | str | None = None, limit: int = 100) -> list[AsyncJob]:
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = str(JobState(state))
        async with self._request("GET", "/jobs", params=params) as r:
            return [
                self._bind(AsyncJob.model_validate(j, context=FROM_FARM)) for j in r.json()["jobs"]
            ]

    async def health(self) -> dict[str, Any]:
        async with self._request("GET", "/healthz") as r:
            body: dict[str, Any] = r.json()
            return body

    # -- plumbing -------------------------------------------------------------------------

    def _sync(self) -> Farm:
        """The sync client that does the disk-bound work in worker threads."""
        if self._farm is None:
            self._farm = Farm(self.url, self.token, self.timeout_s)
        return self._farm

    def _as_job(self, job: AsyncJob) -> Job:
        return self._sync()._bind(Job.model_validate(job.model_dump()))

    def _bind(self, job: AsyncJob) -> AsyncJob:
        job._farm = self
        return job

    async def _get_json(self, path: str, model: Any, params: Any = None) -> Any:
        async with self._request("GET", path, params=params) as r:
            return model.model_validate(r.json(), context=FROM_FARM)

    async def _post_json(self, path: str) -> JobRecord:
        async with self._request("POST", path) as r:
            return JobRecord.model_validate(r.json(), context=FROM_FARM)

    async def _events(
        self, job_id: str, after: str | None = None, give_up_s: float = RECONNECT_FOR_S
    ) -> AsyncIterator[Event | None]:
        """As ``Farm._events``."""
        last, outage = after, Outage(give_up_s)
        timeout = httpx.Timeout(self.timeout_s, read=STREAM_READ_TIMEOUT_S)
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = last
            try:
                async with self._request(
                    "GET", f"/jobs/{job_id}/events", stream=True, headers=headers,
                    timeout=timeout,
                ) as r:  # fmt: skip
                    parser = SSEParser()
                    async for line in r.aiter_lines():
                        for message in parser.feed(line):
                            if message is None:
                                yield None
                            elif message.event == END:
                                return
                            else:
                                event = parse_event(message.payload())
                                last = event.id
                                outage.ended()
                                yield event
            except Outage.TRANSIENT as exc:
                outage.failed(exc)
            await asyncio.sleep(RECONNECT_S)

    def _request(self, method: str, path: str, stream: bool = False, **kwargs: Any) -> Any:
        return _Request(self, method, path, stream, kwargs)


class _Request:
    """``async with farm._request(...) as response``: the farm's errors as typed
    exceptions, as ``Farm._request`` does for the sync client."""

    def __init__(
        self, farm: AsyncFarm, method: str, path: str, stream: bool, kwargs: dict[str, Any]
    ) -> None:
        self.farm, self.method, self.path, self.stream, self.kwargs = (
            farm, method, path, stream, kwargs
        )  # fmt: skip
        self.response: httpx.Response | None = None

    async def __aenter__(self) -> httpx.Response:
        http = self.farm._http
        try:
            request = http.build_request(self.method, self.path, **self.kwargs)
            self.response = response = await http.send(request, stream=self.stream)
        except httpx.TransportError as exc:
            raise FarmUnavailable(
                f"cannot reach the farm at {self.farm.url}: {exc}", {"url": self.farm.url}
            ) from exc
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            try:
                body = response.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                body = response.text
            raise error_from_body(response.status_code, body)
        return response

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.response is not None:
            await self.response.aclose()
        if isinstance(exc, httpx.HTTPError):
            raise ServerError(f"{self.method} {self.path} failed: {exc}") from exc
