"""Taking a job in: the checks every submission passes before anything is stored
(spec, file listing, stored blobs, the main file's header, the Blender version that
renders it, scene and camera names against the scene's catalogue), and the job's
creation.

Used by ``POST /jobs`` (JSON listing or multipart .blend) and by the gRPC
``SubmitJob``, so both answer the same input with the same error.

A new scene is catalogued (opened with bpy by the farm's inspector) before its job is
queued only when the spec names a scene or camera to check against it; otherwise the
job is queued at once and the catalogue is made beside its first render (the render
does not wait for a second Blender to open the file first). Either way the
catalogue is made once per scene folder and says how long it took (``catalogue_s``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from datetime import UTC, datetime
from typing import IO, Any, BinaryIO

from starlette.datastructures import UploadFile

from rayfarm.blendfile import BlendHeader, BlendLimits, check_blend
from rayfarm.cluster.auth import Principal
from rayfarm.cluster.context import AppContext
from rayfarm.cluster.scheduling import check_dependencies
from rayfarm.cluster.storage import CHUNK_BYTES, Storage
from rayfarm.errors import (
    FarmError,
    Forbidden,
    InvalidRequest,
    InvalidScene,
    InvalidSpec,
    PayloadTooLarge,
)
from rayfarm.models import JobRecord, JobSpec, JobState, parse_spec
from rayfarm.render.inputs import SHA256, InputFile, Inputs, blob_key, check_path
from rayfarm.versions import Route, format_version, route

__all__ = [
    "MAX_INPUT_FILES",
    "catalogue",
    "check_blender",
    "check_listing",
    "check_rights",
    "check_scene",
    "check_size",
    "check_stored",
    "content_digest",
    "store_blob",
    "store_single",
    "submit_listing",
]

log = logging.getLogger("rayfarm.api")

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")
#: Most files one job's input folder may hold, and most hashes one question may ask.
MAX_INPUT_FILES = 10_000


async def submit_listing(ctx: AppContext, data: Any, who: Principal) -> JobRecord:
    """Queue a job described as ``{"spec", "main", "files"}`` (blobs already uploaded)
    for ``who``."""
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object with spec, main and files")
    unknown = sorted(set(data) - {"spec", "main", "files"})
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(unknown)}")
    spec = check_rights(who, check_size(ctx, parse_spec(data.get("spec"))))
    ctx.limits.check_priority(who, spec)
    inputs = check_listing(ctx, data.get("main"), data.get("files"))
    await check_dependencies(ctx, who, spec.depends_on)
    await ctx.limits.take_submission(who)
    # Held from the check to the job's creation: no deletion elsewhere takes them away.
    async with ctx.store.blobs.holding([(f.sha256, f.size) for f in inputs.files]):
        header = await asyncio.to_thread(check_stored, ctx, inputs)
        return await _create_job(ctx, spec, inputs, who.name, header)


def check_blender(ctx: AppContext, spec: JobSpec | None, header: BlendHeader) -> Route:
    """The Blender that renders a file saved by ``header``'s version, for ``spec`` (see
    ``rayfarm.versions``): refused (422) when the farm offers none that fits."""
    return route(header.version, spec.blender if spec else None, ctx.settings.blender)


def check_size(ctx: AppContext, spec: JobSpec) -> JobSpec:
    """Refuse a job with more tasks than the farm takes (``RAYFARM_MAX_TASKS``); 'auto'
    tiles and slices count as whole frames (the farm splits only jobs with fewer frames
    than actors)."""
    nx, ny = spec.tile_grid or (1, 1)
    slices = spec.slice_count or 1
    frames = len(spec.frame_list)
    tasks = frames * nx * ny * slices
    if tasks > ctx.settings.max_tasks:
        split = f"{nx * ny} tiles" + (f" x {slices} slices" if slices > 1 else "")
        raise InvalidSpec(
            f"this job would have {tasks} tasks ({frames} frames x {split}); the farm "
            f"takes at most {ctx.settings.max_tasks} per job (RAYFARM_MAX_TASKS)",
            {"tasks": tasks, "max_tasks": ctx.settings.max_tasks},
        )
    return spec


def check_rights(who: Principal, spec: JobSpec) -> JobSpec:
    """An artist submits only to projects they belong to (an admin, to any), and only
    an admin may run a file's Python (``scripts``)."""
    if spec.scripts and not who.is_admin:
        raise Forbidden(
            f"{who.name} is a {who.role.value}: only an admin may run a file's Python "
            "(scripts=true); the farm opens every .blend with auto-execution off",
            {"field": "scripts"},
        )
    if spec.project is not None and not who.is_admin and spec.project not in who.projects:
        raise Forbidden(
            f"{who.name} is not a member of project {spec.project}",
            {"project": spec.project},
        )
    return spec


def check_listing(ctx: AppContext, main: Any, files: Any) -> Inputs:
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
    _check_folders(seen)
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


def _check_folders(paths: dict[str, str]) -> None:
    """Refuse a listing in which one file's path is another's folder (``x`` and ``x/y``):
    no folder holds both, and the render node could not lay the job's folder out.
    ``paths``: every listed path, keyed case-folded."""
    for folded, path in paths.items():
        parts = folded.split("/")
        for i in range(1, len(parts)):
            file = paths.get("/".join(parts[:i]))
            if file is not None:
                raise InvalidRequest(
                    f"input {file!r} is a file, so {path!r} cannot be inside it: a path is "
                    "either a file or a folder",
                    {"path": file, "inside": path},
                )


def check_stored(ctx: AppContext, inputs: Inputs) -> BlendHeader:
    """Every blob stored with the listed size; the main file a whole .blend (its header
    returned)."""
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
        return check_blend(f, ctx.settings.blend_limits)


def check_scene(f: BinaryIO, limits: BlendLimits | None = None) -> BlendHeader:
    """Check the .blend in ``f`` (``check_blend``) and leave it at its start."""
    f.seek(0)
    try:
        return check_blend(f, limits)
    finally:
        f.seek(0)


async def store_single(
    ctx: AppContext, spec: JobSpec, scene: UploadFile, who: Principal, header: BlendHeader
) -> JobRecord:
    """A single-.blend upload for ``who`` (its ``header`` read already): the file becomes
    a blob and the job's input folder holds just it. Refused before anything is stored
    when the farm offers no Blender for it."""
    ctx.limits.check_priority(who, check_rights(who, check_size(ctx, spec)))
    check_blender(ctx, spec, header)
    await check_dependencies(ctx, who, spec.depends_on)
    name = _SAFE_NAME.sub("_", (scene.filename or "scene.blend").rsplit("/", 1)[-1])[:200]
    if not name.lower().endswith(".blend"):
        name = (name or "scene") + ".blend"
    digest, size = await asyncio.to_thread(content_digest, scene.file)
    # Held before it is stored: a deletion elsewhere must not take the blob meanwhile.
    async with ctx.store.blobs.holding([(digest, size)]):
        _, _, created = await asyncio.to_thread(_put_blob, ctx.storage, scene.file, (digest, size))
        inputs = Inputs(ctx.settings.storage, name, (InputFile(name, digest, size),))
        try:
            return await _create_job(ctx, spec, inputs, who.name, header)
        except FarmError as exc:
            # Refused after the upload was stored (a scene or camera the file lacks,
            # found by the farm's inspector, which reads the stored blob): a refused
            # upload leaves nothing. A blob that was there before is another job's, and
            # stays; so does one after a failure of the farm's own (5xx), which may come
            # after the job is made, and one another submission holds meanwhile.
            if created and exc.status < 500 and await ctx.store.blobs.held_once(digest):
                await asyncio.to_thread(_forget_blob, ctx.storage, digest)
            raise


async def catalogue(ctx: AppContext, inputs: Inputs, blender: str) -> dict[str, Any] | None:
    """The scene's catalogue entry: stored, or made now by the farm's inspector with
    Blender ``blender`` (the version that will render it; once per scene folder); None
    where the service runs without a farm to inspect with."""
    info = await ctx.store.scene_info(inputs.digest)
    if info is not None or ctx.inspect is None:
        return info
    beside = ctx.cataloguing.get(inputs.digest)
    if beside is not None:  # being made beside a job's render: that one, not a second
        info = await asyncio.shield(beside)
        if info is not None:
            return info
    return await _make_catalogue(ctx, inputs, blender)


def _catalogue_beside(ctx: AppContext, inputs: Inputs, blender: str) -> None:
    """Make the scene's catalogue in the background (a job of it is queued already),
    unless it is stored or being made. A failure is logged: the job reports its own."""
    if ctx.inspect is None or inputs.digest in ctx.cataloguing:
        return

    async def make() -> dict[str, Any] | None:
        try:
            if await ctx.store.scene_info(inputs.digest) is not None:
                return None
            return await _make_catalogue(ctx, inputs, blender)
        except Exception:
            log.info("could not catalogue scene %s", inputs.digest, exc_info=True)
            return None
        finally:
            ctx.cataloguing.pop(inputs.digest, None)

    ctx.cataloguing[inputs.digest] = asyncio.get_running_loop().create_task(make())


async def _make_catalogue(ctx: AppContext, inputs: Inputs, blender: str) -> dict[str, Any]:
    assert ctx.inspect is not None  # its callers look first: no Ray here, no catalogue
    started = time.perf_counter()
    try:
        info = await ctx.inspect(inputs, blender)
    except Exception as exc:
        cause: BaseException = exc
        while getattr(cause, "cause", None) is not None:  # Ray wraps, once per actor hop
            cause = cause.cause  # type: ignore[attr-defined]
        if isinstance(cause, FarmError):
            raise InvalidScene(str(cause.message), {"scene": inputs.main}) from None
        raise
    assert info is not None
    info = {**info, "catalogue_s": round(time.perf_counter() - started, 3)}
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


async def _create_job(
    ctx: AppContext, spec: JobSpec, inputs: Inputs, owner: str, header: BlendHeader
) -> JobRecord:
    chosen = check_blender(ctx, spec, header)
    names = spec.scene is not None or spec.camera is not None
    if names:  # checked against the catalogue before the job exists
        try:
            info = await catalogue(ctx, inputs, chosen.version)
        except InvalidScene:
            # bpy cannot open it: the job fails on the farm with the same message, so a
            # scene that only the farm's Blender refuses is reported where jobs report.
            info = None
        if info is not None:
            _check_names(spec, info)
    job_id = uuid.uuid4().hex[:16]
    # A job's webhook URL may hold the receiver's token: kept apart from the spec, which
    # everyone who may read the job sees.
    webhook, spec = spec.webhook, spec.model_copy(update={"webhook": None})
    if webhook is not None:
        await ctx.webhooks.secret(owner)  # what will sign its calls
    grid = spec.tile_grid  # None for 'auto': the dispatcher sets it and the task count
    nx, ny = grid or (1, 1)
    slices = spec.slice_count  # the same
    frames = spec.frame_list
    job = JobRecord(
        id=job_id,
        state=JobState.PENDING,
        owner=owner,
        spec=spec,
        scene_file=inputs.main,
        frames_total=len(frames),
        tasks_total=len(frames) * nx * ny * (slices or 1),
        tiles=None if grid is None else str(spec.tiles),
        slices=slices,
        saved_by=format_version(header.version),
        rendered_by=chosen.version,
        created_at=datetime.now(UTC),
    )
    # Blobs are shared by content, never a job's own: nothing to undo if this fails.
    warnings = [chosen.warning] if chosen.warning else []
    await ctx.store.create(job, inputs.to_json(), inputs.digest, warnings, webhook=webhook)
    if spec.scripts:
        # Recorded on its own (the request's record says only POST /jobs), to be found
        # with GET /audit?action=scripts+on.
        await ctx.auth.audit(who=owner, action="scripts on", job=job_id, outcome=201,
                             detail=f"job {job_id} runs the Python in {inputs.main}")  # fmt: skip
    ctx.nudge()
    if not names:
        _catalogue_beside(ctx, inputs, chosen.version)
    return job


def content_digest(src: IO[bytes]) -> tuple[str, int]:
    """(sha256, size) of a local file, read from its start."""
    sha = hashlib.sha256()
    size = 0
    src.seek(0)
    while block := src.read(CHUNK_BYTES):
        sha.update(block)
        size += len(block)
    return sha.hexdigest(), size


def store_blob(
    storage: Storage, src: IO[bytes], known: tuple[str, int] | None = None
) -> tuple[str, int]:
    """Store a local file as a blob (unless stored already); return (sha256, size)
    (``known``: those, computed already)."""
    digest, size, _ = _put_blob(storage, src, known)
    return digest, size


def _put_blob(
    storage: Storage, src: IO[bytes], known: tuple[str, int] | None = None
) -> tuple[str, int, bool]:
    """``store_blob``, and whether this call stored it (False: it was there already)."""
    digest, size = known or content_digest(src)
    key = blob_key(digest)
    if storage.exists(key) and storage.size(key) == size:
        return digest, size, False
    src.seek(0)
    storage.put_stream(key, src)
    return digest, size, True


def _forget_blob(storage: Storage, digest: str) -> None:
    try:
        storage.delete_prefix(blob_key(digest))
    except Exception:  # the refusal is what the client must hear; the blob is only space
        log.exception("could not remove the refused upload's blob %s", digest)
