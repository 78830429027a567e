"""``/scenes``: catalogue a scene folder (Blender version, cameras, frame ranges, ...)
and read a catalogue back."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from rayfarm.cluster.bodies import read_json
from rayfarm.cluster.context import Ctx, Submitter, Who
from rayfarm.cluster.routes.schemas import FOLDER, json_body
from rayfarm.cluster.submit import catalogue, check_blender, check_listing, check_stored
from rayfarm.errors import FarmUnavailable, InvalidRequest, SceneNotFound
from rayfarm.render.inputs import SHA256

__all__ = ["router"]

router = APIRouter(prefix="/scenes", tags=["scenes"])


@router.post(
    "",
    status_code=201,
    openapi_extra=json_body(
        {"type": "object", "required": ["main", "files"], "properties": FOLDER}
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


@router.get("/{scene_id}")
async def get_scene(scene_id: str, ctx: Ctx, _: Who) -> dict[str, Any]:
    """A catalogued scene, by id."""
    info = await ctx.store.scene_info(scene_id) if SHA256.match(scene_id) else None
    if info is None:
        raise SceneNotFound(f"no catalogued scene {scene_id}", {"scene_id": scene_id})
    return info
