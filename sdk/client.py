"""The Python SDK: ``Farm`` talks to a rayfarm service over HTTP.

>>> import rayfarm
>>> farm = rayfarm.Farm()                     # RAYFARM_URL or http://127.0.0.1:8000
>>> job = farm.submit("shot.blend", frames="1-250", tiles="2x2", samples=64)  # doctest: +SKIP
>>> job.wait()                                # doctest: +SKIP
>>> job.download("renders/")                  # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from rayfarm import protocol
from rayfarm.errors import FarmError, FrameNotFound, InvalidRequest, ServerError
from rayfarm.events import Event
from rayfarm.job import Job
from rayfarm.models import FrameInfo, JobRecord, JobState, JobStatus, parse_spec
from rayfarm.pack import Pack, pack_scene, sha256_file
from rayfarm.progress import ProgressBar
from rayfarm.protocol import (
    DEFAULT_URL,
    RECONNECT_FOR_S,
    Call,
    EventStream,
    Outage,
    Plan,
    Reply,
    Sleep,
    Step,
)

# Defined here before rayfarm.protocol held them; still importable from here.
from rayfarm.protocol import LONG_POLL_S as LONG_POLL_S
from rayfarm.protocol import RECONNECT_S as RECONNECT_S
from rayfarm.protocol import STREAM_READ_TIMEOUT_S as STREAM_READ_TIMEOUT_S

__all__ = ["DEFAULT_URL", "Farm", "Job", "Outage", "UploadReport"]


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

    The requests and what their answers mean are ``rayfarm.protocol``'s; this class
    sends them with ``httpx.Client`` and does the disk-bound work (packing, uploading,
    downloading).
    """

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout_s: float = 60.0
    ) -> None:
        self._endpoint = endpoint = protocol.Endpoint.resolve(url, token)
        self.url, self.token = endpoint.url, endpoint.token
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=endpoint.headers)
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
            return self._bind(self._call(protocol.submit_job(body, Job)))

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
            info: dict[str, Any] = self._call(Call("POST", "/scenes", json=body))
            return info

    def _upload(self, packed: Pack) -> UploadReport:
        """Send the blobs the farm lacks, each streamed from disk."""
        started = time.perf_counter()
        unique = {f.sha256: f for f in packed.files}
        asked = {"hashes": list(unique)}
        missing: list[str] = self._call(
            protocol.field_of("POST", "/blobs/missing", "missing", json=asked)
        )
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
        return self._bind(self._call(protocol.get_job(job_id, Job)))

    def jobs(self, state: JobState | str | None = None, limit: int = 100) -> list[Job]:
        """Recent jobs, newest first, optionally only those in ``state``."""
        return [self._bind(j) for j in self._call(protocol.list_jobs(state, limit, Job))]

    def health(self) -> dict[str, Any]:
        """The service's health report (versions, Redis, workers)."""
        body: dict[str, Any] = self._call(Call("GET", "/healthz"))
        return body

    def whoami(self) -> dict[str, Any]:
        """The signed-in user: ``user``, ``role``, ``projects``."""
        body: dict[str, Any] = self._call(Call("GET", "/whoami"))
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
        token: str = self._call(protocol.field_of("POST", "/tokens", "token", json=body))
        return token

    # -- scheduling (docs/scheduling.md) ----------------------------------------------------

    def shares(self) -> dict[str, float]:
        """Each weighted project's fair-share weight (a project not listed weighs 1)."""
        shares: dict[str, float] = self._call(protocol.field_of("GET", "/shares", "shares"))
        return shares

    def set_share(self, project: str, weight: float | None) -> None:
        """Weigh ``project`` for fair share (admins); None: back to the default, 1. At
        equal priority, projects' running slots converge to their weights."""
        path = f"/shares/{project}"
        if weight is None:
            self._call(protocol.no_answer("DELETE", path))
        else:
            self._call(protocol.no_answer("PUT", path, json={"weight": weight}))

    def quotas(self) -> dict[str, dict[str, dict[str, int | None]]]:
        """Every quota: ``{"user": {name: {"gpu", "cpu"}}, "project": {...}}``."""
        quotas: dict[str, dict[str, dict[str, int | None]]] = self._call(
            protocol.field_of("GET", "/quotas", "quotas")
        )
        return quotas

    def set_quota(
        self, scope: str, name: str, gpu: int | None = None, cpu: int | None = None
    ) -> None:
        """Limit the slots of each kind (None: no limit) that ``scope`` ("user" or
        "project") ``name``'s jobs hold at once (admins); both None removes the quota."""
        path = f"/quotas/{scope}/{name}"
        if gpu is None and cpu is None:
            self._call(protocol.no_answer("DELETE", path))
        else:
            self._call(protocol.no_answer("PUT", path, json={"gpu": gpu, "cpu": cpu}))

    def mark_urgent(self, job_id: str, urgent: bool = True) -> Job:
        """Mark a job urgent (admins): it starts and renders before every share's work."""
        body = {"urgent": urgent}
        return self._bind(self._call(protocol.job_action(job_id, "urgent", Job, body)))

    def set_dependencies(self, job_id: str, depends_on: list[str]) -> Job:
        """Change what a queued (PENDING) job waits for (``[]``: nothing)."""
        return self._bind(self._call(protocol.set_dependencies(job_id, depends_on, Job)))

    def webhook(self) -> dict[str, str | None]:
        """Your webhook: ``url`` (None: none) and ``secret``, the key of the HMAC-SHA256
        signature (``X-Rayfarm-Signature``) on every call to it and to your jobs' own."""
        found: dict[str, str | None] = self._call(Call("GET", "/webhook"))
        return found

    def set_webhook(self, url: str | None, rotate: bool = False) -> dict[str, str | None]:
        """Have the farm POST to ``url`` whenever a job of yours ends (None: no more);
        ``rotate`` makes a new signing secret. Returns the URL and the secret."""
        if url is None:
            gone: dict[str, str | None] = self._call(Call("DELETE", "/webhook"))
            return gone
        body = {"url": url, "rotate": rotate}
        found: dict[str, str | None] = self._call(Call("PUT", "/webhook", json=body))
        return found

    def audit(self, **filters: Any) -> list[dict[str, str]]:
        """The audit log, newest first (admins only); ``user``, ``action``, ``job``,
        ``since`` (ISO time), ``limit`` filter it."""
        params = {k: v for k, v in filters.items() if v is not None}
        call = protocol.field_of("GET", "/audit", "records", params=params)
        records: list[dict[str, str]] = self._call(call)
        return records

    # -- used by Job ----------------------------------------------------------------------

    def _bind(self, job: Job) -> Job:
        job._farm = self
        return job

    def _call(self, call: Call[Any]) -> Any:
        """Send ``call`` and read its answer (the farm's typed error for a 4xx or 5xx)."""
        with self._send(call) as r:
            return call.read(Reply(r.status_code, r.content))

    def _drive(self, steps: Generator[Step, Any, Any]) -> Any:
        """Carry out the core's steps (``protocol.waiting``): send its calls, take its
        sleeps, and hand each outcome back."""
        plan = Plan(steps)
        for step in plan:
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                continue
            try:
                plan.reply = self._call(step)
            except FarmError as exc:
                plan.error = exc
        return plan.result

    def _events(
        self, job_id: str, after: str | None = None, give_up_s: float = RECONNECT_FOR_S
    ) -> Iterator[Event | None]:
        """The job's events after ``after``; None for each keep-alive (so callers can
        check a clock). A dropped stream is reopened from the last event seen (for up
        to ``give_up_s`` of failures in a row); the farm's ``end`` message ends it."""
        stream = EventStream(job_id, after, give_up_s)
        while True:
            try:
                with self._send(stream.call()) as r:
                    for chunk in r.iter_bytes():
                        yield from stream.feed(chunk)
                        if stream.ended:
                            return
            except Outage.TRANSIENT as exc:
                stream.failed(exc)
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

    def _image(self, job: JobRecord, frame: int) -> Any:
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

    def _show(self, job: JobRecord, frame: int) -> Any:
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

    def _download(self, job: JobRecord, directory: str | os.PathLike[str]) -> list[Path]:
        """Fetch every stored frame into ``directory``; see ``Job.download``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for info in self._call(protocol.get_frames(job.id)):
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

    def _send(self, call: Call[Any]) -> Any:
        """``with farm._send(call) as response``: ``call`` sent as it says."""
        timeout: Any = httpx.USE_CLIENT_DEFAULT
        if call.read_timeout_s is not None:
            timeout = httpx.Timeout(self._http.timeout.connect, read=call.read_timeout_s)
        return self._request(
            call.method, call.path, call.stream, params=call.params, json=call.json,
            headers=call.headers, timeout=timeout,
        )  # fmt: skip

    @contextmanager
    def _request(
        self, method: str, path: str, stream: bool = False, **kwargs: Any
    ) -> Iterator[httpx.Response]:
        """The one place this client meets the network: the response, or the farm's
        typed error (``protocol.error_of``); a transport failure is ``FarmUnavailable``
        and an answer broken off on the way ``ServerError``."""
        try:
            request = self._http.build_request(method, path, **kwargs)
            response = self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise self._endpoint.unreachable(exc) from exc
        try:
            if response.status_code >= 400:
                raise protocol.error_of(response.status_code, response.read())
            yield response
        except httpx.HTTPError as exc:
            raise protocol.broken(method, path, exc) from exc
        finally:
            response.close()
