"""What admins and users set about scheduling, over HTTP: project weights (fair share),
quotas (kept by ``rayfarm.cluster.policy``), urgent jobs and job dependencies. The
scheduler (``rayfarm.cluster.scheduler``) applies them; the dispatcher reads them every
round.

- ``GET /shares``, ``PUT /shares/{project}`` ``{"weight": 3}``, ``DELETE`` (admins set;
  anyone signed in reads): at equal priority, projects' running slots converge to their
  weights. A project nobody weighted weighs 1 (jobs without a project share as one).
- ``GET /quotas``, ``PUT /quotas/{user|project}/{name}`` ``{"gpu": 8, "cpu": null}``,
  ``DELETE``: the most slots of each kind a user's or a project's jobs hold at once.
- ``POST /jobs/{id}/urgent`` ``{"urgent": true}`` (admins): the job renders before every
  share's work.
- ``PUT /jobs/{id}/depends_on`` ``{"depends_on": [...]}``: a queued job's dependencies,
  changed by its owner or an admin; checked as at submission, cycles included.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import APIRouter, Request

from rayfarm.cluster.auth import Principal, check_name
from rayfarm.cluster.bodies import read_json
from rayfarm.cluster.context import Admin, AppContext, Ctx, JobId, Who, check_may_change
from rayfarm.cluster.policy import SCOPES
from rayfarm.cluster.scheduler import Quota
from rayfarm.errors import InvalidRequest, InvalidSpec, InvalidTransition
from rayfarm.models import JobRecord, JobState, parse_spec

__all__ = ["MAX_WEIGHT", "check_dependencies", "router"]

router = APIRouter(tags=["scheduling"])

#: The largest weight a project may have (the smallest is above 0).
MAX_WEIGHT = 1000.0
#: The most slots a quota may name (more is no limit at all).
MAX_QUOTA = 1_000_000
#: Most jobs a dependency check walks before it gives up (a chain longer is refused).
MAX_WALK = 10_000


async def check_dependencies(
    ctx: AppContext, who: Principal, depends_on: tuple[str, ...] | None, job_id: str | None = None
) -> None:
    """Refuse (422) dependencies ``who`` may not have: a job that does not exist or that
    ``who`` may not see (the same answer: ids do not leak), one that FAILED or was
    CANCELLED (the job could never start), and, for an existing job ``job_id`` whose
    dependencies change, one that waits for ``job_id`` itself (a cycle)."""
    if not depends_on:
        return
    for dep in depends_on:
        found = await ctx.owner_of(dep)
        if found is None or not who.can_read(*found):
            raise InvalidSpec(f"depends_on: no job {dep}", {"field": "depends_on", "job_id": dep})
    states = await ctx.store.states(depends_on)
    for dep in depends_on:
        if states[dep] in (JobState.FAILED, JobState.CANCELLED):
            raise InvalidSpec(
                f"depends_on: job {dep} is {states[dep]}, so this job could never start "
                f"(retry {dep} first, or leave it out)",
                {"field": "depends_on", "job_id": dep, "state": states[dep]},
            )
    if job_id is not None:
        cycle = await _cycle(ctx, job_id, depends_on)
        if cycle:
            raise InvalidSpec(
                "depends_on: a dependency cycle: " + " -> ".join(cycle)
                + " (a job cannot wait, even through others, for itself)",
                {"field": "depends_on", "cycle": cycle},
            )  # fmt: skip


async def _cycle(ctx: AppContext, job_id: str, depends_on: tuple[str, ...]) -> list[str]:
    """The path ``job_id`` -> ... -> ``job_id`` if ``job_id`` waiting for ``depends_on``
    would close a cycle, else []. Breadth first, one round trip per level."""
    parent: dict[str, str] = {dep: job_id for dep in depends_on}
    level = list(depends_on)
    while level:
        if job_id in level:
            path = [job_id]
            node = parent[job_id]
            while node != job_id:
                path.append(node)
                node = parent[node]
            return [job_id, *reversed(path[1:]), job_id]
        if len(parent) > MAX_WALK:
            raise InvalidSpec(
                f"depends_on: the chain of dependencies is longer than {MAX_WALK} jobs",
                {"field": "depends_on"},
            )
        specs = await ctx.store.specs(level)
        following = []
        for node, spec in zip(level, specs, strict=True):
            for dep in (json.loads(spec).get("depends_on") or []) if spec else []:
                if dep not in parent:
                    parent[dep] = node
                    following.append(dep)
        level = following
    return []


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its JSON by hand (``read_json``)."""
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"content": {"application/json": {"schema": schema}}}}


# -- shares ----------------------------------------------------------------------------------


@router.get("/shares")
async def list_shares(ctx: Ctx, _: Who) -> dict[str, Any]:
    """Each weighted project's fair-share weight (unlisted projects weigh 1)."""
    return {"shares": await ctx.policies.shares()}


@router.put(
    "/shares/{project}",
    openapi_extra=_body({"weight": {"type": "number", "exclusiveMinimum": 0}}, ["weight"]),
)
async def set_share(project: str, request: Request, ctx: Ctx, _: Admin) -> dict[str, Any]:
    """Weigh a project (admins): ``{"weight": 3}``, above 0, at most ``MAX_WEIGHT``. At
    equal priority, projects' running slots converge to their weights."""
    check_name(project, "project")
    data = await read_json(request, "share")
    weight = data.get("weight") if isinstance(data, dict) and set(data) == {"weight"} else None
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise InvalidRequest('the body is {"weight": W}, a number', {"field": "weight"})
    if not (0 < weight <= MAX_WEIGHT) or not math.isfinite(weight):
        raise InvalidRequest(
            f"weight {weight}: above 0 and at most {MAX_WEIGHT:g}", {"field": "weight"}
        )
    await ctx.policies.set_share(project, float(weight))
    ctx.nudge()
    return {"project": project, "weight": float(weight)}


@router.delete("/shares/{project}")
async def drop_share(project: str, ctx: Ctx, _: Admin) -> dict[str, Any]:
    """Back to the default weight, 1 (admins)."""
    check_name(project, "project")
    await ctx.policies.set_share(project, None)
    ctx.nudge()
    return {"project": project, "weight": 1.0}


# -- quotas ----------------------------------------------------------------------------------


@router.get("/quotas")
async def list_quotas(ctx: Ctx, _: Who) -> dict[str, Any]:
    """Every quota: ``{"user": {name: {"gpu", "cpu"}}, "project": {...}}`` (null: none)."""
    return {"quotas": await ctx.policies.quotas()}


@router.put(
    "/quotas/{scope}/{name}",
    openapi_extra=_body(
        {k: {"type": ["integer", "null"], "minimum": 0} for k in ("gpu", "cpu")}, []
    ),
)
async def set_quota(scope: str, name: str, request: Request, ctx: Ctx, _: Admin) -> dict[str, Any]:
    """Limit the slots a user's or project's jobs hold at once (admins): ``{"gpu": 8,
    "cpu": 4}``; a kind left out or null has no limit. Work over it waits, saying so."""
    _check_scope(scope, name)
    data = await read_json(request, "quota")
    if not isinstance(data, dict) or not data or not set(data) <= {"gpu", "cpu"}:
        raise InvalidRequest('the body is {"gpu": N, "cpu": N} (either may be left out)')
    limits: dict[str, int | None] = {}
    for kind in ("gpu", "cpu"):
        value = data.get(kind)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_QUOTA
        ):
            raise InvalidRequest(
                f"{kind}: a number of slots from 0 to {MAX_QUOTA}, or null for no limit",
                {"field": kind},
            )
        limits[kind] = value
    await ctx.policies.set_quota(scope, name, Quota(**limits))
    ctx.nudge()
    return {"scope": scope, "name": name, **limits}


@router.delete("/quotas/{scope}/{name}")
async def drop_quota(scope: str, name: str, ctx: Ctx, _: Admin) -> dict[str, Any]:
    """Remove a quota (admins)."""
    _check_scope(scope, name)
    await ctx.policies.set_quota(scope, name, None)
    ctx.nudge()
    return {"scope": scope, "name": name, "gpu": None, "cpu": None}


def _check_scope(scope: str, name: str) -> None:
    if scope not in SCOPES:
        raise InvalidRequest(f"quotas are per user or per project, not {scope!r}")
    check_name(name, scope)


# -- a job's place ---------------------------------------------------------------------------


@router.post(
    "/jobs/{job_id}/urgent",
    response_model=JobRecord,
    openapi_extra=_body({"urgent": {"type": "boolean"}}, ["urgent"]),
)
async def mark_urgent(job_id: JobId, request: Request, ctx: Ctx, _: Admin) -> JobRecord:
    """Mark a job urgent, or not (admins): ``{"urgent": true}`` (an empty body: true).
    An urgent job starts and renders before every share's work, at any priority."""
    urgent = True
    if request.headers.get("content-length", "0") != "0":
        data = await read_json(request, "the mark")
        if (
            not isinstance(data, dict)
            or set(data) != {"urgent"}
            or not isinstance(data["urgent"], bool)
        ):
            raise InvalidRequest('the body is {"urgent": true} or {"urgent": false}')
        urgent = data["urgent"]
    await ctx.store.set_urgent(job_id, urgent)
    ctx.nudge()
    return await ctx.store.get(job_id)


@router.put(
    "/jobs/{job_id}/depends_on",
    response_model=JobRecord,
    openapi_extra=_body(
        {"depends_on": {"type": "array", "items": {"type": "string"}}}, ["depends_on"]
    ),
)
async def set_dependencies(job_id: JobId, request: Request, ctx: Ctx, who: Who) -> JobRecord:
    """Change what a queued (PENDING) job waits for: ``{"depends_on": [id, ...]}`` (empty:
    nothing). Its owner (an artist) or an admin; checked as at submission, and a change
    that would make a job wait, through others, for itself is refused (422)."""
    await check_may_change(ctx, who, job_id)
    data = await read_json(request, "dependencies")
    if not isinstance(data, dict) or set(data) != {"depends_on"}:
        raise InvalidRequest('the body is {"depends_on": [job id, ...]}')
    job = await ctx.store.get(job_id)
    if job.state is not JobState.PENDING:
        raise InvalidTransition(
            f"job {job_id} is {job.state}: only a queued (PENDING) job's dependencies change",
            {"job_id": job_id, "state": str(job.state)},
        )
    spec = parse_spec({**job.spec.model_dump(mode="json"), "depends_on": data["depends_on"]})
    await check_dependencies(ctx, who, spec.depends_on, job_id)
    await ctx.store.replace_pending_spec(job_id, spec)
    ctx.nudge()
    return await ctx.store.get(job_id)
