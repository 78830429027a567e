"""The Python SDK: ``Farm`` talks to a rayfarm service over HTTP.

>>> import rayfarm
>>> farm = rayfarm.Farm()                     # RAYFARM_URL or http://127.0.0.1:8000
>>> job = farm.submit("shot.blend", frames="1-250", tiles="2x2", samples=64)  # doctest: +SKIP
>>> job.wait()                                # doctest: +SKIP
>>> job.download("renders/")                  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from rayfarm.errors import (
    FarmError,
    FarmUnavailable,
    FrameNotFound,
    InvalidRequest,
    ServerError,
    error_from_body,
)
from rayfarm.events import END, Event, parse_event, read_sse
from rayfarm.models import FROM_FARM, FrameInfo, Job, JobState, JobStatus, parse_spec
from rayfarm.pack import Pack, pack_scene, sha256_file
from rayfarm.paths import local_token
from rayfarm.progress import ProgressBar

__all__ = ["DEFAULT_URL", "Farm", "Outage", "UploadReport"]

DEFAULT_URL = "http://127.0.0.1:8000"
#: How long one status long-poll may wait on the server before asking again.
LONG_POLL_S = 20.0
#: Pause before reconnecting a dropped event stream, and how long to keep trying.
RECONNECT_S = 1.0
RECONNECT_FOR_S = 120.0
#: The event stream sends a keep-alive every 15 s; silence this long means it is dead.
STREAM_READ_TIMEOUT_S = 60.0


class Outage:
    """Rides out a farm that cannot answer for a while (restarting, a proxy whose replica
    is being replaced, a dropped connection): a waiter or an event stream asks again
    every ``RECONNECT_S`` and raises the last error once the farm has failed it for
    ``give_up_s`` in a row."""

    #: What is worth asking again about; a 4xx is an answer.
    TRANSIENT = (FarmUnavailable, ServerError)

    def __init__(self, give_up_s: float = RECONNECT_FOR_S) -> None:
        self.give_up_s = give_up_s
        self.since: float | None = None

    def failed(self, exc: Exception) -> None:
        """Note a failure; raise ``exc`` once the outage is too long."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        if now - self.since > self.give_up_s:
            raise exc

    def ended(self) -> None:
        self.since = None


@dataclass(frozen=True)
class UploadReport:
    """What one ``Farm.submit`` sent: ``files`` packed (``bytes_total``), of which
    ``files_sent`` (``bytes_sent``) the farm lacked; ``missing``: files the scene names
    that were not found here (only with ``allow_missing``). Where its time went:
    ``pack_s`` (tracing the scene's files, and copying them where paths needed
    rewriting), ``hash_s`` (hashing them), ``upload_s`` (asking the farm what it lacks
    and sending that)."""

    files: int
    bytes_total: int
    files_sent: int
    bytes_sent: int
    missing: list[str]
    pack_s: float = 0.0
    hash_s: float = 0.0
    upload_s: float = 0.0


class Farm:
    """A connection to a rayfarm service.

    ``url`` defaults to ``$RAYFARM_URL``, then ``http://127.0.0.1:8000``;
    ``token`` to ``$RAYFARM_TOKEN``, then, for a farm on this machine, the first admin's
    token that ``rayfarm up`` wrote to its data dir (``rayfarm.paths.local_token``).
    """

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout_s: float = 60.0
    ) -> None:
        self.url = (url or os.environ.get("RAYFARM_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("RAYFARM_TOKEN")
        if self.token is None:
            self.token = local_token(self.url)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)
        self.last_upload: UploadReport | None = None

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
        *,
        root: str | os.PathLike[str] | None = None,
        **overrides: Any,
    ) -> Job:
        """Pack a .blend with everything it uses, upload what the farm lacks, and queue
        a job; return it (state PENDING).

        ``tiles`` is 1, ``"NxM"`` or ``"auto"``. ``overrides`` are ``JobSpec`` fields:
        ``samples``, ``resolution_percentage``, ``denoise``, ``format``, ``color_depth``,
        ``scene``, ``camera``, ``priority``, ``max_retries``, ``allow_missing``, ``post``
        (``{"video": {"fps": 24}}``), ``project`` (the farm project the job belongs to:
        its members see it), ``blender`` (the Blender version to render with, one the
        farm offers; by default the one that saved the file, else the nearest newer one),
        ``order`` (``"preview"``: first, last and middle frames first), ``depends_on``
        (job ids it waits for: it starts once they all COMPLETED, and fails if one fails
        or is cancelled), ``webhook`` (a URL called when it ends; see ``set_webhook``).

        >>> lighting = farm.submit("light.blend", frames="1-250")      # doctest: +SKIP
        >>> comp = farm.submit("comp.blend", frames="1-250",           # doctest: +SKIP
        ...                    depends_on=[lighting.id], order="preview")
        ``root`` (default: the scene's folder) is the folder whose layout the farm
        reproduces; files outside it are packed too (see
        ``rayfarm.pack``).

        The spec is validated first, so a typo fails before any packing; a file the
        scene uses that is missing here raises ``MissingDependencies`` before any upload
        unless ``allow_missing=True``. Files go up by content hash, once: an unchanged
        re-submit sends no file bytes. ``last_upload`` says what was sent.
        """
        spec = parse_spec({"frames": frames, "tiles": tiles, **overrides})
        with pack_scene(path, root, spec.allow_missing) as packed:
            self.last_upload = self._upload(packed)
            body = {
                "spec": spec.model_dump(mode="json", exclude_none=True),
                "main": packed.main,
                "files": [
                    {"path": f.path, "sha256": f.sha256, "size": f.size} for f in packed.files
                ],
            }
            with self._request("POST", "/jobs", json=body) as r:
                return self._bind(Job.model_validate(r.json(), context=FROM_FARM))

    def inspect(
        self, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
    ) -> dict[str, Any]:
        """The farm's catalogue of a scene: packs and uploads it as ``submit`` does (only
        what the farm lacks), and returns what the farm found opening it with bpy:
        ``saved_by``, ``active_scene``, ``scenes`` (cameras, frame range, resolution,
        engine, samples, view layers and passes), ``files`` and ``missing``. Its ``id``
        serves ``GET /scenes/{id}``."""
        with pack_scene(path, root, allow_missing=True) as packed:
            self.last_upload = self._upload(packed)
            body = {
                "main": packed.main,
                "files": [
                    {"path": f.path, "sha256": f.sha256, "size": f.size} for f in packed.files
                ],
            }
            with self._request("POST", "/scenes", json=body) as r:
                info: dict[str, Any] = r.json()
                return info

    def _upload(self, packed: Pack) -> UploadReport:
        """Send the blobs the farm lacks, each streamed from disk."""
        started = time.perf_counter()
        unique = {f.sha256: f for f in packed.files}
        with self._request("POST", "/blobs/missing", json={"hashes": list(unique)}) as r:
            missing = r.json()["missing"]
        sent = 0
        for digest in missing:
            f = unique[digest]
            with open(f.source, "rb") as body:
                headers = {"content-type": "application/octet-stream"}
                content = iter(lambda b=body: b.read(1 << 20), b"")  # type: ignore[misc]
                with self._request(
                    "PUT", f"/blobs/{digest}", content=content,
                    headers={**headers, "content-length": str(f.size)},
                ):  # fmt: skip
                    sent += f.size
        return UploadReport(
            files=len(packed.files),
            bytes_total=packed.size,
            files_sent=len(missing),
            bytes_sent=sent,
            missing=list(packed.missing),
            pack_s=packed.trace_s + packed.copy_s,
            hash_s=packed.hash_s,
            upload_s=time.perf_counter() - started,
        )

    def job(self, job_id: str) -> Job:
        """The job with this id (``JobNotFound`` if there is none)."""
        return self._bind(self._get_job(job_id))

    def jobs(self, state: JobState | str | None = None, limit: int = 100) -> list[Job]:
        """Recent jobs, newest first, optionally only those in ``state``."""
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = str(JobState(state))
        with self._request("GET", "/jobs", params=params) as r:
            return [self._bind(Job.model_validate(j, context=FROM_FARM)) for j in r.json()["jobs"]]

    def health(self) -> dict[str, Any]:
        """The service's health report (versions, Redis, workers)."""
        with self._request("GET", "/healthz") as r:
            body: dict[str, Any] = r.json()
            return body

    def whoami(self) -> dict[str, Any]:
        """The signed-in user: ``user``, ``role``, ``projects``."""
        with self._request("GET", "/whoami") as r:
            body: dict[str, Any] = r.json()
            return body

    def create_token(
        self,
        user: str,
        role: str | None = None,
        projects: list[str] | None = None,
        label: str = "",
    ) -> str:
        """A new API token for ``user`` (admins only): with ``role`` (viewer, artist,
        admin) the user is created or updated with ``projects``. Shown once: the farm
        keeps only its hash."""
        body: dict[str, Any] = {"user": user, "label": label}
        if role is not None:
            body["role"] = role
        if projects is not None:
            body["projects"] = projects
        with self._request("POST", "/tokens", json=body) as r:
            token: str = r.json()["token"]
            return token

    # -- scheduling (docs/scheduling.md) ----------------------------------------------------

    def shares(self) -> dict[str, float]:
        """Each weighted project's fair-share weight (a project not listed weighs 1)."""
        with self._request("GET", "/shares") as r:
            shares: dict[str, float] = r.json()["shares"]
            return shares

    def set_share(self, project: str, weight: float | None) -> None:
        """Weigh ``project`` for fair share (admins); None: back to the default, 1. At
        equal priority, projects' running slots converge to their weights."""
        if weight is None:
            with self._request("DELETE", f"/shares/{project}"):
                return
        with self._request("PUT", f"/shares/{project}", json={"weight": weight}):
            return

    def quotas(self) -> dict[str, dict[str, dict[str, int | None]]]:
        """Every quota: ``{"user": {name: {"gpu", "cpu"}}, "project": {...}}``."""
        with self._request("GET", "/quotas") as r:
            quotas: dict[str, dict[str, dict[str, int | None]]] = r.json()["quotas"]
            return quotas

    def set_quota(
        self, scope: str, name: str, gpu: int | None = None, cpu: int | None = None
    ) -> None:
        """Limit the slots of each kind (None: no limit) that ``scope`` ("user" or
        "project") ``name``'s jobs hold at once (admins); both None removes the quota."""
        if gpu is None and cpu is None:
            with self._request("DELETE", f"/quotas/{scope}/{name}"):
                return
        with self._request("PUT", f"/quotas/{scope}/{name}", json={"gpu": gpu, "cpu": cpu}):
            return

    def mark_urgent(self, job_id: str, urgent: bool = True) -> Job:
        """Mark a job urgent (admins): it starts and renders before every share's work."""
        with self._request("POST", f"/jobs/{job_id}/urgent", json={"urgent": urgent}) as r:
            return self._bind(Job.model_validate(r.json(), context=FROM_FARM))

    def set_dependencies(self, job_id: str, depends_on: list[str]) -> Job:
        """Change what a queued (PENDING) job waits for (``[]``: nothing)."""
        body = {"depends_on": list(depends_on)}
        with self._request("PUT", f"/jobs/{job_id}/depends_on", json=body) as r:
            return self._bind(Job.model_validate(r.json(), context=FROM_FARM))

    def webhook(self) -> dict[str, str | None]:
        """Your webhook: ``url`` (None: none) and ``secret``, the key of the HMAC-SHA256
        signature (``X-Rayfarm-Signature``) on every call to it and to your jobs' own."""
        with self._request("GET", "/webhook") as r:
            found: dict[str, str | None] = r.json()
            return found

    def set_webhook(self, url: str | None, rotate: bool = False) -> dict[str, str | None]:
        """Have the farm POST to ``url`` whenever a job of yours ends (None: no more);
        ``rotate`` makes a new signing secret. Returns the URL and the secret."""
        if url is None:
            with self._request("DELETE", "/webhook") as r:
                gone: dict[str, str | None] = r.json()
                return gone
        with self._request("PUT", "/webhook", json={"url": url, "rotate": rotate}) as r:
            found: dict[str, str | None] = r.json()
            return found

    def audit(self, **filters: Any) -> list[dict[str, str]]:
        """The audit log, newest first (admins only); ``user``, ``action``, ``job``,
        ``since`` (ISO time), ``limit`` filter it."""
        params = {k: v for k, v in filters.items() if v is not None}
        with self._request("GET", "/audit", params=params) as r:
            records: list[dict[str, str]] = r.json()["records"]
            return records

    # -- used by Job ----------------------------------------------------------------------

    def _bind(self, job: Job) -> Job:
        job._farm = self
        return job

    def _get_job(self, job_id: str) -> Job:
        with self._request("GET", f"/jobs/{job_id}") as r:
            return Job.model_validate(r.json(), context=FROM_FARM)

    def _get_status(self, job_id: str, after: str | None = None, wait_s: float = 0) -> JobStatus:
        params: dict[str, Any] = {}
        if after is not None and wait_s > 0:
            params = {"after": after, "wait_s": round(wait_s, 3)}
        with self._request("GET", f"/jobs/{job_id}/status", params=params) as r:
            return JobStatus.model_validate(r.json())

    def _post_job(self, job_id: str, action: str) -> Job:
        with self._request("POST", f"/jobs/{job_id}/{action}") as r:
            return Job.model_validate(r.json(), context=FROM_FARM)

    def _delete_job(self, job_id: str) -> dict[str, Any]:
        with self._request("DELETE", f"/jobs/{job_id}") as r:
            freed: dict[str, Any] = r.json()
            return freed

    def _get_frames(self, job_id: str) -> list[FrameInfo]:
        with self._request("GET", f"/jobs/{job_id}/frames") as r:
            return [FrameInfo.model_validate(f) for f in r.json()["frames"]]

    def _wait(self, job: Job, timeout: float | None, on_change: Any = None) -> JobStatus:
        """Long-poll the status: one request per change (or per LONG_POLL_S when idle),
        riding out a farm that stops answering for a while (``Outage``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        status: JobStatus | None = None
        outage = Outage()
        while True:
            wait_s = LONG_POLL_S
            if deadline is not None and status is not None:
                wait_s = min(wait_s, deadline - time.monotonic())
                if wait_s <= 0:
                    raise TimeoutError(f"job {job.id} is still {status.state} after {timeout} s")
            try:
                if status is None:
                    status = job.status()
                elif status.event is None:
                    time.sleep(min(wait_s, 0.2))  # a service without events: plain polling
                    status = job.status()
                else:
                    status = job.status(after=status.event, wait_s=wait_s)
            except Outage.TRANSIENT as exc:
                if deadline is not None and time.monotonic() + RECONNECT_S > deadline:
                    raise  # the farm's error says more than a timeout would
                outage.failed(exc)
                time.sleep(RECONNECT_S)
                continue
            outage.ended()
            if on_change is not None:
                on_change(status)
            if status.state.is_terminal:
                return status

    def _events(
        self, job_id: str, after: str | None = None, give_up_s: float = RECONNECT_FOR_S
    ) -> Iterator[Event | None]:
        """The job's events after ``after``; None for each keep-alive (so callers can
        check a clock). A dropped stream is reopened from the last event seen (for up
        to ``give_up_s`` of failures in a row); the farm's ``end`` message ends it."""
        last, outage = after, Outage(give_up_s)
        timeout = httpx.Timeout(self._http.timeout.connect, read=STREAM_READ_TIMEOUT_S)
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = last
            try:
                with self._request(
                    "GET", f"/jobs/{job_id}/events", stream=True, headers=headers,
                    timeout=timeout,
                ) as r:  # fmt: skip
                    for message in read_sse(r.iter_lines()):
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
            time.sleep(RECONNECT_S)

    def _wait_progress(self, job: Job, timeout: float | None) -> JobStatus:
        """``Job.wait(progress=True)``: follow the event stream into a ProgressBar."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = ProgressBar(job)
        status = None
        try:
            for event in self._events(job.id):
                if event is not None:
                    bar.update(event)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job.id} is still {bar.state} after {timeout} s")
            status = job.status()
            return status
        finally:
            bar.close(status)

    def _logs(self, job_id: str, task: str | None) -> str:
        url = f"/jobs/{job_id}/logs" if task is None else f"/jobs/{job_id}/tasks/{task}/log"
        with self._request("GET", url) as r:
            return r.text

    def _image(self, job: Job, frame: int) -> Any:
        try:
            from PIL import Image
        except ImportError:
            raise InvalidRequest("Job.image and Job.show need Pillow: pip install pillow") from None
        url = f"/jobs/{job.id}/frames/{frame}"
        data = None
        if job.spec.format == "png":
            try:
                with self._request("GET", url) as r:
                    data = r.content
            except FrameNotFound:
                pass  # not stored yet: a sliced frame still rendering has a preview
        if data is None:
            # An EXR frame is shown by its preview; a sliced frame still rendering, by the
            # merge of the slices landed so far.
            with self._request("GET", url + "/thumbnail") as r:
                data = r.content
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    def _show(self, job: Job, frame: int) -> Any:
        image = self._image(job, frame)
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return image
        if get_ipython() is None:
            return image
        display(image)
        return None  # shown once: a returned image would be shown again as the cell's value

    def _download(self, job: Job, directory: str | os.PathLike[str]) -> list[Path]:
        """Fetch every stored frame into ``directory``; see ``Job.download``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for info in job.frames():
            target = out / f"{info.frame:04d}.{job.spec.extension}"
            if not (info.sha256 and target.exists() and sha256_file(target) == info.sha256):
                self._fetch(f"/jobs/{job.id}/frames/{info.frame}", target, info)
            paths.append(target)
        return paths

    def _fetch(self, url: str, target: Path, info: FrameInfo) -> None:
        """Download to ``target`` through ``target.part``: a ``.part`` left by an
        interrupted download is resumed with a Range request; the result must match the
        farm's SHA-256 (a mismatch deletes it and raises ``ServerError``)."""
        part = target.with_name(target.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        if info.size is not None and have > info.size:
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with self._request("GET", url, stream=True, headers=headers) as r:
                mode = "ab" if r.status_code == 206 else "wb"
                with open(part, mode) as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
        except FarmError as exc:
            if have and exc.detail.get("status") == 416:  # the .part is not of this frame
                part.unlink()
                return self._fetch(url, target, info)
            raise
        if info.sha256 and sha256_file(part) != info.sha256:
            part.unlink()
            raise ServerError(
                f"{target.name} does not match the farm's SHA-256 {info.sha256}; removed it",
                {"frame": info.frame},
            )
        part.replace(target)  # a frame on disk is whole and verified, or absent

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
