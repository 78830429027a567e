"""Talk to a rayfarm farm over HTTP with Python's standard library only.

Blender's Python has neither httpx nor pydantic, so this module speaks the SDK's
protocol (``rayfarm.client``) over ``urllib``: JSON requests, blobs streamed by
SHA-256, errors as ``{"error": {"code", "message", "detail"}}``. It never imports
``bpy``: it runs in worker threads (see ``work``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .vendor.pack import sha256_file  # the SDK's: frames already here are not re-read

DEFAULT_URL = "http://127.0.0.1:8000"
#: How long one request may wait for the farm before the add-on gives up on it.
TIMEOUT_S = 30.0
#: A connection test should answer quickly or say the farm is not there.
PROBE_TIMEOUT_S = 5.0
CHUNK_BYTES = 1 << 20


class FarmError(Exception):
    """Anything the add-on reports to the artist: the farm's own error (``code``,
    ``message``, ``detail``, HTTP ``status``) or a failure to reach it."""

    def __init__(
        self,
        message: str,
        code: str = "error",
        detail: dict[str, Any] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, code, detail, status)
        self.message, self.code, self.detail, self.status = message, code, detail or {}, status

    def __str__(self) -> str:
        return self.message


class Cancelled(Exception):
    """The artist stopped the work (Esc or the Cancel button)."""


class FarmClient:
    """One farm at ``url``; ``token`` is sent as ``Authorization: Bearer`` when set."""

    def __init__(self, url: str, token: str = "", timeout_s: float = TIMEOUT_S) -> None:
        self.url = (url or DEFAULT_URL).strip().rstrip("/")
        self.token = token.strip()
        self.timeout_s = timeout_s

    # -- the protocol ---------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.call("GET", "/healthz", timeout_s=PROBE_TIMEOUT_S)

    def whoami(self) -> dict[str, Any]:
        """The token's user and role (401 when the token is not valid)."""
        return self.call("GET", "/whoami", timeout_s=PROBE_TIMEOUT_S)

    def missing(self, hashes: list[str]) -> list[str]:
        missing: list[str] = self.call("POST", "/blobs/missing", {"hashes": hashes})["missing"]
        return missing

    def put_blob(
        self,
        digest: str,
        path: Path,
        size: int,
        on_bytes: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Stream one file to ``PUT /blobs/{digest}``; ``on_bytes`` hears each chunk sent,
        ``cancel`` stops between chunks (raising ``Cancelled``)."""

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while block := f.read(CHUNK_BYTES):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled()
                    yield block
                    if on_bytes is not None:
                        on_bytes(len(block))

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        with self._open("PUT", f"/blobs/{digest}", chunks(), headers):
            pass

    def submit(
        self, spec: dict[str, Any], main: str, files: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return self.call("POST", "/jobs", {"spec": spec, "main": main, "files": files})

    def jobs(self, limit: int = 10) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.call("GET", f"/jobs?limit={limit}")["jobs"]
        return jobs

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/jobs/{_quote(job_id)}")

    def action(self, job_id: str, action: str) -> dict[str, Any]:
        """``cancel`` or ``retry`` a job; returns the job."""
        return self.call("POST", f"/jobs/{_quote(job_id)}/{action}")

    def frames(self, job_id: str) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = self.call("GET", f"/jobs/{_quote(job_id)}/frames")["frames"]
        return frames

    def download(
        self, job_id: str, frame: dict[str, Any], target: Path, cancel: threading.Event
    ) -> None:
        """Fetch one frame to ``target`` through ``target.part``, checked against the
        farm's SHA-256; a frame already there with that hash is not fetched again."""
        digest = frame.get("sha256")
        if digest and target.exists() and sha256_file(target) == digest:
            return
        part = target.with_name(target.name + ".part")
        sha = hashlib.sha256()
        url = f"/jobs/{_quote(job_id)}/frames/{int(frame['frame'])}"
        with self._open("GET", url) as r, open(part, "wb") as out:
            while block := r.read(CHUNK_BYTES):
                if cancel.is_set():
                    raise Cancelled()
                sha.update(block)
                out.write(block)
        if digest and sha.hexdigest() != digest:
            part.unlink()
            raise FarmError(
                f"frame {frame['frame']} does not match the farm's SHA-256; removed it",
                "hash_mismatch",
            )
        os.replace(part, target)

    # -- plumbing -------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """One JSON request; the decoded JSON answer."""
        body = json.dumps(payload).encode() if payload is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        with self._open(method, path, body, headers, timeout_s) as r:
            return json.loads(r.read() or b"null")

    def _open(
        self,
        method: str,
        path: str,
        body: bytes | Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        request = urllib.request.Request(
            self.url + path, data=body, method=method, headers=dict(headers or {})
        )
        request.add_header("Accept", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s)
        except urllib.error.HTTPError as exc:
            raise _farm_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, socket.timeout | TimeoutError):
                reason = "no answer in time"
            raise FarmError(
                f"Cannot reach the farm at {self.url} ({reason}). Is it running? "
                "Check the Farm URL in the rayfarm add-on's preferences.",
                "unavailable",
                {"url": self.url},
            ) from None


def _farm_error(exc: urllib.error.HTTPError) -> FarmError:
    """The farm's ``{"error": {...}}`` body as a ``FarmError`` carrying its message."""
    try:
        raw = exc.read()
    except OSError:
        raw = b""
    finally:
        exc.close()
    try:
        error = json.loads(raw)["error"]
        return FarmError(
            str(error.get("message") or error.get("code")),
            str(error.get("code", "error")),
            error.get("detail") if isinstance(error.get("detail"), dict) else {},
            exc.code,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        text = raw.decode("utf-8", "replace").strip()[:300]
        return FarmError(
            f"The farm answered HTTP {exc.code}: {text or exc.reason}", "http", {}, exc.code
        )


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")
