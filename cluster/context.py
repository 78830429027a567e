"""What every route needs: the process's context (settings, job store, storage,
event hub, dispatcher hooks) and the typed dependencies that hand it out: who asks
(``Who``, ``Submitter``, ``Admin``) and a job they may see (``JobId``). The request-body
readers that enforce the farm's size limits are ``rayfarm.cluster.bodies``'s."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from rayfarm.cluster.auth import ADMIN, AuthStore, Principal
from rayfarm.cluster.deletion import Remover
from rayfarm.cluster.events import EventHub
from rayfarm.cluster.limits import Limits
from rayfarm.cluster.notifier import Notifier, WebhookStore
from rayfarm.cluster.policy import PolicyStore
from rayfarm.cluster.settings import Settings
from rayfarm.cluster.storage import Storage
from rayfarm.cluster.store import JobStore, connect
from rayfarm.cluster.streams import StreamLeases
from rayfarm.cluster.sweeper import Sweeper
from rayfarm.errors import (
    FarmUnavailable,
    Forbidden,
    JobNotFound,
    Unauthorized,
)
from rayfarm.render.inputs import Inputs

__all__ = [
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "Admin",
    "AppContext",
    "Ctx",
    "Inspect",
    "JobId",
    "Notify",
    "Stats",
    "Submitter",
    "Who",
    "check_job_id",
    "check_may_change",
    "check_same_site",
    "check_submitter",
    "process_context",
    "set_process_context",
]

log = logging.getLogger("rayfarm.api")

_JOB_ID = re.compile(r"^[0-9a-f]{16}$")
#: Jobs whose owner and project a process keeps in memory (then it starts over).
OWNER_CACHE = 100_000
#: The web page's session cookie (set by ``POST /session``, ``rayfarm.cluster.web``): it
#: holds the API token the user signed in with, HttpOnly, so no script can read it.
SESSION_COOKIE = "rayfarm_session"
#: The header a browser's state-changing request must carry when the session cookie
#: signs it in (``X-Rayfarm-Request: 1``): the farm's page sends it with every fetch; a
#: form on another site cannot set a header, and a cross-site fetch that sets one needs
#: a CORS preflight this app never grants. ``SameSite=Strict`` already keeps the cookie
#: off cross-site requests; this check does not depend on the browser honouring it.
CSRF_HEADER = "X-Rayfarm-Request"
#: Methods that change nothing: a cookie alone signs them in.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


#: Wakes the dispatcher: something changed in Redis (fire and forget).
Notify = Callable[[], object]
#: Catalogues a scene folder with a render actor, read by that Blender version.
Inspect = Callable[[Inputs, str], Awaitable[dict[str, Any]]]
#: The dispatcher's view of the pool (``Dispatcher.stats``).
Stats = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(eq=False)
class AppContext:
    """What the routes need: settings, the process's one Redis client and the stores
    over it (jobs, accounts, limits, streams' leases, webhooks, policies), storage, the
    event hub, the housekeeping and webhook loops, and hooks into the dispatcher (None
    where the app runs without Ray). Made complete by ``AppContext.build``."""

    settings: Settings
    redis: Any  # the shared asyncio client (``store.connect``); Any as in ``JobStore``
    store: JobStore
    storage: Storage
    hub: EventHub
    auth: AuthStore
    limits: Limits
    remover: Remover
    sweeper: Sweeper
    streams: StreamLeases
    webhooks: WebhookStore
    policies: PolicyStore
    notifier: Notifier
    notify: Notify | None = None
    inspect: Inspect | None = None
    stats: Stats | None = None
    # Scene digest -> the task cataloguing it beside its first job's render (submit.py).
    cataloguing: dict[str, asyncio.Task[dict[str, Any] | None]] = field(default_factory=dict)
    _owners: dict[str, tuple[str, str | None]] = field(default_factory=dict, repr=False)
    _indexed: bool = field(default=False, repr=False)

    @classmethod
    def build(
        cls,
        settings: Settings,
        notify: Notify | None = None,
        inspect: Inspect | None = None,
        stats: Stats | None = None,
    ) -> AppContext:
        """The context of one process: one Redis client (``settings.redis_url``) handed
        to every store, and the dispatcher's hooks (none: this app runs without Ray)."""
        redis = connect(settings.redis_url)
        store = JobStore(redis, events_maxlen=settings.events_maxlen)
        storage = Storage(settings.storage)
        auth = AuthStore(redis, settings.audit_maxlen)
        remover = Remover(redis, store, storage)
        webhooks = WebhookStore(redis)
        return cls(
            settings=settings,
            redis=redis,
            store=store,
            storage=storage,
            hub=EventHub(store),
            auth=auth,
            limits=Limits(redis, auth, settings),
            remover=remover,
            sweeper=Sweeper(redis, store, storage, remover, auth, settings),
            streams=StreamLeases(redis, settings.max_streams_per_user),
            webhooks=webhooks,
            policies=PolicyStore(redis),
            notifier=Notifier(redis, store, webhooks, settings),
            notify=notify,
            inspect=inspect,
            stats=stats,
        )

    async def close(self) -> None:
        """Close the Redis client every store shares."""
        await self.redis.aclose()

    async def owner_of(self, job_id: str) -> tuple[str, str | None] | None:
        """(owner, project) of a job, None when there is no such job. Both are fixed at
        submission, so they are kept here once read (the status route is hot)."""
        known = self._owners.get(job_id)
        if known is not None:
            return known
        found = await self.store.owner(job_id)
        if found is None:
            return None
        if len(self._owners) >= OWNER_CACHE:
            self._owners.clear()
        self._owners[job_id] = found
        return found

    def forget_owner(self, job_id: str) -> None:
        """Drop a deleted job from the (owner, project) cache."""
        self._owners.pop(job_id, None)

    async def ensure_indexes(self) -> None:
        """Build the owner and project indexes over jobs stored before them, once."""
        if not self._indexed:
            await self.store.build_indexes()
            self._indexed = True

    def nudge(self) -> None:
        """Wake the dispatcher (where there is one): something changed in Redis."""
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


def process_context() -> AppContext | None:
    """This process's context, where ``set_process_context`` gave one."""
    return _process_ctx


# Dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in a worker
# thread, a hop through the thread pool (and a GIL hand-off) on every request.
async def _ctx(request: Request) -> AppContext:
    ctx: AppContext | None = getattr(request.app.state, "ctx", None) or _process_ctx
    if ctx is None:
        raise FarmUnavailable("the service is still starting")
    return ctx


Ctx = Annotated[AppContext, Depends(_ctx)]


#: Set by the farm's front door to the client's address, replacing the client's own.
FORWARDED_FOR = b"x-forwarded-for"


@functools.cache
def _behind_our_proxy() -> bool:
    """Whether this process serves behind a front door of the farm's, which sets
    ``X-Forwarded-For`` itself: HAProxy run by ``rayfarm-haproxy``
    (``rayfarm.cluster.haproxy``), or Serve's proxy with ``rayfarm.cluster.connections``.
    Replicas see those settings in the environment they share with the proxy. Elsewhere
    (a test's ASGI client, a cluster without either) the header is the client's and
    proves nothing."""
    from rayfarm.cluster.local import PROXY_CALLBACK, PROXY_CALLBACK_ENV, WRAPPER

    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return Path(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")).name == WRAPPER
    return os.environ.get(PROXY_CALLBACK_ENV) == PROXY_CALLBACK


def scope_address(scope: Any) -> str:
    """The client's address: as the farm's front door saw it (``X-Forwarded-For``, see
    ``_behind_our_proxy``), else the connection's peer. Behind HAProxy the peer is
    HAProxy: audit records and per-address limits need the client."""
    if _behind_our_proxy():
        for name, value in scope.get("headers") or ():
            if name == FORWARDED_FOR:
                return str(value.decode("latin-1").strip()[:64])
    client = scope.get("client")
    return str(client[0]) if client else ""


def client_address(request: Request) -> str:
    """The client's address (``scope_address``)."""
    return scope_address(request.scope)


async def authenticate(ctx: AppContext, authorization: str | None, source: str) -> Principal:
    """The principal a request's ``Authorization: Bearer <token>`` names; a farm without
    accounts (``RAYFARM_AUTH=off``, loopback only) treats every request as its admin.
    A missing or unknown token is 401, tallied into the audit log; past the wrong
    credentials ``source`` (the client's address) may send, 429 (``Limits``). A valid
    token costs no limit check."""
    if not ctx.settings.auth:
        return ADMIN
    scheme, _, token = (authorization or "").partition(" ")
    principal = None
    if scheme.lower() == "bearer" and token.strip():
        principal = await ctx.auth.principal(token.strip())
    if principal is None:
        reason = "no token" if not authorization else "unknown or malformed token"
        await ctx.limits.sign_in_failed(source, reason, guess=bool(authorization))
        raise Unauthorized(
            f"{reason}: send Authorization: Bearer <token> (rayfarm token create, or the "
            "first admin's token that rayfarm up printed)"
        )
    return principal


def check_same_site(request: Request) -> None:
    """A state-changing request signed in by the session cookie must carry
    ``X-Rayfarm-Request: 1`` (403 otherwise): what tells the farm's own page from a
    form another site makes the browser send (CSRF)."""
    if request.method not in _SAFE_METHODS and request.headers.get(CSRF_HEADER) != "1":
        raise Forbidden(
            f"{request.method} from a browser session must carry the header {CSRF_HEADER}: 1 "
            "(the farm's page sends it; a form on another site cannot); API clients send "
            "Authorization: Bearer <token> instead",
            {"header": CSRF_HEADER},
        )


async def _principal(request: Request, ctx: Ctx) -> Principal:
    # The Authorization header first (the SDK, the CLI, the add-on), then the web page's
    # session cookie: the same token, checked by the same code, so the page has exactly
    # the API's rights.
    authorization = request.headers.get("authorization")
    cookie = None if authorization else request.cookies.get(SESSION_COOKIE)
    if cookie:
        authorization = f"Bearer {cookie}"
    principal = await authenticate(ctx, authorization, client_address(request))
    request.state.principal = principal  # for the audit record of this request
    if cookie:
        check_same_site(request)
    return principal


Who = Annotated[Principal, Depends(_principal)]


def check_submitter(who: Principal) -> Principal:
    if not who.can_submit:
        raise Forbidden(f"{who.name} is a {who.role.value}: only artists and admins submit")
    return who


async def _submitter(who: Who) -> Principal:
    return check_submitter(who)


async def _admin(who: Who) -> Principal:
    if not who.is_admin:
        raise Forbidden(f"{who.name} is a {who.role.value}: this is for admins")
    return who


Submitter = Annotated[Principal, Depends(_submitter)]
Admin = Annotated[Principal, Depends(_admin)]


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise JobNotFound(f"no job {job_id}", {"job_id": job_id})
    return job_id


async def visible_job(ctx: AppContext, who: Principal, job_id: str) -> tuple[str, str | None]:
    """``job_id``'s (owner, project) when ``who`` may see it; JobNotFound (404, not 403:
    ids do not leak) when it may not, or there is no such job."""
    check_job_id(job_id)
    found = await ctx.owner_of(job_id)
    if found is None or not who.can_read(*found):
        raise JobNotFound(f"no job {job_id}", {"job_id": job_id})
    return found


async def check_may_change(ctx: AppContext, who: Principal, job_id: str) -> None:
    """Cancel or retry: the job's owner (an artist) or an admin; 404 for a job ``who``
    may not see, 403 for one it sees but may not change."""
    owner, _ = await visible_job(ctx, who, job_id)
    if not who.can_change(owner):
        raise Forbidden(
            f"job {job_id} is {owner}'s: {who.name} ({who.role.value}) may not change it"
        )


async def _job_id(job_id: str, request: Request, ctx: Ctx, who: Who) -> str:
    request.state.job_id = job_id[:64]  # the audit names the job asked for, refused or not
    await visible_job(ctx, who, job_id)
    return job_id


#: A job id the requester may see (every route under /jobs/{job_id}).
JobId = Annotated[str, Depends(_job_id)]
