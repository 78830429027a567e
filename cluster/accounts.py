"""Accounts over HTTP: who am I, users, tokens, webhooks, the audit log, and the
middleware that audits every state-changing request.

``GET``/``PUT``/``DELETE /webhook``: the signed-in user's job-end webhook and its signing
secret (``rayfarm.cluster.notifier`` calls it). ``POST /tokens`` (admin) creates a token
for a user, creating or updating the user when a role is given (``rayfarm token create
--user NAME --role ROLE``); ``GET /users`` and ``GET /audit`` are for admins; ``GET
/whoami`` tells any signed-in user its name, role and projects. ``CrossSiteGuard``
refuses state changes a browser sends on another site's behalf; ``LocalHostGuard``
refuses, on a farm without accounts, requests a browser was tricked into sending by DNS
rebinding.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Query, Request

from rayfarm.cluster.auth import Role, check_name
from rayfarm.cluster.bodies import read_json
from rayfarm.cluster.context import (
    Admin,
    AppContext,
    Ctx,
    Submitter,
    Who,
    process_context,
    scope_address,
)
from rayfarm.errors import Forbidden, InvalidRequest
from rayfarm.models import check_webhook_url

__all__ = ["AuditMiddleware", "CrossSiteGuard", "LocalHostGuard", "is_loopback_host", "router"]

log = logging.getLogger("rayfarm.audit")

router = APIRouter(tags=["accounts"])

#: Methods that change nothing: not audited (sign-in failures are, by the auth check).
_READS = frozenset({"GET", "HEAD", "OPTIONS"})


@router.get("/whoami")
async def whoami(who: Who) -> dict[str, Any]:
    """The signed-in user: name, role and projects."""
    return {"user": who.name, "role": who.role.value, "projects": sorted(who.projects)}


@router.get("/users")
async def list_users(ctx: Ctx, _: Admin) -> dict[str, Any]:
    """Every user with its role and projects (admins only)."""
    return {"users": await ctx.auth.users()}


@router.post("/tokens", status_code=201)
async def create_token(request: Request, ctx: Ctx, _: Admin) -> dict[str, Any]:
    """A new API token for ``user`` (admins only). With ``role`` (viewer, artist, admin)
    the user is created, or its role and ``projects`` set; without, it must exist. The
    token is shown once: the farm keeps only its hash."""
    data = await read_json(request, "token request")
    if not isinstance(data, dict) or not set(data) <= {"user", "role", "projects", "label"}:
        raise InvalidRequest(
            "the body is a JSON object of user, and optionally role, projects, label"
        )
    user = check_name(data.get("user"))
    projects = data.get("projects")
    if projects is not None and not (
        isinstance(projects, list) and all(isinstance(p, str) for p in projects)
    ):
        raise InvalidRequest("projects must be a list of project names")
    label = data.get("label") or ""
    if not isinstance(label, str):
        raise InvalidRequest("label must be a string")
    if data.get("role") is not None:
        try:
            role = Role(data["role"])
        except ValueError:
            raise InvalidRequest(
                f"role {data['role']!r}: one of viewer, artist, admin", {"field": "role"}
            ) from None
        await ctx.auth.put_user(user, role, projects)
    elif projects is not None:
        raise InvalidRequest("projects are set with the user's role: give role too")
    token = await ctx.auth.create_token(user, label)
    record = await ctx.auth.user(user)
    assert record is not None
    return {"user": user, "role": record["role"], "projects": record["projects"], "token": token}


@router.get("/audit")
async def audit_log(
    ctx: Ctx,
    _: Admin,
    user: str | None = None,
    action: str | None = None,
    job: str | None = None,
    since: Annotated[str | None, Query(description="ISO time, e.g. 2026-11-23T00:00")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """The audit log, newest first (admins only): every state-changing request and every
    failed sign-in, with who, role, action, job, from (address), outcome (HTTP status)."""
    return {"records": await ctx.auth.audit_log(user, action, job, since, limit)}


# -- webhooks ----------------------------------------------------------------------------------


@router.get("/webhook")
async def get_webhook(ctx: Ctx, who: Submitter) -> dict[str, str | None]:
    """Your webhook: ``url`` (None: none) and the ``secret`` that signs every call to it
    and to your jobs' own webhooks."""
    return await ctx.webhooks.get(who.name)


@router.put(
    "/webhook",
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": {
        "type": "object", "required": ["url"],
        "properties": {"url": {"type": "string"}, "rotate": {"type": "boolean"}},
    }}}}},
)  # fmt: skip
async def put_webhook(request: Request, ctx: Ctx, who: Submitter) -> dict[str, str | None]:
    """Call ``url`` when any job of yours ends: ``{"url": "https://...", "rotate": false}``
    (``rotate``: a new signing secret). Answers the URL and the secret."""
    data = await read_json(request, "webhook")
    if not isinstance(data, dict) or "url" not in data or not set(data) <= {"url", "rotate"}:
        raise InvalidRequest('the body is {"url": "https://...", "rotate": false}')
    rotate = data.get("rotate", False)
    if not isinstance(rotate, bool):
        raise InvalidRequest("rotate must be true or false", {"field": "rotate"})
    try:
        url = check_webhook_url(data["url"])
    except ValueError as exc:
        raise InvalidRequest(f"url: {exc}", {"field": "url"}) from None
    return await ctx.webhooks.put(who.name, url, rotate)


@router.delete("/webhook")
async def delete_webhook(ctx: Ctx, who: Submitter) -> dict[str, str | None]:
    """No webhook for your jobs (the secret stays: jobs' own webhooks use it)."""
    store = ctx.webhooks
    found = await store.get(who.name)
    if found["secret"] is None:
        return found
    return await store.put(who.name, None)


class _OnWrites:
    """A pure ASGI middleware for state-changing requests (``write``): reads and
    anything not HTTP pass straight through, untouched, so the hot status route pays
    nothing for it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in _READS:
            await self.app(scope, receive, send)
        else:
            await self.write(scope, receive, send)

    async def write(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise NotImplementedError


class AuditMiddleware(_OnWrites):
    """Appends one audit record per state-changing request once it is answered: who
    (the principal the auth check found, if it got that far), action (method and
    path), job, from, outcome (status). A request refused before anyone signed in (a
    cross-site form, an unknown route) is tallied per address instead, as failed
    sign-ins are (``Limits.refused``): a stranger cannot flood the log."""

    async def write(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            await self._record(scope, status)

    async def _record(self, scope: dict[str, Any], status: int) -> None:
        state = scope.get("state") or {}
        who = state.get("principal")
        if who is None and status in (401, 429):
            return  # the auth check tallied the failed sign-in itself
        app = scope.get("app")
        ctx: AppContext | None = getattr(getattr(app, "state", None), "ctx", None)
        ctx = ctx or process_context()
        if ctx is None:
            return
        address = scope_address(scope)
        action = f"{scope['method']} {scope['path'][:200]}"
        try:
            if who is None:
                await ctx.limits.refused(address, "anonymous", action, status)
                return
            await ctx.auth.audit(
                who=who.name, role=who.role.value, action=action, job=state.get("job_id"),
                outcome=status, **{"from": address},
            )  # fmt: skip
        except Exception:
            # The request has been answered; a lost record is logged, never silent.
            log.exception(
                "could not append the audit record of %s %s", scope["method"], scope["path"]
            )


class CrossSiteGuard(_OnWrites):
    """Refuse (403) a state-changing request that a browser says comes from another
    site: its ``Origin`` is not the farm's own, or ``Sec-Fetch-Site`` is ``cross-site``.

    A web page elsewhere can make a visitor's browser POST a form (multipart included)
    to a farm it can reach — a farm on the visitor's own machine with accounts off, or
    one the browser is signed in to. Browsers name the page's origin on such requests;
    the farm's own page, the SDK, the CLI and the add-on send no foreign origin (the
    page's fetches also carry ``X-Rayfarm-Request``)."""

    async def write(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        foreign = headers.get("sec-fetch-site") == "cross-site"
        if origin is not None and origin != "null":
            # Behind a proxy that rewrites Host, the public host is X-Forwarded-Host (a
            # browser's cross-site form cannot set that header).
            hosts = {headers.get("host", "").lower()}
            hosts.update(h.strip().lower() for h in headers.get("x-forwarded-host", "").split(","))
            foreign = foreign or urlsplit(origin).netloc.lower() not in hosts
        elif origin == "null":
            foreign = True  # a sandboxed frame or a file:// page: never the farm's own
        if not foreign:
            await self.app(scope, receive, send)
            return
        error = Forbidden(
            f"{scope['method']} from another site ({origin or 'cross-site'}) refused: the "
            "farm takes changes from its own page and from API clients only",
            {"origin": origin or ""},
        )
        await _refuse(send, error)


class LocalHostGuard:
    """On a farm without accounts (``--no-auth``: loopback only, every request its
    admin), refuse (403) any request whose ``Host`` is not this machine by name.

    Such a farm trusts whoever reaches it, and DNS rebinding lets a web page elsewhere
    reach it through the visitor's browser: the page's own name (``evil.example``) is
    made to resolve to 127.0.0.1, so the browser sends the page's requests, and shows it
    the answers, as same-site. The browser still names the page's host in ``Host``; the
    farm answers only ``Host`` names that are loopback (``localhost``, ``127.0.0.1``,
    ``[::1]``, ...: the addresses it listens on), any port (an SSH tunnel's local port
    may differ). A request with no ``Host`` (HTTP/1.0 tools) is no browser's and passes.
    With accounts on, every request needs a token, so this check is off."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not _accounts_on(scope):
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if host is not None and not is_loopback_host(host):
                await _refuse(send, Forbidden(
                    f"this farm has no accounts (--no-auth) and answers only requests for "
                    f"this machine (Host localhost or a loopback address), not {host[:100]!r}",
                    {"host": host[:100]},
                ))  # fmt: skip
                return
        await self.app(scope, receive, send)


def is_loopback_host(host: str) -> bool:
    """Whether a ``Host`` header names this machine: ``localhost`` or a loopback address,
    with or without a port."""
    try:
        name = urlsplit(f"//{host}").hostname
    except ValueError:
        return False
    if name is None:
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True  # RFC 6761: always loopback, browsers never resolve it elsewhere
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _accounts_on(scope: dict[str, Any]) -> bool:
    app = scope.get("app")
    ctx: AppContext | None = getattr(getattr(app, "state", None), "ctx", None)
    ctx = ctx or process_context()
    return ctx is None or ctx.settings.auth  # no context yet: the routes answer 503


async def _refuse(send: Any, error: Forbidden) -> None:
    body = json.dumps(error.to_body()).encode()
    await send({"type": "http.response.start", "status": error.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
    ]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
