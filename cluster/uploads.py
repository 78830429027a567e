"""A single-.blend upload (``POST /jobs``, multipart) read in bounded memory and disk.

The body is parsed as it arrives (Starlette's ``MultiPartParser``, on python-multipart),
the scene part written to a spool file (in memory up to 1 MB, then on disk), and the
body counted against the upload limit while it is read (``limited``): a chunked body,
which has no Content-Length to refuse it by, is answered 413 the moment it passes the
limit, never read to its end first. A refused body leaves nothing behind: the spool is
an anonymous temporary file, closed (and so freed) on every way out.

Memory stays flat only if the server hands the body over as the app reads it: under
Ray Serve that takes ``rayfarm.cluster.backpressure``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from rayfarm.cluster.bodies import limited
from rayfarm.errors import InvalidRequest, PayloadTooLarge

__all__ = ["FORM_OVERHEAD_BYTES", "MAX_SPEC_BYTES", "SceneUpload", "read_scene_upload"]

#: Largest ``spec`` part (a JobSpec as JSON; a frame list of 100 000 frames fits).
MAX_SPEC_BYTES = 1024**2
#: What a form may hold beyond its scene: the spec, part headers and boundaries.
FORM_OVERHEAD_BYTES = MAX_SPEC_BYTES + 64 * 1024


@dataclass(frozen=True)
class SceneUpload:
    """The parts of a single-.blend submission: the spec's JSON text and the scene,
    spooled (``scene.file``, at position 0; ``scene.size`` bytes)."""

    spec: str
    scene: UploadFile


@asynccontextmanager
async def read_scene_upload(request: Request, limit_bytes: int) -> AsyncIterator[SceneUpload]:
    """Read a ``multipart/form-data`` body of parts ``spec`` and ``scene`` (a file of at
    most ``limit_bytes``) as it arrives; the spool is closed when the block ends.

    413 (``PayloadTooLarge``) when the body passes the limit, by its Content-Length or
    as it streams; 400 for a form that cannot be read or lacks a part."""
    body = limited(request, limit_bytes + FORM_OVERHEAD_BYTES, "upload")
    parser = _Parser(request.headers, body, max_files=1, max_fields=4, max_part_size=MAX_SPEC_BYTES)
    try:
        form = await parser.parse()  # closes what it spooled if it fails
    except MultiPartException as exc:
        raise InvalidRequest(f"could not read the multipart form: {exc.message}") from None
    except PayloadTooLarge:
        raise _too_large(limit_bytes) from None
    finally:
        await body.aclose()
    try:
        if not parser.ended:
            raise InvalidRequest("the multipart form is cut short: it has no closing boundary")
        spec = form.get("spec")
        if not isinstance(spec, str):
            raise InvalidRequest("missing form part 'spec' (the JobSpec as JSON)")
        scene = form.get("scene")
        if not isinstance(scene, UploadFile):
            raise InvalidRequest("missing file part 'scene' (the .blend)")
        if scene.size is not None and scene.size > limit_bytes:
            raise _too_large(limit_bytes, scene.size)
        await scene.seek(0)
        yield SceneUpload(spec, scene)
    finally:
        await form.close()
        parser.close_spools()


class _Parser(MultiPartParser):
    """Starlette's parser, noting whether the form ended: a body cut short parses
    without error, its last part never finished, and that part's spool is in no form."""

    ended = False

    def on_end(self) -> None:
        super().on_end()
        self.ended = True

    def close_spools(self) -> None:
        """Close every spool this parser opened, the unfinished part's too (Starlette
        closes them only when parsing fails)."""
        for spool in getattr(self, "_files_to_close_on_error", ()):
            spool.close()


def _too_large(limit_bytes: int, size: int | None = None) -> PayloadTooLarge:
    what = "the upload" if size is None else f"the scene of {size} bytes"
    return PayloadTooLarge(
        f"{what} is over the farm's limit of {limit_bytes} bytes (RAYFARM_MAX_UPLOAD_BYTES)",
        {"limit": limit_bytes},
    )
