"""``/jobs/{job_id}/frames`` and ``/jobs/{job_id}/outputs``: a job's stored frames
(byte ranges, ETags), their previews, and what its post-processing made."""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from rayfarm.cluster import storage as layout
from rayfarm.cluster.context import Ctx, JobId
from rayfarm.errors import FrameNotFound, NotFound
from rayfarm.models import FrameInfo
from rayfarm.render.inputs import check_path

__all__ = ["router"]

_MEDIA = {"png": "image/png", "exr": "image/x-exr"}

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("/{job_id}/frames")
async def list_frames(job_id: JobId, ctx: Ctx, request: Request) -> dict[str, Any]:
    """Stored frames with the URL each is served from."""
    await ctx.store.status(job_id)  # 404 for an unknown job
    stored = await ctx.store.frames_done(job_id)
    meta = await ctx.store.frame_meta(job_id)
    base = str(request.base_url).rstrip("/")
    frames = []
    for n in sorted(stored):
        m = meta.get(n, {})
        size = m.get("size") if isinstance(m.get("size"), int) and m["size"] >= 0 else None
        info = FrameInfo(
            frame=n, url=f"{base}/jobs/{job_id}/frames/{n}", size=size,
            sha256=m.get("sha256") or None,
        )  # fmt: skip
        frames.append(info.model_dump())
    return {"frames": frames}


@router.get(
    "/{job_id}/frames/{frame}",
    response_class=StreamingResponse,
    responses={200: {"content": {"image/png": {}, "image/x-exr": {}}}},
)
async def get_frame(job_id: JobId, frame: int, ctx: Ctx, request: Request) -> Response:
    """The frame's image bytes, streamed from object storage.

    Supports one byte range (``Range: bytes=START-[END]`` or ``bytes=-SUFFIX``): 206 with
    ``Content-Range``, 416 when it lies outside the file; the ETag is the SHA-256.
    """
    job = await ctx.store.get(job_id)
    stored = await ctx.store.frames_done(job_id)
    if frame not in stored:
        raise FrameNotFound(
            f"job {job_id} has no stored frame {frame}", {"job_id": job_id, "frame": frame}
        )
    key = stored[frame]
    size = await asyncio.to_thread(ctx.storage.size, key)
    digest = (await ctx.store.frame_meta(job_id)).get(frame, {}).get("sha256")
    headers = {"Accept-Ranges": "bytes", **({"ETag": f'"{digest}"'} if digest else {})}
    media = _MEDIA[job.spec.format]
    wanted = request.headers.get("range")
    if wanted is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(ctx.storage.iter_bytes(key), media_type=media, headers=headers)
    span = _byte_range(wanted, size)
    if span is None:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(
        ctx.storage.iter_bytes(key, start=start, end=end),
        status_code=206,
        media_type=media,
        headers=headers,
    )


@router.get(
    "/{job_id}/frames/{frame}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
async def get_thumbnail(job_id: JobId, frame: int, ctx: Ctx) -> Response:
    """A PNG preview of a stored frame (at most 512 pixels on its longer side; EXR frames
    through the scene's view transform), made when the frame landed; of a frame split
    into sample slices that is still rendering, the merge of the slices landed so far
    (its combined pass through the view transform, not yet denoised or composited), with
    ``X-Rayfarm-Samples``: the share of the frame's samples it holds (1 once stored)."""
    await ctx.store.status(job_id)  # 404 for an unknown job
    final, partial = layout.thumbnail_key(job_id, frame), layout.preview_key(job_id, frame)
    # The final one again last: a frame that landed between the first two reads.
    for key in (final, partial, final):
        try:
            data = await asyncio.to_thread(ctx.storage.read_bytes, key)
        except FileNotFoundError:
            continue
        share = "1" if key == final else await ctx.store.preview_share(job_id, frame)
        fraction = share or "0"
        return Response(data, media_type="image/png", headers={"X-Rayfarm-Samples": fraction})
    raise FrameNotFound(
        f"job {job_id} has no preview of frame {frame}", {"job_id": job_id, "frame": frame}
    )


@router.get("/{job_id}/outputs")
async def list_outputs(job_id: JobId, ctx: Ctx, request: Request) -> dict[str, Any]:
    """What the job's post-processing made (video, ...), with sizes and URLs; frame
    previews are under ``frames/{n}/thumbnail`` instead."""
    await ctx.store.status(job_id)
    prefix = layout.outputs_prefix(job_id)
    found = await asyncio.to_thread(ctx.storage.list, prefix)
    base = str(request.base_url).rstrip("/")
    outputs = []
    for key, size in found:
        name = key.removeprefix(prefix + "/")
        if name.startswith(("thumbnails/", "previews/")):
            continue
        outputs.append({"name": name, "size": size, "url": f"{base}/jobs/{job_id}/outputs/{name}"})
    return {"outputs": outputs}


_OUTPUT_MEDIA = {".mp4": "video/mp4", ".png": "image/png", ".json": "application/json"}


@router.get("/{job_id}/outputs/{name:path}", response_class=StreamingResponse)
async def get_output(job_id: JobId, name: str, ctx: Ctx) -> StreamingResponse:
    """One post-processing output's bytes (``video.mp4``, ...), streamed."""
    await ctx.store.status(job_id)
    check_path(name)
    key = f"{layout.outputs_prefix(job_id)}/{name}"
    try:
        size = await asyncio.to_thread(ctx.storage.size, key)
    except FileNotFoundError:
        raise NotFound(f"job {job_id} has no output {name!r}", {"name": name}) from None
    media = _OUTPUT_MEDIA.get(os.path.splitext(name)[1].lower(), "application/octet-stream")
    return StreamingResponse(
        ctx.storage.iter_bytes(key), media_type=media, headers={"Content-Length": str(size)}
    )


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) for one ``bytes=`` range of a ``size``-byte file, or None when it
    cannot be satisfied. Several ranges are not served (None too)."""
    m = _RANGE.match(header.strip())
    if m is None or (not m[1] and not m[2]):
        return None
    if not m[1]:  # the last N bytes
        n = int(m[2])
        return (max(0, size - n), size) if n > 0 and size > 0 else None
    start = int(m[1])
    end = min(size, int(m[2]) + 1) if m[2] else size
    return (start, end) if start < end else None
