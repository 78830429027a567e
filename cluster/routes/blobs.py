"""``/blobs``: the content-addressed files a job's folder is made of: which the farm
lacks, and uploading one (streamed, hash-checked, within the uploader's quota)."""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from typing import Any

from fastapi import APIRouter, Request

from rayfarm.cluster.auth import Principal
from rayfarm.cluster.bodies import limited, read_json
from rayfarm.cluster.context import AppContext, Ctx, Submitter
from rayfarm.cluster.routes.schemas import json_body
from rayfarm.cluster.submit import MAX_INPUT_FILES, store_blob
from rayfarm.errors import InvalidRequest, PayloadTooLarge
from rayfarm.render.inputs import SHA256, blob_key

__all__ = ["SPOOL_BYTES", "router"]

#: Uploads up to this size stay in memory while their hash is checked; larger spill to disk.
SPOOL_BYTES = 8 * 1024**2

router = APIRouter(prefix="/blobs", tags=["blobs"])


@router.post(
    "/missing",
    openapi_extra=json_body(
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


@router.put("/{sha256}", status_code=201)
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
