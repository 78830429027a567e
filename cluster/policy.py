"""What admins set about scheduling, in Redis: project weights (fair share) and quotas
(``keys.shares``, ``keys.quotas``). The dispatcher reads them every round and hands them
to the scheduler (``rayfarm.cluster.scheduler``); ``rayfarm.cluster.scheduling`` serves
them over HTTP.
"""

from __future__ import annotations

import json
from typing import Any

from rayfarm.cluster import keys
from rayfarm.cluster.scheduler import Policy, Quota

__all__ = ["SCOPES", "PolicyStore"]

#: What a quota is kept for.
SCOPES = ("user", "project")


class PolicyStore:
    """Project weights and quotas in Redis (``keys.shares``, ``keys.quotas``)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    async def load(self) -> Policy:
        """The policy in force, in one round trip (the dispatcher's, every round)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.shares())
            pipe.hgetall(keys.quotas())
            shares, quotas = await pipe.execute()
        users: dict[str, Quota] = {}
        projects: dict[str, Quota] = {}
        for key, text in quotas.items():
            scope, _, name = key.partition(":")
            limits = json.loads(text)
            quota = Quota(gpu=limits.get("gpu"), cpu=limits.get("cpu"))
            (users if scope == "user" else projects)[name] = quota
        weights = {project: float(weight) for project, weight in shares.items()}
        return Policy(weights=weights, users=users, projects=projects)

    async def shares(self) -> dict[str, float]:
        return {p: float(w) for p, w in (await self.redis.hgetall(keys.shares())).items()}

    async def set_share(self, project: str, weight: float | None) -> None:
        """Weigh ``project`` (None: back to the default, 1)."""
        if weight is None:
            await self.redis.hdel(keys.shares(), project)
        else:
            await self.redis.hset(keys.shares(), project, repr(weight))

    async def quotas(self) -> dict[str, dict[str, dict[str, int | None]]]:
        """``{"user": {name: {"gpu", "cpu"}}, "project": {...}}``."""
        found: dict[str, dict[str, dict[str, int | None]]] = {s: {} for s in SCOPES}
        for key, text in (await self.redis.hgetall(keys.quotas())).items():
            scope, _, name = key.partition(":")
            limits = json.loads(text)
            found[scope][name] = {"gpu": limits.get("gpu"), "cpu": limits.get("cpu")}
        return found

    async def set_quota(self, scope: str, name: str, quota: Quota | None) -> None:
        """Set (None: remove) the quota of user or project ``name``."""
        field = f"{scope}:{name}"
        if quota is None or (quota.gpu is None and quota.cpu is None):
            await self.redis.hdel(keys.quotas(), field)
        else:
            await self.redis.hset(
                keys.quotas(), field, json.dumps({"gpu": quota.gpu, "cpu": quota.cpu})
            )
