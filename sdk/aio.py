"""The SDK for asyncio: ``AsyncFarm`` and ``AsyncJob`` mirror ``Farm`` and ``Job``
with coroutines, so a service can watch many jobs on one event loop.

>>> async with rayfarm.AsyncFarm() as farm:                     # doctest: +SKIP
...     job = await farm.submit("shot.blend", frames="1-8", tiles="2x2")
...     async for event in job.events():
...         print(event.kind)
...     await job.download("renders/")

Status, waiting, events, cancel and retry are native coroutines over one
``httpx.AsyncClient``, sending the requests ``rayfarm.protocol`` builds and reading
the answers as it says (the sync ``Farm`` does the same over ``httpx.Client``).
Packing and uploading a scene, downloading frames and decoding an image for
``show`` are disk-bound work that the sync client already does carefully (hashing,
resume, verification); they run it in a worker thread (``asyncio.to_thread``)
instead of repeating it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from rayfarm import protocol
from rayfarm.client import Farm
from rayfarm.errors import FarmError
from rayfarm.events import Event
from rayfarm.job import AsyncJob
from rayfarm.models import JobState, JobStatus
from rayfarm.progress import ProgressBar
from rayfarm.protocol import RECONNECT_FOR_S, RECONNECT_S, Call, EventStream, Outage, Plan, Reply

__all__ = ["AsyncFarm", "AsyncJob"]


class AsyncFarm:
    """A connection to a rayfarm service for asyncio code; see ``Farm`` for the
    arguments."""

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout_s: float = 60.0
    ) -> None:
        self._endpoint = endpoint = protocol.Endpoint.resolve(url, token)
        self.url, self.token, self.timeout_s = endpoint.url, endpoint.token, timeout_s
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout_s, headers=endpoint.headers
        )
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
        self, path: str | os.PathLike[str], frames: str | int, tiles: int | str = 1, *,
        root: str | os.PathLike[str] | None = None, **overrides: Any,
    ) -> AsyncJob:  # fmt: skip
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
        """As ``Farm.job``."""
        return self._bind(await self._call(protocol.get_job(job_id, AsyncJob)))

    async def jobs(self, state: JobState | str | None = None, limit: int = 100) -> list[AsyncJob]:
        """As ``Farm.jobs``."""
        found = await self._call(protocol.list_jobs(state, limit, AsyncJob))
        return [self._bind(j) for j in found]

    async def health(self) -> dict[str, Any]:
        """As ``Farm.health``."""
        body: dict[str, Any] = await self._call(Call("GET", "/healthz"))
        return body

    # -- used by AsyncJob -----------------------------------------------------------------

    def _sync(self) -> Farm:
        """The sync client that does the disk-bound work in worker threads."""
        if self._farm is None:
            self._farm = Farm(self.url, self.token, self.timeout_s)
        return self._farm

    async def _in_thread(self, method: str, job: AsyncJob, *args: Any) -> Any:
        """The sync client's disk-bound ``method`` for ``job`` in a worker thread."""
        return await asyncio.to_thread(getattr(self._sync(), method), job, *args)

    def _bind(self, job: AsyncJob) -> AsyncJob:
        job._farm = self
        return job

    async def _call(self, call: Call[Any]) -> Any:
        """As ``Farm._call``: send ``call`` and read its answer."""
        async with self._send(call) as r:
            return call.read(Reply(r.status_code, r.content))

    async def _wait(self, job: AsyncJob, timeout: float | None, progress: bool) -> JobStatus:
        """``AsyncJob.wait``: the core's long-poll (``protocol.waiting``), or with
        ``progress`` the event stream into a ProgressBar; both bounded by ``timeout``."""
        async with asyncio.timeout(timeout):
            if not progress:
                plan = Plan(protocol.waiting(job))
                return await self._drive(plan)
            bar, status = ProgressBar(job), None
            try:
                async for event in job.events():
                    bar.update(event)
                status = await job.status()
                return status
            finally:
                bar.close(status)

    async def _drive(self, plan: Plan[Any]) -> Any:
        """As ``Farm._drive``, awaiting each step."""
        for step in plan:
            try:
                if isinstance(step, Call):
                    plan.reply = await self._call(step)
                else:
                    await asyncio.sleep(step.seconds)
            except FarmError as exc:
                plan.error = exc
        return plan.result

    async def _events(
        self, job_id: str, after: str | None = None, give_up_s: float = RECONNECT_FOR_S
    ) -> AsyncIterator[Event | None]:
        """As ``Farm._events``: typed events and keep-alives (None), resumed after a
        dropped connection, until the farm's ``end``."""
        stream = EventStream(job_id, after, give_up_s)
        while True:
            try:
                async with self._send(stream.call()) as r:
                    async for chunk in r.aiter_bytes():
                        for item in stream.feed(chunk):
                            yield item
                        if stream.ended:
                            return
            except Outage.TRANSIENT as exc:
                stream.failed(exc)
            await asyncio.sleep(RECONNECT_S)

    def _send(self, call: Call[Any]) -> _Request:
        timeout: Any = httpx.USE_CLIENT_DEFAULT
        if call.read_timeout_s is not None:
            timeout = httpx.Timeout(self.timeout_s, read=call.read_timeout_s)
        kwargs = {"params": call.params, "json": call.json, "headers": call.headers}
        return _Request(self, call.method, call.path, call.stream, {**kwargs, "timeout": timeout})


class _Request:
    """``async with farm._send(call) as response``: the farm's errors as typed
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
            raise self.farm._endpoint.unreachable(exc) from exc
        if response.status_code >= 400:
            content = await response.aread()
            await response.aclose()
            raise protocol.error_of(response.status_code, content)
        return response

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.response is not None:
            await self.response.aclose()
        if isinstance(exc, httpx.HTTPError):
            raise protocol.broken(self.method, self.path, exc) from exc
