"""The HTTP API (FastAPI). Served by Ray Serve (``rayfarm.cluster.serve``) and
usable as a plain ASGI app (``create_app``) for tools and tests.

Every ``FarmError`` becomes one status and a stable ``code`` in one handler; the
SDK turns that body back into the same class.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

import rayfarm
from rayfarm.blendfile import BlendHeader, check_blend, check_version
from rayfarm.cluster import storage as layout
from rayfarm.cluster.settings import Settings
from rayfarm.cluster.storage import CHUNK_BYTES, Storage
from rayfarm.cluster.store import JobStore
from rayfarm.errors import (
    FarmError,
    FarmUnavailable,
    FrameNotFound,
    InvalidRequest,
    InvalidScene,
    InvalidSpec,
    JobNotFound,
    NotFound,
    PayloadTooLarge,
    SceneNotFound,
)
from rayfarm.models import (
    FrameInfo,
    Job,
    JobSpec,
    JobState,
    JobStatus,
    check_transition,
    parse_spec,
)
from rayfarm.render.inputs import SHA256, InputFile, Inputs, blob_key, check_path

__all__ = ["AppContext", "create_app", "set_process_context"]

log = logging.getLogger("rayfarm.api")

_JOB_ID = re.compile(r"^[0-9a-f]{16}$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")
_MEDIA = {"png": "image/png", "exr": "image/x-exr"}
_MULTIPART_OVERHEAD_BYTES = 64 * 1024
#: Most files one job's input folder may hold, and most hashes one question may ask.
MAX_INPUT_FILES = 10_000
#: Largest JSON body a job submission (spec and file listing) may have.
MAX_MANIFEST_BYTES = 8 * 1024**2
#: Uploads up to this size stay in memory while their hash is checked; larger spill to disk.
SPOOL_BYTES = 8 * 1024**2
#: Longest a status long-poll may wait.
MAX_STATUS_WAIT_S = 30.0
#: How long a woken long-poll gathers further events before it answers.
STATUS_COALESCE_S = 0.05


@dataclass
class AppContext:
    """What the routes need: settings, the job store, storage, a dispatcher nudge."""

    settings: Settings
    store: JobStore = field(init=False)
    storage: Storage = field(init=False)
    notify: Any = None  # callable(job_id) or None: wakes the dispatcher
    inspect: Any = None  # async callable(Inputs) -> catalogue dict, or None (no Ray here)

    def __post_init__(self) -> None:
        self.store = JobStore.from_url(self.settings.redis_url)
        self.storage = Storage(self.settings.storage)

    def nudge(self) -> None:
        if self.notify is not None:
            try:
                self.notify()
            except Exception:  # the dispatcher also polls Redis; a lost nudge only delays
                log.warning("could not notify the dispatcher", exc_info=True)


_process_ctx: AppContext | None = None


def set_process_context(ctx: AppContext) -> None:
    """Give this process's app its context.

    Ray Serve runs a pickled copy of the FastAPI app, so a Serve deployment cannot
    reach ``app.state`` of the object it was declared with; it sets the context here.
    """
    global _process_ctx
    _process_ctx = ctx


def _ctx(request: Request) -> AppContext:
    ctx: AppContext | None = getattr(request.app.state, "ctx", None) or _process_ctx
    if ctx is None:
        raise FarmUnavailable("the service is still starting")
    return ctx


Ctx = Annotated[AppContext, Depends(_ctx)]


def _job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise JobNotFound(f"no job {job_id}", {"job_id": job_id})
    return job_id


JobId = Annotated[str, Depends(_job_id)]

jobs = APIRouter(prefix="/jobs", tags=["jobs"])


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
                            "main": {"type": "string", "description": "the .blend to open"},
                            "files": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["path", "sha256", "size"],
                                    "properties": {
                                        "path": {"type": "string"},
                                        "sha256": {"type": "string"},
                                        "size": {"type": "integer"},
                                    },
                                },
                            },
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
async def submit_job(request: Request, ctx: Ctx) -> Job:
    """Queue a job: a scene folder uploaded as blobs, or a single .blend.

    JSON (``application/json``): ``spec``, ``main`` (the .blend to open) and ``files``
    (``path``, ``sha256``, ``size``) naming blobs uploaded with ``PUT /blobs/{sha256}``
    (``POST /blobs/missing`` says which the farm lacks). Every path must stay inside
    the job's folder; every blob must be stored.

    Multipart: a .blend (part ``scene``) with a JSON ``JobSpec`` (part ``spec``).

    Everything is checked before anything is stored: the spec, the paths, the main
    file's header and blocks, and its Blender version against the workers'.
    """
    if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
        return await _submit_folder(request, ctx)
    limit = ctx.settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + _MULTIPART_OVERHEAD_BYTES:
        raise PayloadTooLarge(
            f"upload of {int(length)} bytes is over the farm's limit of {limit} bytes",
            {"limit": limit},
        )
    try:
        form = await request.form(max_files=1, max_fields=4)
    except Exception as exc:
        raise InvalidRequest(f"could not read the multipart form: {exc}") from exc
    try:
        raw_spec = form.get("spec")
        if not isinstance(raw_spec, str):
            raise InvalidRequest("missing form part 'spec' (the JobSpec as JSON)")
        spec = parse_spec(raw_spec)
        scene = form.get("scene")
        if not isinstance(scene, UploadFile):
            raise InvalidRequest("missing file part 'scene' (the .blend)")
        size = scene.size if scene.size is not None else await asyncio.to_thread(_size, scene.file)
        if size > limit:
            raise PayloadTooLarge(
                f"scene of {size} bytes is over the farm's limit of {limit} bytes",
                {"limit": limit},
            )
        header = await asyncio.to_thread(_check_scene, scene.file)
        check_version(header, ctx.settings.blender_version)
        return await _store_job(ctx, spec, scene)
    finally:
        await form.close()


async def _submit_folder(request: Request, ctx: Ctx) -> Job:
    data = await _read_json(request, "job description")
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object with spec, main and files")
    unknown = sorted(set(data) - {"spec", "main", "files"})
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(unknown)}")
    spec = parse_spec(data.get("spec"))
    inputs = _check_listing(ctx, data.get("main"), data.get("files"))
    await asyncio.to_thread(_check_stored, ctx, inputs)
    return await _create_job(ctx, spec, inputs)


def _check_listing(ctx: AppContext, main: Any, files: Any) -> Inputs:
    if not isinstance(files, list) or not files:
        raise InvalidRequest("files must be a non-empty list of {path, sha256, size}")
    if len(files) > MAX_INPUT_FILES:
        raise PayloadTooLarge(
            f"{len(files)} input files is over the farm's limit of {MAX_INPUT_FILES}",
            {"limit": MAX_INPUT_FILES},
        )
    seen: dict[str, str] = {}
    listed = []
    total = 0
    for item in files:
        if not isinstance(item, dict) or set(item) != {"path", "sha256", "size"}:
            raise InvalidRequest("each file must be exactly {path, sha256, size}")
        path, digest, size = item["path"], item["sha256"], item["size"]
        check_path(path)
        if not isinstance(digest, str) or not SHA256.match(digest):
            raise InvalidRequest(f"input {path!r}: sha256 must be 64 lowercase hex digits")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest(f"input {path!r}: size must be a non-negative integer")
        folded = path.casefold()
        if folded in seen:
            raise InvalidRequest(
                f"input {path!r} is listed twice (as {seen[folded]!r}; paths are compared "
                "ignoring case, as Windows and macOS artists' disks do)",
                {"path": path},
            )
        seen[folded] = path
        total += size
        listed.append(InputFile(path, digest, size))
    if total > ctx.settings.max_job_bytes:
        raise PayloadTooLarge(
            f"input files of {total} bytes are over the farm's limit of "
            f"{ctx.settings.max_job_bytes} bytes",
            {"limit": ctx.settings.max_job_bytes},
        )
    if not isinstance(main, str) or main not in {f.path for f in listed}:
        raise InvalidRequest(f"main {main!r} is not one of the listed files")
    if not main.lower().endswith(".blend"):
        raise InvalidRequest(f"main {main!r} is not a .blend file")
    return Inputs(ctx.settings.storage, main, tuple(listed))


def _check_stored(ctx: AppContext, inputs: Inputs) -> None:
    """Every blob stored with the listed size; the main file a .blend the workers open."""
    missing = []
    for f in inputs.files:
        key = blob_key(f.sha256)
        if not ctx.storage.exists(key):
            missing.append(f.path)
        elif ctx.storage.size(key) != f.size:
            raise InvalidRequest(
                f"input {f.path!r}: the stored blob has {ctx.storage.size(key)} bytes, "
                f"not {f.size}",
                {"path": f.path},
            )
    if missing:
        raise InvalidRequest(
            f"{len(missing)} input file(s) not uploaded: {', '.join(missing[:20])}"
            + (" ..." if len(missing) > 20 else "")
            + " (PUT /blobs/{sha256} first)",
            {"missing": missing},
        )
    main = next(f for f in inputs.files if f.path == inputs.main)
    with ctx.storage.fs.open(ctx.storage.path(blob_key(main.sha256)), "rb") as f:
        header = check_blend(f)
    check_version(header, ctx.settings.blender_version)


async def _limited(request: Request, limit: int, what: str) -> AsyncIterator[bytes]:
    """The request body's chunks, refused (413) by its Content-Length when that says it
    is too big, else the moment it passes ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(
            f"{what} of {int(length)} bytes is over the farm's limit of {limit} bytes",
            {"limit": limit},
        )
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"{what} is over the farm's limit of {limit} bytes", {"limit": limit}
            )
        yield chunk


async def _read_json(request: Request, what: str) -> Any:
    """The body as JSON, at most MAX_MANIFEST_BYTES (400 when it is not JSON)."""
    body = b"".join([c async for c in _limited(request, MAX_MANIFEST_BYTES, what)])
    try:
        return json.loads(body)
    except ValueError as exc:
        raise InvalidRequest(f"the body is not JSON: {exc}") from None


def _size(f: IO[bytes]) -> int:
    f.seek(0, 2)
    n = f.tell()
    f.seek(0)
    return n


def _check_scene(f: IO[bytes]) -> BlendHeader:
    f.seek(0)
    try:
        return check_blend(f)
    finally:
        f.seek(0)


async def _store_job(ctx: AppContext, spec: JobSpec, scene: UploadFile) -> Job:
    """A single-.blend upload: the file becomes a blob and the job's input folder
    holds just it."""
    name = _SAFE_NAME.sub("_", (scene.filename or "scene.blend").rsplit("/", 1)[-1])[:200]
    if not name.lower().endswith(".blend"):
        name = (name or "scene") + ".blend"
    digest, size = await asyncio.to_thread(_put_blob, ctx.storage, scene.file)
    inputs = Inputs(ctx.settings.storage, name, (InputFile(name, digest, size),))
    return await _create_job(ctx, spec, inputs)


async def _catalogue(ctx: AppContext, inputs: Inputs) -> dict[str, Any] | None:
    """The scene's catalogue entry: stored, or made now by the farm's inspector (once
    per scene folder); None where the service runs without a farm to inspect with."""
    info = await ctx.store.scene_info(inputs.digest)
    if info is not None or ctx.inspect is None:
        return info
    try:
        info = await ctx.inspect(inputs)
    except Exception as exc:
        cause: BaseException = exc
        while getattr(cause, "cause", None) is not None:  # Ray wraps, once per actor hop
            cause = cause.cause  # type: ignore[attr-defined]
        if isinstance(cause, FarmError):
            raise InvalidScene(str(cause.message), {"scene": inputs.main}) from None
        raise
    assert info is not None
    await ctx.store.set_scene_info(inputs.digest, info)
    return info


def _check_names(spec: JobSpec, info: dict[str, Any]) -> None:
    """Refuse a spec naming a scene or camera the file lacks, listing the choices."""
    scenes = {s["name"]: s for s in info["scenes"]}
    name = spec.scene or info["active_scene"]
    if name not in scenes:
        raise InvalidSpec(
            f"the file has no scene {name!r} (it has: {', '.join(scenes)})",
            {"field": "scene", "choices": list(scenes)},
        )
    cameras = scenes[name]["cameras"]
    if spec.camera is not None and spec.camera not in cameras:
        raise InvalidSpec(
            f"scene {name!r} has no camera {spec.camera!r} (cameras: "
            f"{', '.join(cameras) or 'none'})",
            {"field": "camera", "choices": cameras},
        )


async def _create_job(ctx: AppContext, spec: JobSpec, inputs: Inputs) -> Job:
    try:
        info = await _catalogue(ctx, inputs)
    except InvalidScene:
        # bpy cannot open it: the job fails on the farm with the same message, so a
        # scene that only the farm's Blender refuses is reported where jobs report.
        info = None
    if info is not None:
        _check_names(spec, info)
    job_id = uuid.uuid4().hex[:16]
    grid = spec.tile_grid  # None for 'auto': the dispatcher sets it and the task count
    nx, ny = grid or (1, 1)
    frames = spec.frame_list
    job = Job(
        id=job_id,
        state=JobState.PENDING,
        owner="local",
        spec=spec,
        scene_file=inputs.main,
        frames_total=len(frames),
        tasks_total=len(frames) * nx * ny,
        tiles=None if grid is None else str(spec.tiles),
        created_at=datetime.now(UTC),
    )
    # Blobs are shared by content, never a job's own: nothing to undo if this fails.
    await ctx.store.create(job, inputs.to_json(), inputs.digest)
    ctx.nudge()
    return job


def _put_blob(storage: Storage, src: IO[bytes]) -> tuple[str, int]:
    """Store a local file as a blob (unless stored already); return (sha256, size)."""
    sha = hashlib.sha256()
    size = 0
    src.seek(0)
    while block := src.read(CHUNK_BYTES):
        sha.update(block)
        size += len(block)
    digest = sha.hexdigest()
    key = blob_key(digest)
    if not storage.exists(key) or storage.size(key) != size:
        src.seek(0)
        storage.put_stream(key, src)
    return digest, size


scenes = APIRouter(prefix="/scenes", tags=["scenes"])


@scenes.post("", status_code=201)
async def inspect_scene(request: Request, ctx: Ctx) -> dict[str, Any]:
    """Catalogue a scene folder (JSON ``{"main", "files"}`` of uploaded blobs, as for a
    job): Blender version, scenes with cameras, frame ranges, resolution, engine,
    samples, view layers and passes, and its files. Made once per folder, with bpy and
    scripts off; its ``id`` is the folder's digest."""
    data = await _read_json(request, "scene description")
    if not isinstance(data, dict) or set(data) != {"main", "files"}:
        raise InvalidRequest("the body must be a JSON object with exactly main and files")
    inputs = _check_listing(ctx, data["main"], data["files"])
    await asyncio.to_thread(_check_stored, ctx, inputs)
    info = await _catalogue(ctx, inputs)
    if info is None:
        raise FarmUnavailable("this service has no render actor to inspect scenes with")
    return info


@scenes.get("/{scene_id}")
async def get_scene(scene_id: str, ctx: Ctx) -> dict[str, Any]:
    """A catalogued scene, by id."""
    info = await ctx.store.scene_info(scene_id) if SHA256.match(scene_id) else None
    if info is None:
        raise SceneNotFound(f"no catalogued scene {scene_id}", {"scene_id": scene_id})
    return info


blobs = APIRouter(prefix="/blobs", tags=["blobs"])


@blobs.post("/missing")
async def missing_blobs(request: Request, ctx: Ctx) -> dict[str, list[str]]:
    """Which of ``{"hashes": [sha256, ...]}`` the farm does not have (upload those)."""
    data = await _read_json(request, "the question")
    hashes = data.get("hashes") if isinstance(data, dict) else None
    if not isinstance(hashes, list) or len(hashes) > MAX_INPUT_FILES:
        raise InvalidRequest(f"hashes must be a list of at most {MAX_INPUT_FILES} sha256s")
    for h in hashes:
        if not isinstance(h, str) or not SHA256.match(h):
            raise InvalidRequest(f"{h!r} is not a sha256 (64 lowercase hex digits)")
    unique = list(dict.fromkeys(hashes))
    stored = await asyncio.to_thread(lambda: [ctx.storage.exists(blob_key(h)) for h in unique])
    return {"missing": [h for h, ok in zip(unique, stored, strict=True) if not ok]}


@blobs.put("/{sha256}", status_code=201)
async def put_blob(sha256: str, request: Request, ctx: Ctx) -> dict[str, Any]:
    """Upload one file by its SHA-256, streamed (the body is the file's bytes).

    The body spills to disk past a few MB, its hash is checked before it is stored,
    and it is refused (413) the moment it passes the upload limit.
    """
    if not SHA256.match(sha256):
        raise InvalidRequest(f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
    sha = hashlib.sha256()
    size = 0
    with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as spool:
        async for chunk in _limited(request, ctx.settings.max_upload_bytes, "upload"):
            size += len(chunk)
            sha.update(chunk)
            spool.write(chunk)
        if sha.hexdigest() != sha256:
            raise InvalidRequest(
                f"the uploaded bytes hash to {sha.hexdigest()}, not {sha256}",
                {"sha256": sha256},
            )
        spool.seek(0)
        digest, _ = await asyncio.to_thread(_put_blob, ctx.storage, spool)
    return {"sha256": digest, "size": size}


@jobs.get("")
async def list_jobs(
    ctx: Ctx,
    state: JobState | None = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """Jobs, newest first; filter by ``state``; page with ``offset``/``limit``."""
    found, total = await ctx.store.list_jobs(state, offset, limit)
    return {"jobs": [j.model_dump(mode="json") for j in found], "total": total}


@jobs.get("/{job_id}", response_model=Job)
async def get_job(job_id: JobId, ctx: Ctx) -> Job:
    return await ctx.store.get(job_id)


@jobs.get("/{job_id}/status", response_model=JobStatus)
async def get_status(
    job_id: JobId,
    ctx: Ctx,
    after: Annotated[str | None, Query(pattern=r"^\d+-\d+$")] = None,
    wait_s: Annotated[float, Query(ge=0, le=MAX_STATUS_WAIT_S)] = 0,
) -> JobStatus:
    """The compact status clients poll: state, frames and tasks done, error.

    Long-poll: with ``after`` (the ``event`` of a status you have) and ``wait_s``, the
    answer waits until the job changes or ``wait_s`` seconds pass.
    """
    status = await ctx.store.status(job_id)
    if after is None or wait_s <= 0 or status.state.is_terminal or status.event != after:
        return status
    if await ctx.store.wait_for_event(job_id, after, wait_s):
        # Progress comes in bursts (a task, then its frame, ms apart): answer once for
        # the burst rather than once for each event.
        await asyncio.sleep(STATUS_COALESCE_S)
    return await ctx.store.status(job_id)


@jobs.post("/{job_id}/cancel", response_model=Job)
async def cancel_job(job_id: JobId, ctx: Ctx) -> Job:
    """PENDING or PROCESSING -> CANCELLED; queued tasks stop at once."""
    await ctx.store.transition(job_id, JobState.CANCELLED)
    ctx.nudge()
    return await ctx.store.get(job_id)


@jobs.post("/{job_id}/retry", response_model=Job)
async def retry_job(job_id: JobId, ctx: Ctx) -> Job:
    """FAILED -> PENDING; only frames not yet stored are rendered again."""
    status = await ctx.store.status(job_id)
    check_transition(job_id, status.state, JobState.PENDING)
    await ctx.store.reset_incomplete(job_id)
    await ctx.store.transition(job_id, JobState.PENDING)
    ctx.nudge()
    return await ctx.store.get(job_id)


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
    through the scene's view transform), made when the frame landed."""
    await ctx.store.status(job_id)  # 404 for an unknown job
    key = layout.thumbnail_key(job_id, frame)
    try:
        data = await asyncio.to_thread(ctx.storage.read_bytes, key)
    except FileNotFoundError:
        raise FrameNotFound(
            f"job {job_id} has no preview of frame {frame}", {"job_id": job_id, "frame": frame}
        ) from None
    return Response(data, media_type="image/png")


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
        if name.startswith("thumbnails/"):
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
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(exc.to_body(), status_code=exc.status)

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
        log.exception("%s %s failed", request.method, request.url.path)
        if _is_redis_down(exc):
            err: FarmError = FarmUnavailable(f"the job store is unreachable: {exc}")
        else:
            err = FarmError(f"internal error: {type(exc).__name__}: {exc}")
        return JSONResponse(err.to_body(), status_code=err.status)


def _is_redis_down(exc: Exception) -> bool:
    import redis.exceptions

    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)


def create_app(ctx: AppContext | None = None) -> FastAPI:
    """The FastAPI app. Pass a context now, or set ``app.state.ctx`` before serving."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        ctx = getattr(app.state, "ctx", None) or _process_ctx
        if ctx is not None:
            await ctx.store.close()

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

    @app.get("/healthz", tags=["farm"])
    async def healthz(ctx: Ctx) -> dict[str, Any]:
        """Liveness and versions: 200 when Redis answers, 503 otherwise."""
        try:
            await ctx.store.redis.ping()
        except Exception as exc:
            raise FarmUnavailable(f"the job store is unreachable: {exc}") from exc
        major, minor = ctx.settings.blender_version
        return {
            "status": "ok",
            "version": rayfarm.__version__,
            "blender": f"{major}.{minor}",
            "storage": ctx.settings.storage,
        }

    _install_handlers(app)
    return app
