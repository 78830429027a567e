"""The HTTP API (FastAPI). Served by Ray Serve (``rayfarm.cluster.serve``) and
usable as a plain ASGI app (``create_app``) for tools and tests.

Every ``FarmError`` becomes one status and a stable ``code`` in one handler; the
SDK turns that body back into the same class.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import rayfarm
from rayfarm.cluster import accounts, faults, lifecycle, observe, scheduling, web
from rayfarm.cluster import storage as layout
from rayfarm.cluster.accounts import AuditMiddleware, CrossSiteGuard, LocalHostGuard
from rayfarm.cluster.auth import Principal
from rayfarm.cluster.context import (
    AppContext,
    Ctx,
    JobId,
    Submitter,
    Who,
    check_may_change,
    limited,
    process_context,
    read_json,
    set_process_context,
)
from rayfarm.cluster.events import EVENT_ID
from rayfarm.cluster.submit import (
    MAX_INPUT_FILES,
    catalogue,
    check_blender,
    check_listing,
    check_scene,
    check_stored,
    store_blob,
    store_single,
    submit_listing,
)
from rayfarm.cluster.uploads import read_scene_upload
from rayfarm.errors import (
    FarmError,
    FarmUnavailable,
    FrameNotFound,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    SceneNotFound,
    TooManyRequests,
    UnsupportedMediaType,
)
from rayfarm.models import FrameInfo, Job, JobState, JobStatus, parse_spec
from rayfarm.render.inputs import SHA256, blob_key, check_path

__all__ = ["AppContext", "create_app", "set_process_context"]

log = logging.getLogger("rayfarm.api")

_MEDIA = {"png": "image/png", "exr": "image/x-exr"}
#: Uploads up to this size stay in memory while their hash is checked; larger spill to disk.
SPOOL_BYTES = 8 * 1024**2
#: Furthest a job listing may page (Redis ranges are 64-bit; no farm holds this many jobs).
MAX_OFFSET = 10**9
#: Longest a status long-poll may wait.
MAX_STATUS_WAIT_S = 30.0
#: How long a woken long-poll gathers further events before it answers.
STATUS_COALESCE_S = 0.05


jobs = APIRouter(prefix="/jobs", tags=["jobs"])

#: A scene folder of uploaded blobs, as ``POST /jobs`` and ``POST /scenes`` take it (the
#: bodies are read by hand, streamed and size-limited, so FastAPI cannot infer these).
_FOLDER = {
    "main": {"type": "string", "description": "the .blend to open"},
    "files": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["path", "sha256", "size"],
            "properties": {
                "path": {"type": "string"},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "size": {"type": "integer", "minimum": 0},
            },
        },
    },
}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@jobs.post(
    "",
    status_code=201,
    response_model=Job,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["spec", "main", "files"],
                        "properties": {
                            "spec": {"type": "object", "description": "JobSpec"},
                            **_FOLDER,
                        },
                    }
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["scene", "spec"],
                        "properties": {
                            "scene": {"type": "string", "format": "binary"},
                            "spec": {"type": "string", "description": "JobSpec as JSON"},
                        },
                    }
                },
            },
        }
    },
)
async def submit_job(request: Request, ctx: Ctx, who: Submitter) -> Job:
    """Queue a job: a scene folder uploaded as blobs, or a single .blend.

    JSON (``application/json``): ``spec``, ``main`` (the .blend to open) and ``files``
    (``path``, ``sha256``, ``size``) naming blobs uploaded with ``PUT /blobs/{sha256}``
    (``POST /blobs/missing`` says which the farm lacks). Every path must stay inside
    the job's folder; every blob must be stored.

    Multipart: a .blend (part ``scene``) with a JSON ``JobSpec`` (part ``spec``).

    Everything is checked before anything is stored: the spec, the paths, the main
    file's header and blocks, and its Blender version against the workers'. The job
    belongs to the submitter (an artist or admin) and, optionally, to a project of
    theirs (``spec.project``).
    """
    job = await _submit(request, ctx, who)
    request.state.job_id = job.id  # for the audit record
    return job


async def _submit(request: Request, ctx: AppContext, who: Principal) -> Job:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json":
        return await submit_listing(ctx, await read_json(request, "job description"), who)
    if media != "multipart/form-data":
        raise UnsupportedMediaType(
            f"POST /jobs takes application/json (a folder of uploaded blobs) or "
            f"multipart/form-data (a .blend and its spec), not content type {media or 'none'!r}",
            {"content_type": media},
        )
    await ctx.limits.take_submission(who)  # before the upload is read
    async with read_scene_upload(request, ctx.settings.max_upload_bytes) as upload:
        spec = parse_spec(upload.spec)
        scene = upload.scene
        header = await asyncio.to_thread(check_scene, scene.file, ctx.settings.blend_limits)
        return await store_single(ctx, spec, scene, who, header)


scenes = APIRouter(prefix="/scenes", tags=["scenes"])


@scenes.post(
    "",
    status_code=201,
    openapi_extra=_json_body(
        {"type": "object", "required": ["main", "files"], "properties": _FOLDER}
    ),
)
async def inspect_scene(request: Request, ctx: Ctx, _: Submitter) -> dict[str, Any]:
    """Catalogue a scene folder (JSON ``{"main", "files"}`` of uploaded blobs, as for a
    job): Blender version, scenes with cameras, frame ranges, resolution, engine,
    samples, view layers and passes, and its files. Made once per folder, with bpy and
    scripts off; its ``id`` is the folder's digest."""
    data = await read_json(request, "scene description")
    if not isinstance(data, dict) or set(data) != {"main", "files"}:
        raise InvalidRequest("the body must be a JSON object with exactly main and files")
    inputs = check_listing(ctx, data["main"], data["files"])
    header = await asyncio.to_thread(check_stored, ctx, inputs)
    info = await catalogue(ctx, inputs, check_blender(ctx, None, header).version)
    if info is None:
        raise FarmUnavailable("this service has no render actor to inspect scenes with")
    return info


@scenes.get("/{scene_id}")
async def get_scene(scene_id: str, ctx: Ctx, _: Who) -> dict[str, Any]:
    """A catalogued scene, by id."""
    info = await ctx.store.scene_info(scene_id) if SHA256.match(scene_id) else None
    if info is None:
        raise SceneNotFound(f"no catalogued scene {scene_id}", {"scene_id": scene_id})
    return info


blobs = APIRouter(prefix="/blobs", tags=["blobs"])


@blobs.post(
    "/missing",
    openapi_extra=_json_body(
        {
            "type": "object",
            "required": ["hashes"],
            "properties": {
                "hashes": {
                    "type": "array",
                    "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                }
            },
        }
    ),
)
async def missing_blobs(request: Request, ctx: Ctx, _: Submitter) -> dict[str, list[str]]:
    """Which of ``{"hashes": [sha256, ...]}`` the farm does not have (upload those)."""
    data = await read_json(request, "the question")
    hashes = data.get("hashes") if isinstance(data, dict) else None
    if not isinstance(hashes, list) or len(hashes) > MAX_INPUT_FILES:
        raise InvalidRequest(f"hashes must be a list of at most {MAX_INPUT_FILES} sha256s")
    for h in hashes:
        if not isinstance(h, str) or not SHA256.match(h):
            raise InvalidRequest(f"{h!r} is not a sha256 (64 lowercase hex digits)")
    unique = list(dict.fromkeys(hashes))
    stored = await asyncio.to_thread(lambda: [ctx.storage.exists(blob_key(h)) for h in unique])
    dying = await ctx.store.blobs.dying(unique)  # being deleted: upload them again
    return {"missing": [h for h, ok in zip(unique, stored, strict=True) if not ok or h in dying]}


@blobs.put("/{sha256}", status_code=201)
async def put_blob(sha256: str, request: Request, ctx: Ctx, who: Submitter) -> dict[str, Any]:
    """Upload one file by its SHA-256, streamed (the body is the file's bytes).

    The body spills to disk past a few MB, its hash is checked before it is stored,
    and it is refused (413) the moment it passes the upload limit. Until a job of the
    uploader's uses it, the blob counts against their upload quota
    (``RAYFARM_UPLOAD_QUOTA_BYTES``; 413 past it, naming it; admins have none) and is
    deleted ``RAYFARM_UPLOAD_GRACE_S`` after the upload.
    """
    if not SHA256.match(sha256):
        raise InvalidRequest(f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
    quota = 0 if who.is_admin else ctx.settings.upload_quota_bytes
    length = request.headers.get("content-length")
    if quota and length is not None and length.isdigit():
        pending = await ctx.store.blobs.pending_bytes(who.name)
        if pending + int(length) > quota:
            raise _over_quota(ctx, who, int(length), pending, quota)
    sha = hashlib.sha256()
    size = 0
    with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as spool:
        async for chunk in limited(request, ctx.settings.max_upload_bytes, "upload"):
            size += len(chunk)
            sha.update(chunk)
            spool.write(chunk)
        if sha.hexdigest() != sha256:
            raise InvalidRequest(
                f"the uploaded bytes hash to {sha.hexdigest()}, not {sha256}",
                {"sha256": sha256},
            )
        index = ctx.store.blobs
        upload = await index.register_upload(
            sha256, size, who.name, ctx.settings.upload_grace_s, quota
        )
        if not upload.ok:
            raise _over_quota(ctx, who, size, upload.pending_bytes, quota)
        spool.seek(0)
        try:
            digest, _ = await asyncio.to_thread(store_blob, ctx.storage, spool)
        except BaseException:
            await index.unregister_upload(sha256, size, who.name)
            raise
    await ctx.store.count(upload_bytes_total=size, upload_blobs_total=1)
    return {"sha256": digest, "size": size}


def _over_quota(ctx: AppContext, who: Principal, size: int, pending: int, quota: int) -> Exception:
    grace_h = ctx.settings.upload_grace_s / 3600
    return PayloadTooLarge(
        f"upload quota: {who.name} has {pending} bytes of uploads no job of theirs uses yet, "
        f"and this {size}-byte blob would pass the quota of {quota} bytes "
        f"(RAYFARM_UPLOAD_QUOTA_BYTES). Submit the jobs that use them; uploads no job uses "
        f"are deleted {grace_h:g} h after they were sent (RAYFARM_UPLOAD_GRACE_S)",
        {"quota": quota, "pending": pending, "size": size,
         "setting": "RAYFARM_UPLOAD_QUOTA_BYTES"},
    )  # fmt: skip


@jobs.get("")
async def list_jobs(
    ctx: Ctx,
    who: Who,
    state: JobState | None = None,
    owner: Annotated[str | None, Query(max_length=64)] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """The jobs the requester may see, newest first; filter by ``state`` and ``owner``;
    page with ``offset``/``limit``. Read through the owner and project indexes: a
    listing costs its page, however many jobs the farm holds."""
    scope = who.scope()
    if scope is not None or owner is not None:
        await ctx.ensure_indexes()
    found, total = await ctx.store.list_jobs(state, offset, limit, owner=owner, among=scope)
    return {"jobs": [j.model_dump(mode="json") for j in found], "total": total}


@jobs.get("/{job_id}", response_model=Job)
async def get_job(job_id: JobId, ctx: Ctx) -> Job:
    return await ctx.store.get(job_id)


@jobs.get("/{job_id}/status", response_model=JobStatus)
async def get_status(
    job_id: JobId,
    ctx: Ctx,
    after: Annotated[str | None, Query(pattern=EVENT_ID)] = None,
    wait_s: Annotated[float, Query(ge=0, le=MAX_STATUS_WAIT_S)] = 0,
) -> Response:
    """The compact status clients poll: state, frames and tasks done, error.

    Long-poll: with ``after`` (the ``event`` of a status you have) and ``wait_s``, the
    answer waits until the job changes or ``wait_s`` seconds pass.
    """
    status = await ctx.store.status(job_id)
    if after is None or wait_s <= 0 or status.state.is_terminal or status.event != after:
        return _status_json(status)
    if await ctx.hub.wait(job_id, after, wait_s):
        # Progress comes in bursts (a task, then its frame, ms apart): answer once for
        # the burst rather than once for each event.
        await asyncio.sleep(STATUS_COALESCE_S)
    return _status_json(await ctx.store.status(job_id))


def _status_json(status: JobStatus) -> Response:
    """The status as JSON, serialized once by pydantic-core: a returned Response skips
    FastAPI's re-validation against ``response_model`` (which stays for the schema)."""
    return Response(status.model_dump_json(), media_type="application/json")


@jobs.post("/{job_id}/cancel", response_model=Job)
async def cancel_job(job_id: JobId, ctx: Ctx, who: Who) -> Job:
    """PENDING or PROCESSING -> CANCELLED; queued tasks stop at once. The job's owner
    (an artist) or an admin."""
    return await lifecycle.cancel_job(ctx, who, job_id)


@jobs.post("/{job_id}/retry", response_model=Job)
async def retry_job(job_id: JobId, ctx: Ctx, who: Who) -> Job:
    """FAILED -> PENDING; only frames not yet stored are rendered again. The job's owner
    (an artist) or an admin."""
    return await lifecycle.retry_job(ctx, who, job_id)


@jobs.delete("/{job_id}")
async def delete_job(job_id: JobId, ctx: Ctx, who: Who) -> dict[str, Any]:
    """Delete a finished job (COMPLETED, FAILED or CANCELLED) and everything of it: its
    record, execution log and task state, its place in every listing and index, its
    frames, outputs and logs, and the blobs (inputs) no other job or pending upload
    keeps. The job's owner (an artist) or an admin; 409 for a PENDING or PROCESSING job
    (cancel it first). Answers what it freed: ``objects`` and ``bytes`` of the job's
    files, ``blobs`` and ``blob_bytes`` of its inputs."""
    await check_may_change(ctx, who, job_id)
    gone = await ctx.remover.delete_job(job_id)
    ctx.forget_owner(job_id)
    return gone.to_dict()


@jobs.get("/{job_id}/frames")
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


@jobs.get(
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


@jobs.get(
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


@jobs.get("/{job_id}/outputs")
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


@jobs.get("/{job_id}/outputs/{name:path}", response_class=StreamingResponse)
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


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(FarmError)
    async def farm_error(request: Request, exc: FarmError) -> JSONResponse:
        if exc.status >= 500:
            rid, new = faults.request_id(request.headers)
            cause = f" ({exc.__cause__!r})" if exc.__cause__ is not None else ""
            log.error("%s %s (request %s): %s%s", request.method, request.url.path, rid, exc,
                      cause)  # fmt: skip
            faults.with_request_id(exc, rid)
            headers = {faults.REQUEST_ID_HEADER: rid} if new else None
            return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)
        headers = None
        if isinstance(exc, TooManyRequests) and exc.retry_after_s is not None:
            headers = {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        err = InvalidRequest("invalid request: " + "; ".join(problems), {"errors": problems})
        return JSONResponse(err.to_body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = {"error": {"code": code, "message": str(exc.detail), "detail": {}}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The detail (exception, traceback, server paths) is for the log, under the
        # request's id; the client gets the id alone.
        rid, new = faults.request_id(request.headers)
        faults.log_unexpected(f"{request.method} {request.url.path}", rid, exc)
        if _is_redis_down(exc):
            err: FarmError = FarmUnavailable("the job store is unreachable", {"request_id": rid})
        else:
            err = faults.internal_error(rid)
        headers = {faults.REQUEST_ID_HEADER: rid} if new else None
        return JSONResponse(err.to_body(), status_code=err.status, headers=headers)


def _is_redis_down(exc: Exception) -> bool:
    import redis.exceptions

    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)


def create_app(ctx: AppContext | None = None) -> FastAPI:
    """The FastAPI app. Pass a context now, or set ``app.state.ctx`` before serving."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = getattr(app.state, "ctx", None) or process_context()
        # Every replica runs the housekeeping loop; one sweeps at a time (a Redis lock).
        # Every replica sends job-end webhooks; each end goes to one (a consumer group).
        loops = []
        if ctx is not None:
            loops = [
                asyncio.create_task(ctx.sweeper.run()),
                asyncio.create_task(ctx.notifier.run()),
            ]
        yield
        for loop in loops:
            loop.cancel()
        ctx = getattr(app.state, "ctx", None) or process_context()
        if ctx is not None:
            await ctx.close()

    app = FastAPI(
        lifespan=lifespan,
        title="rayfarm",
        version=rayfarm.__version__,
        description="A render farm for Blender built on Ray.",
    )
    app.state.ctx = ctx
    app.include_router(jobs)
    app.include_router(blobs)
    app.include_router(scenes)
    app.include_router(observe.router)
    app.include_router(accounts.router)
    app.include_router(scheduling.router)
    web.install(app)  # the web page at /, its files under /ui
    app.add_middleware(CrossSiteGuard)
    app.add_middleware(AuditMiddleware)  # it records what the cross-site guard refuses too
    # Outermost: on a farm without accounts, nothing (not even an audit record) for a
    # request a rebound DNS name made a browser send.
    app.add_middleware(LocalHostGuard)

    @app.get("/healthz", tags=["farm"])
    async def healthz(ctx: Ctx) -> dict[str, Any]:
        """Liveness, versions and workers: 200 when Redis answers, 503 otherwise.

        ``blender`` lists the Blender versions the farm offers, newest first. ``workers``
        counts the render actors by device (``{"CPU": 2}``, ``{"GPU (OPTIX: NVIDIA L4)":
        4}``), by the Blender version each runs now, and how many are busy; None when
        the dispatcher does not answer (starting, or this app runs without Ray)."""
        try:
            await ctx.store.ping()
        except Exception as exc:  # logged by the handler, with the request's id
            raise FarmUnavailable("the job store is unreachable") from exc
        stats = await observe.dispatcher_stats(ctx)
        workers = None
        if stats is not None:
            devices: dict[str, int] = {}
            versions: dict[str, int] = {}
            for actor in stats["actors"]:
                name = actor["device"] or "starting"
                devices[name] = devices.get(name, 0) + 1
                if actor.get("blender"):
                    versions[actor["blender"]] = versions.get(actor["blender"], 0) + 1
            busy = sum(bool(a["busy"]) for a in stats["actors"])
            workers = {"count": len(stats["actors"]), "busy": busy, "devices": devices,
                       "blender": versions}  # fmt: skip
        return {
            "status": "ok",
            "version": rayfarm.__version__,
            "blender": list(ctx.settings.blender),
            "storage": ctx.settings.storage,
            "workers": workers,
        }

    _install_handlers(app)
    return app
