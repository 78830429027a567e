"""The Python SDK: ``Farm`` talks to a rayfarm service over HTTP.

>>> import rayfarm
>>> farm = rayfarm.Farm()                     # RAYFARM_URL or http://127.0.0.1:8000
>>> job = farm.submit("shot.blend", frames="1-250", tiles="2x2", samples=64)  # doctest: +SKIP
>>> job.wait()                                # doctest: +SKIP
>>> job.download("renders/")                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from rayfarm.errors import FarmUnavailable, InvalidRequest, ServerError, error_from_body
from rayfarm.models import FrameInfo, Job, JobState, JobStatus, parse_spec

__all__ = ["DEFAULT_URL", "Farm"]

DEFAULT_URL = "http://127.0.0.1:8000"
#: How long one status long-poll may wait on the server before asking again.
LONG_POLL_S = 20.0


class Farm:
    """A connection to a rayfarm service.

    ``url`` defaults to ``$RAYFARM_URL``, then ``http://127.0.0.1:8000``;
    ``token`` to ``$RAYFARM_TOKEN``.
    """

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout_s: float = 60.0
    ) -> None:
        self.url = (url or os.environ.get("RAYFARM_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("RAYFARM_TOKEN")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)

    def __repr__(self) -> str:
        return f"Farm({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Farm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ---------------------------------------------------------------------

    def submit(
        self,
        path: str | os.PathLike[str],
        frames: str | int,
        tiles: int | str = 1,
        **overrides: Any,
    ) -> Job:
        """Upload a .blend and queue a job; return it (state PENDING).

        ``tiles`` is 1, ``"NxM"`` or ``"auto"``. ``overrides`` are ``JobSpec`` fields:
        ``samples``, ``resolution_percentage``, ``denoise``, ``format``, ``color_depth``,
        ``scene``, ``camera``, ``priority``, ``max_retries``.
        The spec is validated here first, so a typo fails before any upload.
        """
        spec = parse_spec({"frames": frames, "tiles": tiles, **overrides})
        scene = Path(path)
        if not scene.is_file():
            raise InvalidRequest(f"scene file not found: {scene}", {"path": str(scene)})
        with open(scene, "rb") as f:
            files = {"scene": (scene.name, f, "application/x-blender")}
            data = {"spec": spec.model_dump_json(exclude_none=True)}
            with self._request("POST", "/jobs", files=files, data=data) as r:
                return self._bind(Job.model_validate(r.json()))

    def job(self, job_id: str) -> Job:
        """The job with this id (``JobNotFound`` if there is none)."""
        return self._bind(self._get_job(job_id))

    def jobs(self, state: JobState | str | None = None, limit: int = 100) -> list[Job]:
        """Recent jobs, newest first, optionally only those in ``state``."""
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = str(JobState(state))
        with self._request("GET", "/jobs", params=params) as r:
            return [self._bind(Job.model_validate(j)) for j in r.json()["jobs"]]

    def health(self) -> dict[str, Any]:
        """The service's health report (versions, Redis, workers)."""
        with self._request("GET", "/healthz") as r:
            body: dict[str, Any] = r.json()
            return body

    # -- used by Job ----------------------------------------------------------------------

    def _bind(self, job: Job) -> Job:
        job._farm = self
        return job

    def _get_job(self, job_id: str) -> Job:
        with self._request("GET", f"/jobs/{job_id}") as r:
            return Job.model_validate(r.json())

    def _get_status(self, job_id: str, after: str | None = None, wait_s: float = 0) -> JobStatus:
        params: dict[str, Any] = {}
        if after is not None and wait_s > 0:
            params = {"after": after, "wait_s": round(wait_s, 3)}
        with self._request("GET", f"/jobs/{job_id}/status", params=params) as r:
            return JobStatus.model_validate(r.json())

    def _post_job(self, job_id: str, action: str) -> Job:
        with self._request("POST", f"/jobs/{job_id}/{action}") as r:
            return Job.model_validate(r.json())

    def _get_frames(self, job_id: str) -> list[FrameInfo]:
        with self._request("GET", f"/jobs/{job_id}/frames") as r:
            return [FrameInfo.model_validate(f) for f in r.json()["frames"]]

    def _wait(self, job: Job, timeout: float | None, on_change: Any = None) -> JobStatus:
        """Long-poll the status: one request per change (or per LONG_POLL_S when idle)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        status = job.status()
        while True:
            if on_change is not None:
                on_change(status)
            if status.state.is_terminal:
                return status
            wait_s = LONG_POLL_S
            if deadline is not None:
                wait_s = min(wait_s, deadline - time.monotonic())
                if wait_s <= 0:
                    raise TimeoutError(f"job {job.id} is still {status.state} after {timeout} s")
            if status.event is None:
                time.sleep(min(wait_s, 0.2))  # a service without events: plain polling
                status = job.status()
            else:
                status = job.status(after=status.event, wait_s=wait_s)

    def _download(self, job: Job, directory: str | os.PathLike[str]) -> list[Path]:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for info in job.frames():
            target = out / f"{info.frame:04d}.{job.spec.extension}"
            part = target.with_name(target.name + ".part")
            url = f"/jobs/{job.id}/frames/{info.frame}"
            with self._request("GET", url, stream=True) as r, open(part, "wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
            part.replace(target)  # a frame on disk is whole or absent
            paths.append(target)
        return paths

    @contextmanager
    def _request(
        self, method: str, path: str, stream: bool = False, **kwargs: Any
    ) -> Iterator[httpx.Response]:
        try:
            request = self._http.build_request(method, path, **kwargs)
            response = self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise FarmUnavailable(
                f"cannot reach the farm at {self.url}: {exc}", {"url": self.url}
            ) from exc
        try:
            if response.status_code >= 400:
                if stream:
                    response.read()
                try:
                    body = response.json()
                except (json.JSONDecodeError, UnicodeDecodeError):
                    body = response.text
                raise error_from_body(response.status_code, body)
            yield response
        except httpx.HTTPError as exc:
            raise ServerError(f"{method} {path} failed: {exc}") from exc
        finally:
            response.close()
