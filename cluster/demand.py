"""What the farm's work asks of the cluster: render slots by pool, and the request for
render nodes that follows from them. Pure, like the scheduler: the dispatcher hands it
its runs, slots and the queued jobs that may start, and the scaler
(``rayfarm.cluster.scaler``) does the I/O.

A **pool** is a Blender version on a kind of slot (``5.0/gpu``). It is the unit the farm
counts work in (``/metrics``: tasks queued per pool) and may cap (``max_pool_nodes``), but
not a set of machines: every render actor can switch its worker to another Blender
version, so any node of the farm's kind serves every version, and the nodes asked for
are the pools' wants added up. A farm's render slots are of one kind: GPU on a GPU
farm (and always on an autoscaled one), CPU on a CPU-only one.

**Wanted slots** of a pool: the tasks its running jobs have in flight (busy slots) or
queued, a ``tiles="auto"`` job waiting for its scene to be measured (one), and the tasks
of queued jobs that may start now (not blocked by a dependency, not over a quota). A
user's or project's GPU/CPU quota caps what its jobs want. Then the per-pool maximum,
the farm-wide maximum, and the farm-wide minimum (warm nodes) shape the request.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from rayfarm.cluster.runs import Run, Slot
from rayfarm.cluster.scheduler import Policy, Queued

__all__ = ["Limits", "PoolDemand", "Request", "demand", "pool_name", "request"]


def pool_name(blender: str, kind: str) -> str:
    """A pool's name, as ``/metrics`` labels it: ``5.0/gpu``."""
    return f"{blender}/{kind}"


@dataclass
class PoolDemand:
    """One pool's work: tasks ``queued`` (in runs, and in queued jobs that may start),
    those of them its users' and projects' quotas let take a slot (``usable``), and
    ``running`` (busy slots)."""

    queued: int = 0
    usable: int = 0
    running: int = 0

    @property
    def slots(self) -> int:
        """The slots this work could use at once."""
        return self.usable + self.running

    def add(self, tasks: int, usable: int) -> None:
        self.queued += tasks
        self.usable += usable


@dataclass(frozen=True)
class Limits:
    """The farm's bounds on its request, in render nodes, and how many render slots a
    node holds (its GPUs over ``gpu_share``)."""

    max_nodes: int
    min_nodes: int = 0
    pool_max_nodes: Mapping[str, int] = field(default_factory=dict)  # Blender version -> nodes
    slots_per_node: int = 1


@dataclass(frozen=True)
class Request:
    """What the farm asks the cluster for: ``slots`` render slots (``wanted``: by pool,
    after each pool's maximum), on ``nodes`` render nodes."""

    slots: int
    nodes: int
    wanted: Mapping[str, int]


def demand(
    runs: Iterable[Run],
    slots: Sequence[Slot],
    queued: Iterable[Queued],
    kind: str,
    default_blender: str,
    policy: Policy | None = None,
) -> dict[str, PoolDemand]:
    """The work of ``runs`` (live ones) and of ``queued`` (jobs that may start now), by
    pool name. ``default_blender``: the version of a job that names none (queued before
    the farm offered versions: it renders with the newest)."""
    room = _Room(policy or Policy(), kind)
    runs = [r for r in runs if not r.stopped]
    by_id = {r.id: r for r in runs}
    out: dict[str, PoolDemand] = {}

    def pool(blender: str | None) -> PoolDemand:
        return out.setdefault(pool_name(blender or default_blender, kind), PoolDemand())

    for slot in slots:
        if slot.busy:
            run = by_id.get(slot.run or "")
            pool(run.blender if run else slot.blender).running += 1
            if slot.user is not None:
                room.take(slot.user, slot.project or "", 1)
    for run in runs:
        waiting = len(run.pending) + (1 if run.grid is None and not run.probing else 0)
        if waiting:
            pool(run.blender).add(waiting, room.take(run.user, run.project, waiting))
    for job in queued:
        if job.tasks:
            pool(job.blender).add(job.tasks, room.take(job.user, job.project, job.tasks))
    return out


class _Room:
    """What each user and project may still take of its quota of ``kind`` slots (no
    entry: no quota). Busy slots are taken first, as the quota counts them."""

    def __init__(self, policy: Policy, kind: str) -> None:
        self.left: dict[tuple[str, str], int] = {}
        for scope, quotas in (("user", policy.users), ("project", policy.projects)):
            for name, quota in quotas.items():
                limit = quota.limit(kind)
                if limit is not None:
                    self.left[(scope, name)] = limit

    def take(self, user: str, project: str, wanted: int) -> int:
        """Of ``wanted`` slots for ``user``'s work in ``project``, those its quotas allow."""
        scopes = [("user", user), ("project", project)]
        for scope in scopes:
            if scope in self.left:
                wanted = min(wanted, max(0, self.left[scope]))
        for scope in scopes:
            if scope in self.left:
                self.left[scope] -= wanted
        return wanted


def request(pools: Mapping[str, PoolDemand], limits: Limits) -> Request:
    """The slots and nodes to ask for: each pool's wanted slots capped by its maximum
    (``max_pool_nodes`` of its Blender version), their sum capped by ``max_nodes``,
    raised to ``min_nodes``; an idle farm with no minimum asks for nothing."""
    per_node = max(1, limits.slots_per_node)
    wanted: Counter[str] = Counter()
    for name, need in pools.items():
        blender = name.rpartition("/")[0]
        cap = limits.pool_max_nodes.get(blender)
        wanted[name] = need.slots if cap is None else min(need.slots, cap * per_node)
    total = min(sum(wanted.values()), limits.max_nodes * per_node)
    total = max(total, min(limits.min_nodes, limits.max_nodes) * per_node)
    return Request(total, math.ceil(total / per_node), dict(wanted))
