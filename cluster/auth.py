"""Accounts, roles, API tokens and the audit log, in the farm's Redis.

Users have one role each — ``viewer`` (reads the jobs of its projects), ``artist``
(submits; cancels and retries its own jobs; reads its own jobs and its projects'),
``admin`` (everything, users and tokens included) — and a set of projects. A job
belongs to its submitter and optionally to a project. A job a user may not see
answers 404 (``JobNotFound``), never 403, so job ids do not leak.

API tokens are random (``rf_`` and 43 URL-safe characters, 256 bits) and stored only
as their SHA-256: a token this strong needs no slow hash, and Redis never holds one
that works. The keys (``rayfarm.cluster.keys``): ``users`` (name -> role, projects), ``tokens``
(SHA-256 -> user, label) and the ``audit`` stream (who, role, action, job, from,
outcome, at, detail).

The audit stream holds every state-changing request and every failed sign-in,
trimmed (approximately) to ``RAYFARM_AUDIT_MAXLEN`` entries.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from rayfarm.cluster import keys
from rayfarm.errors import InvalidRequest, NotFound

__all__ = [
    "ADMIN",
    "AuthStore",
    "Principal",
    "Role",
    "hash_token",
    "new_token",
]

USERS, TOKENS, AUDIT = keys.users(), keys.tokens(), keys.audit()
#: Names of users and projects: short, printable, no separators that could confuse a log.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_TOKEN = re.compile(r"^rf_[A-Za-z0-9_-]{43}$")
#: How long a process trusts what it learnt about a token.
PRINCIPAL_TTL_S = 5.0


class Role(StrEnum):
    VIEWER = "viewer"
    ARTIST = "artist"
    ADMIN = "admin"


def new_token() -> str:
    """A fresh API token (256 random bits)."""
    return "rf_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: Any, what: str = "user") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest(
            f"{what} name {name!r}: 1 to 64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit",
            {"field": what},
        )
    return name


@dataclass(frozen=True)
class Principal:
    """Who a request comes from."""

    name: str
    role: Role
    projects: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def can_read(self, owner: str, project: str | None) -> bool:
        """A job of ``owner`` in ``project``: visible to this user?"""
        if self.is_admin:
            return True
        if project is not None and project in self.projects:
            return True
        return self.role is Role.ARTIST and owner == self.name

    def scope(self) -> list[tuple[str, str]] | None:
        """The jobs ``can_read`` allows, as the indexes that hold them: ``("user", name)``
        for its own jobs (an artist), ``("project", name)`` for each project; None for
        an admin (every job)."""
        if self.is_admin:
            return None
        own = [("user", self.name)] if self.role is Role.ARTIST else []
        return own + [("project", p) for p in sorted(self.projects)]

    def can_change(self, owner: str) -> bool:
        """Cancel or retry a job it can read."""
        return self.is_admin or (self.role is Role.ARTIST and owner == self.name)

    @property
    def can_submit(self) -> bool:
        return self.role in (Role.ARTIST, Role.ADMIN)


#: Who a farm without accounts (``--no-auth``, loopback only) treats every request as.
ADMIN = Principal("local", Role.ADMIN)


def _now() -> str:
    return datetime.now(UTC).isoformat()


class AuthStore:
    """Users, tokens and the audit stream over an asyncio Redis client."""

    def __init__(self, redis: Any, audit_maxlen: int = 1_000_000) -> None:
        self.redis = redis
        self.audit_maxlen = audit_maxlen
        self._known: dict[str, tuple[Principal, float]] = {}

    # -- users and tokens ------------------------------------------------------------------

    async def put_user(
        self, name: str, role: Role, projects: list[str] | None = None
    ) -> dict[str, Any]:
        """Create or update a user (its role and projects)."""
        check_name(name)
        for project in projects or []:
            check_name(project, "project")
        raw = await self.redis.hget(USERS, name)
        created = json.loads(raw)["created_at"] if raw else _now()
        user = {"role": role.value, "projects": sorted(set(projects or [])), "created_at": created}
        await self.redis.hset(USERS, name, json.dumps(user))
        self._known.clear()
        return {"name": name, **user}

    async def user(self, name: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(USERS, name)
        return {"name": name, **json.loads(raw)} if raw else None

    async def users(self) -> list[dict[str, Any]]:
        found = await self.redis.hgetall(USERS)
        return sorted(
            ({"name": _str(k), **json.loads(v)} for k, v in found.items()),
            key=lambda u: u["name"],
        )

    async def create_token(self, user: str, label: str = "", token: str | None = None) -> str:
        """A new token for ``user`` (which must exist); ``token`` to register a given
        one (the first admin's, from ``RAYFARM_ADMIN_TOKEN``)."""
        if await self.user(user) is None:
            raise NotFound(f"no user {user}", {"user": user})
        token = token or new_token()
        if not _TOKEN.match(token):
            raise InvalidRequest("a token is rf_ followed by 43 URL-safe characters")
        record = {"user": user, "label": label[:200], "created_at": _now()}
        await self.redis.hset(TOKENS, hash_token(token), json.dumps(record))
        return token

    async def revoke(self, user: str) -> int:
        """Remove every token of ``user``; how many."""
        found = await self.redis.hgetall(TOKENS)
        doomed = [k for k, v in found.items() if json.loads(v)["user"] == user]
        if doomed:
            await self.redis.hdel(TOKENS, *doomed)
        self._known.clear()
        return len(doomed)

    async def principal(self, token: str) -> Principal | None:
        """Who ``token`` belongs to; None when it is no (longer a) valid token. An
        answer is kept ``PRINCIPAL_TTL_S`` in this process (every status poll carries
        a token): a revoked token or a changed role takes effect within that."""
        if not _TOKEN.match(token):
            return None
        digest = hash_token(token)
        known = self._known.get(digest)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        raw = await self.redis.hget(TOKENS, digest)
        user = await self.user(json.loads(raw)["user"]) if raw else None
        if user is None:
            self._known.pop(digest, None)
            return None
        who = Principal(user["name"], Role(user["role"]), frozenset(user["projects"]))
        if len(self._known) >= 10_000:
            self._known.clear()
        self._known[digest] = (who, time.monotonic() + PRINCIPAL_TTL_S)
        return who

    async def has_admin(self) -> bool:
        return any(u["role"] == Role.ADMIN for u in await self.users())

    async def bootstrap(self, token: str | None) -> str | None:
        """Make sure the farm has an admin: with ``token`` (``RAYFARM_ADMIN_TOKEN``) the
        user ``admin`` holds that token; without one, a farm with no admin gets an
        ``admin`` with a new token, returned (to be shown once). None when nothing new
        was made."""
        admins = [u for u in await self.users() if u["role"] == Role.ADMIN]
        if token is not None:
            if await self.principal(token) is None:
                if not any(u["name"] == "admin" for u in admins):
                    await self.put_user("admin", Role.ADMIN)
                await self.create_token("admin", "RAYFARM_ADMIN_TOKEN", token)
            return None
        if admins:
            return None
        await self.put_user("admin", Role.ADMIN)
        return await self.create_token("admin", "first admin")

    # -- audit -----------------------------------------------------------------------------

    async def audit(self, **fields: Any) -> None:
        """Append one record (who, role, action, job, from, outcome, detail)."""
        record = {"at": _now(), **{k: "" if v is None else str(v) for k, v in fields.items()}}
        await self.redis.xadd(AUDIT, record, maxlen=self.audit_maxlen, approximate=True)

    async def audit_log(
        self,
        user: str | None = None,
        action: str | None = None,
        job: str | None = None,
        since: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, str]]:
        """The newest records first, filtered; ``since``: an ISO time."""
        out: list[dict[str, str]] = []
        last = "+"
        while len(out) < limit:
            batch = await self.redis.xrevrange(AUDIT, max=last, count=500)
            for entry_id, raw in batch:
                record = {_str(k): _str(v) for k, v in raw.items()}
                if since is not None and record.get("at", "") < since:
                    return out
                if (
                    (user is None or record.get("who") == user)
                    and (action is None or action in record.get("action", ""))
                    and (job is None or record.get("job") == job)
                ):
                    out.append({"id": _str(entry_id), **record})
                    if len(out) >= limit:
                        return out
            if len(batch) < 500:
                return out
            last = "(" + _str(batch[-1][0])
        return out


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
