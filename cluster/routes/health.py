"""``/healthz``: liveness, versions and workers, for load balancers and people."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

import rayfarm
from rayfarm.cluster import observe
from rayfarm.cluster.context import Ctx
from rayfarm.errors import FarmUnavailable

__all__ = ["router"]

router = APIRouter()


@router.get("/healthz", tags=["farm"])
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
