"""Signing the web page in and out: ``POST /session`` and ``DELETE /session``.

Decisions, and why:

- **The cookie holds the API token itself**, not a session id for a server-side session.
  The token is the credential the user already has; there is no second credential
  store to keep, expire or leak, and revoking the token (or changing the user's role)
  takes effect in the browser exactly as it does for the SDK. The cookie is
  ``HttpOnly`` (no script, ours or injected, can read it), ``SameSite=Strict`` (the
  browser does not send it on requests other sites start), ``Path=/`` and ``Secure``
  when the page came over HTTPS (directly, or through a proxy that says so with
  ``X-Forwarded-Proto: https``). It lasts for the browser session: no ``Max-Age``.
- **Every state-changing request the cookie signs in must carry**
  ``X-Rayfarm-Request: 1`` (``context.check_same_site``), and so must these two
  routes: a form on another site cannot set a header, so it can neither ride the
  cookie (CSRF) nor sign the browser in as someone else (login CSRF).
- **Signing in is checked and audited by ``authenticate``**, the API's own check: a bad
  token is the same 401 with the same audit record as a bad ``Authorization`` header.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from rayfarm.cluster.auth import Principal
from rayfarm.cluster.bodies import read_json
from rayfarm.cluster.context import (
    SESSION_COOKIE,
    Ctx,
    Who,
    authenticate,
    check_same_site,
    check_submitter,
    client_address,
)
from rayfarm.cluster.routes.schemas import json_body
from rayfarm.errors import Forbidden, InvalidRequest

__all__ = ["router"]

router = APIRouter(tags=["accounts"])

_SESSION_BODY = json_body(
    {
        "type": "object",
        "required": ["token"],
        "properties": {"token": {"type": "string", "description": "an API token"}},
    }
)


def is_https(request: Request) -> bool:
    """Whether the browser reached the farm over HTTPS: directly, or through a proxy
    that terminated TLS and says so. Trusting a client's ``X-Forwarded-Proto`` here
    can only add ``Secure`` to its own cookie."""
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


@router.post("/session", openapi_extra=_SESSION_BODY)
async def sign_in(request: Request, ctx: Ctx) -> JSONResponse:
    """Sign a browser in: JSON ``{"token": "rf_..."}`` → the user (as ``GET /session``) and
    an HttpOnly session cookie with which the page calls the API. Needs the header
    ``X-Rayfarm-Request: 1`` (403 without). A bad token is 401, audited."""
    check_same_site(request)
    data = await read_json(request, "sign-in")
    if not isinstance(data, dict) or set(data) != {"token"} or not isinstance(data["token"], str):
        raise InvalidRequest('the body must be a JSON object {"token": "<API token>"}')
    token = data["token"].strip()
    who = await authenticate(ctx, f"Bearer {token}", client_address(request))
    request.state.principal = who  # the audit names who signed in
    response = JSONResponse(_me(who, ctx.settings.auth))
    if ctx.settings.auth:  # a farm without accounts signs everyone in as its admin anyway
        response.set_cookie(
            SESSION_COOKIE, token, path="/", httponly=True, samesite="strict",
            secure=is_https(request),
        )  # fmt: skip
    return response


@router.get("/session")
async def session(ctx: Ctx, who: Who) -> dict[str, Any]:
    """The signed-in user as the page needs it: ``/whoami``'s name, role and projects,
    ``may_submit`` (the API's own check) and ``accounts`` (false on a farm without
    accounts, where everyone is its admin and there is nothing to sign out of)."""
    return _me(who, ctx.settings.auth)


def _me(who: Principal, accounts: bool) -> dict[str, Any]:
    try:
        may_submit = check_submitter(who) is who
    except Forbidden:
        may_submit = False
    return {"user": who.name, "role": who.role.value, "projects": sorted(who.projects),
            "may_submit": may_submit, "accounts": accounts}  # fmt: skip


@router.delete("/session", status_code=204, response_class=Response)
async def sign_out(request: Request, ctx: Ctx) -> Response:
    """Sign the browser out: the session cookie is cleared (204, signed in or not).
    Needs ``X-Rayfarm-Request: 1``, as every state-changing request from the page."""
    check_same_site(request)
    token = request.cookies.get(SESSION_COOKIE)
    if token and ctx.settings.auth:
        # Only to name the user in the audit record; an unknown token signs out too.
        request.state.principal = await ctx.auth.principal(token)
    response = Response(status_code=204)
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=is_https(request)
    )
    return response
