"""``/jobs``: submit, list, read, follow the status of, cancel, retry and delete jobs.
Frames and outputs of a job are ``rayfarm.cluster.routes.frames``'s."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from rayfarm.cluster import lifecycle
from rayfarm.cluster.auth import Principal
from rayfarm.cluster.bodies import read_json
from rayfarm.cluster.context import AppContext, Ctx, JobId, Submitter, Who, check_may_change
from rayfarm.cluster.events import EVENT_ID
from rayfarm.cluster.routes.schemas import FOLDER
from rayfarm.cluster.submit import check_scene, store_single, submit_listing
from rayfarm.cluster.uploads import read_scene_upload
from rayfarm.errors import UnsupportedMediaType
from rayfarm.models import JobRecord, JobState, JobStatus, parse_spec

__all__ = ["MAX_OFFSET", "MAX_STATUS_WAIT_S", "STATUS_COALESCE_S", "router"]

#: Furthest a job listing may page (Redis ranges are 64-bit; no farm holds this many jobs).
MAX_OFFSET = 10**9
#: Longest a status long-poll may wait.
MAX_STATUS_WAIT_S = 30.0
#: How long a woken long-poll gathers further events before it answers.
STATUS_COALESCE_S = 0.05

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=201,
    response_model=JobRecord,
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
                            **FOLDER,
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
async def submit_job(request: Request, ctx: Ctx, who: Submitter) -> JobRecord:
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


async def _submit(request: Request, ctx: AppContext, who: Principal) -> JobRecord:
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


@router.get("")
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


@router.get("/{job_id}", response_model=JobRecord)
async def get_job(job_id: JobId, ctx: Ctx) -> JobRecord:
    return await ctx.store.get(job_id)


@router.get("/{job_id}/status", response_model=JobStatus)
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


@router.post("/{job_id}/cancel", response_model=JobRecord)
async def cancel_job(job_id: JobId, ctx: Ctx, who: Who) -> JobRecord:
    """PENDING or PROCESSING -> CANCELLED; queued tasks stop at once. The job's owner
    (an artist) or an admin."""
    return await lifecycle.cancel_job(ctx, who, job_id)


@router.post("/{job_id}/retry", response_model=JobRecord)
async def retry_job(job_id: JobId, ctx: Ctx, who: Who) -> JobRecord:
    """FAILED -> PENDING; only frames not yet stored are rendered again. The job's owner
    (an artist) or an admin."""
    return await lifecycle.retry_job(ctx, who, job_id)


@router.delete("/{job_id}")
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
