"""The farm's scheduling policy: which queued job starts, and which task goes to which
free render slot. Pure: it reads the dispatcher's runs and slots (``rayfarm.cluster.runs``)
and the admins' ``Policy`` (project weights, quotas) and returns decisions; the dispatcher
does the I/O (Redis, Ray). It runs every dispatcher round, so it stays cheap: a round
costs a sort of the runs per slot handed out, and a run's tasks are looked past only when
some of them must avoid an actor.

**Admission** (``Scheduler.admit``: a PENDING job becomes a run):

- A job waits while a job it depends on is unfinished ("blocked by ..."), and fails when
  one FAILED, was CANCELLED or is gone.
- A job whose user or project holds its quota of slots waits ("over quota: ...").
- Otherwise it starts when the farm has spare capacity (idle slots beyond the tasks
  already waiting), when it outranks the waiting work of its own share, or when its
  share (a user in a project) has no work waiting yet: fair share can only give a slot
  to a share it knows of, so each share with queued work gets a job started (on a farm
  with slots: one scaled to zero keeps its queue as it is).

**Assignment** (``Scheduler.plan``: free slots get tasks):

- Urgent runs (an admin's mark) first; then fair share: the project whose running slots
  over its weight are fewest, then, inside it, the user running fewest; then priority,
  then age. At equal priority the running slots converge to the projects' weights, and a
  newcomer's small job takes the next slot that frees.
- A ``tiles="auto"`` or ``slices="auto"`` run first sends its scene to an actor to
  measure it (the probe), before other work of its share.
- No slot goes to a run whose user or project holds its quota of slots of that kind
  (GPU and CPU slots are counted apart).
- A task that failed on an actor goes to another one; while the others are busy it
  waits and the idle actor takes a later task. A node whose actors failed the job
  ``node_failure_limit`` times gets none of its tasks. Only when every actor is ruled
  out may the task run on one of them again.
- Among eligible actors, one already running the job's Blender version is preferred,
  then one that holds the job's scene. Switching an actor to another version costs a
  worker start, so when no idle actor runs a job's version, a later job of the same
  priority that one fits as it is takes it instead, as long as the earlier job has an
  actor working for it already (so each version keeps rendering); otherwise the job
  takes an idle actor, which switches (one with no worker yet, else one whose version
  no waiting job needs).
- Short whole-frame tasks go in batches (``Run.batch_size``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from rayfarm.cluster.runs import Run, Slot, task_key
from rayfarm.render.tasks import RenderTask

__all__ = [
    "DEFAULT_WEIGHT",
    "LOOKAHEAD",
    "Admission",
    "Assignment",
    "Plan",
    "Policy",
    "Queued",
    "Quota",
    "Scheduler",
    "Usage",
]

#: Pending tasks of a run looked at when its first ones must wait for another actor.
LOOKAHEAD = 64
#: The share weight of a project no admin has weighted (jobs without a project included).
DEFAULT_WEIGHT = 1.0
#: Job states a dependency can end in without the dependent being able to run.
_DEAD_ENDS = {"FAILED": "failed", "CANCELLED": "was cancelled"}


@dataclass(frozen=True)
class Quota:
    """The most slots of each kind a user or project may hold at once (None: no limit)."""

    gpu: int | None = None
    cpu: int | None = None

    def limit(self, kind: str) -> int | None:
        return self.gpu if kind == "gpu" else self.cpu


@dataclass(frozen=True)
class Policy:
    """What the farm's admins set: project weights and quotas, by user and by project."""

    weights: Mapping[str, float] = field(default_factory=dict)
    users: Mapping[str, Quota] = field(default_factory=dict)
    projects: Mapping[str, Quota] = field(default_factory=dict)

    def weight(self, project: str) -> float:
        return self.weights.get(project, DEFAULT_WEIGHT)


@dataclass(frozen=True)
class Queued:
    """A PENDING job, as admission sees it. ``tasks``: how many it would add (whole
    frames for ``tiles="auto"``); ``blender``: the version it renders with (what the
    farm's demand counts it under, ``rayfarm.cluster.demand``)."""

    id: str
    user: str
    project: str
    priority: int
    tasks: int
    urgent: bool = False
    depends_on: tuple[str, ...] = ()
    blender: str | None = None


@dataclass
class Admission:
    """Queued jobs to start (in order), to fail (dependency lost: the reason) and left
    waiting with a reason worth showing (blocked, over quota)."""

    start: list[str] = field(default_factory=list)
    fail: dict[str, str] = field(default_factory=dict)
    wait: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Assignment:
    """``slot`` works for ``run`` next: ``tasks`` (taken off the run's queue, in order),
    or, when empty, probing the scene for ``tiles="auto"``."""

    run: Run
    slot: Slot
    tasks: list[RenderTask]


@dataclass
class Plan:
    """A round's assignments; ``waiting``: runs that got no slot while ``idle`` slots
    stayed free, and why (a quota), by run id."""

    assignments: list[Assignment]
    waiting: dict[str, str]
    idle: int


class Usage:
    """The busy slots, counted by share: what fair share and quotas look at. With
    ``count`` False (one share at work and no quota: a round on the hot path of a farm
    with one job), only which runs are served is kept, and every count reads 0."""

    def __init__(self, slots: Iterable[Slot], count: bool = True) -> None:
        self.projects: Counter[str] = Counter()
        self.users: Counter[tuple[str, str]] = Counter()  # (project, user)
        self.user_kinds: Counter[tuple[str, str]] = Counter()  # (user, kind)
        self.project_kinds: Counter[tuple[str, str]] = Counter()  # (project, kind)
        self.served: set[str] = set()  # runs with a slot working for them
        self.count = count
        for slot in slots:
            if slot.busy:
                if slot.run is not None:
                    self.served.add(slot.run)
                if count and slot.user is not None:
                    self.add(slot.user, slot.project or "", slot.kind)

    def add(self, user: str, project: str, kind: str, run: str | None = None) -> None:
        if run is not None:
            self.served.add(run)
        if not self.count:
            return
        self.projects[project] += 1
        self.users[(project, user)] += 1
        self.user_kinds[(user, kind)] += 1
        self.project_kinds[(project, kind)] += 1

    def over_quota(
        self,
        user: str,
        project: str,
        kind: str,
        policy: Policy,
        coming: tuple[int, int] = (0, 0),
    ) -> str | None:
        """Why ``user``'s work in ``project`` may not take one more ``kind`` slot, or None.
        ``coming``: the slots the user's and the project's waiting work are about to take
        (admission counts those, so a slot freed between two tasks is not room)."""
        for scope, name, held, quotas in (
            ("user", user, self.user_kinds[(user, kind)] + coming[0], policy.users),
            ("project", project, self.project_kinds[(project, kind)] + coming[1],
             policy.projects),
        ):  # fmt: skip
            quota = quotas.get(name) if name else None
            limit = quota.limit(kind) if quota else None
            if limit is not None and held >= limit:
                if limit == 0:
                    return f"over quota: {scope} {name} may hold no {kind.upper()} slots"
                return (f"over quota: {scope} {name}'s jobs hold the {limit} {kind.upper()} "
                        "slot(s) it may have at once")  # fmt: skip
        return None


def needs_probe(run: Run) -> bool:
    """Whether ``run`` (``tiles="auto"``, ``slices="auto"``) waits for an actor to measure
    its scene."""
    return (run.grid is None or run.slices is None) and not run.probing


def prefer(slots: Sequence[Slot], scene_hash: str) -> Slot:
    """The first of ``slots`` that holds the scene already, else the first."""
    return next((s for s in slots if s.holds == scene_hash), slots[0])


class Scheduler:
    """The policy (see the module's docstring). Stateless: one per dispatcher."""

    def admit(
        self,
        queued: Iterable[Queued],
        states: Mapping[str, str | None],
        runs: Iterable[Run],
        slots: Sequence[Slot],
        policy: Policy,
    ) -> Admission:
        """Which of ``queued`` (PENDING jobs in queue order) start now. ``states``: the
        state of each job they depend on (None: no such job)."""
        live = [r for r in runs if not r.stopped]
        running = {r.id for r in live}
        usage = Usage(slots)
        idle = Counter(s.kind for s in slots if not s.busy)
        kinds = sorted({s.kind for s in slots})
        capacity = sum(idle.values()) - sum(len(r.pending) for r in live)
        # Per share (user, project): the best (urgent, priority) among its waiting runs;
        # per user and per project: the tasks their waiting runs have (quotas count those).
        best: dict[tuple[str, str], tuple[bool, int]] = {}
        demand: Counter[tuple[str, str]] = Counter()
        for run in live:
            if run.pending or needs_probe(run):
                share, rank = (run.user, run.project), (run.urgent, run.priority)
                best[share] = max(best.get(share, rank), rank)
                waiting = len(run.pending) or 1
                demand[("user", run.user)] += waiting
                demand[("project", run.project)] += waiting
        out = Admission()
        for job in queued:
            if job.id in running:
                continue
            lost, blocked = _dependencies(job, states)
            if lost is not None:
                out.fail[job.id] = lost
                continue
            if blocked:
                out.wait[job.id] = "blocked by " + ", ".join(blocked)
                continue
            # Over its quota in every kind of slot the farm has, it waits.
            mine = (demand[("user", job.user)], demand[("project", job.project)])
            over = [
                usage.over_quota(job.user, job.project, k, policy,
                                 (min(idle[k], mine[0]), min(idle[k], mine[1])))
                for k in kinds
            ]  # fmt: skip
            if over and all(over):
                out.wait[job.id] = str(over[0])
                continue
            share, rank = (job.user, job.project), (job.urgent, job.priority)
            outranks = share in best and rank > best[share]
            # A new share starts at once only where there are slots to share: a farm with
            # none (scaled to zero) keeps its queue, which is its demand.
            newcomer = share not in best and bool(slots)
            if capacity <= 0 and not outranks and not newcomer:
                continue
            out.start.append(job.id)
            capacity -= job.tasks
            best[share] = max(best.get(share, rank), rank)
            demand[("user", job.user)] += job.tasks
            demand[("project", job.project)] += job.tasks
        return out

    def plan(self, runs: Iterable[Run], slots: Sequence[Slot], policy: Policy) -> Plan:
        """Give the idle ``slots`` work of ``runs``: the tasks handed out are taken off
        their runs' queues (``Run.take_batch``); marking slots busy and starting the work
        is the caller's."""
        idle = [s for s in slots if not s.busy]
        live = [r for r in runs if not r.stopped and (r.pending or needs_probe(r))]
        if not idle or not live:
            return Plan([], {}, len(idle))
        quotas = bool(policy.users or policy.projects)
        usage = Usage(slots, quotas or len({(r.project, r.user) for r in live}) > 1)
        assignments = []
        while idle and live:
            choice = self._choose(live, idle, slots, usage, policy)
            if choice is None:
                break
            run, task, slot = choice
            if task is None:
                run.probing = True  # one probe per run: its tasks come once it is measured
                tasks = []
            else:
                tasks = run.take_batch(task, run.batch_size(len(slots)))
            idle.remove(slot)
            usage.add(run.user, run.project, slot.kind, run.id)
            assignments.append(Assignment(run, slot, tasks))
            if not run.pending and not needs_probe(run):
                live.remove(run)
        waiting: dict[str, str] = {}
        if idle and quotas:
            for run in live:
                kinds = sorted({s.kind for s in idle})
                reasons = [usage.over_quota(run.user, run.project, k, policy) for k in kinds]
                if all(reasons):
                    waiting[run.id] = str(reasons[0])
        return Plan(assignments, waiting, len(idle))

    def _choose(
        self,
        live: list[Run],
        idle: list[Slot],
        slots: Sequence[Slot],
        usage: Usage,
        policy: Policy,
    ) -> tuple[Run, RenderTask | None, Slot] | None:
        """The best (run, task or None for a probe, idle slot), or None when no run may
        take any idle slot now."""

        def rank(run: Run) -> tuple[bool, float, int, bool, float]:
            project, user = run.project, run.user
            return (not run.urgent, usage.projects[project] / policy.weight(project),
                    usage.users[(project, user)], not needs_probe(run), run.score)  # fmt: skip

        switch: tuple[Run, RenderTask, list[Slot]] | None = None
        idle_kinds = {s.kind for s in idle}
        quotas = bool(policy.users or policy.projects)
        everyone: frozenset[int] | None = None  # every slot's index, once a run needs it
        if len(live) == 1:
            ranked = live
        elif usage.count:
            ranked = sorted(live, key=rank)
        else:  # one share, no quota: urgency, the probe, then priority and age
            ranked = sorted(live, key=lambda r: (not r.urgent, not needs_probe(r), r.score))
        for run in ranked:
            if switch is not None and (run.urgent, run.priority) != (
                switch[0].urgent,
                switch[0].priority,
            ):
                break
            # Quotas count slots by kind (a farm's are usually all of one): asked once a kind.
            kinds = idle_kinds if not quotas else {
                k for k in idle_kinds if usage.over_quota(run.user, run.project, k, policy) is None
            }  # fmt: skip
            if not kinds:
                continue
            allowed = idle if len(kinds) == len(idle_kinds) else [
                s for s in idle if s.kind in kinds]  # fmt: skip
            if needs_probe(run):
                same = [s for s in allowed if s.blender == run.blender]
                return (
                    run,
                    None,
                    prefer(same, run.scene_hash) if same else self._to_switch(allowed, live),
                )
            blocked = {s.index for s in slots if s.node in run.blocked} if run.blocked else set()
            if (run.failed_on or blocked) and everyone is None:
                everyone = frozenset(s.index for s in slots)
            for task in itertools.islice(run.pending, LOOKAHEAD):
                fresh = allowed
                if everyone is not None and (run.failed_on or blocked):
                    avoid = run.failed_on.get(task_key(task), set()) | blocked
                    if avoid and not avoid >= everyone:
                        fresh = [s for s in allowed if s.index not in avoid]
                if not fresh:
                    continue
                same = [s for s in fresh if s.blender == task.blender]
                if same:
                    return run, task, prefer(same, run.scene_hash)
                if switch is None:
                    switch = (run, task, fresh)
                    if run.id not in usage.served:
                        return run, task, self._to_switch(fresh, live)
                break  # its other tasks need the same version
        if switch is None:
            return None
        run, task, fresh = switch
        return run, task, self._to_switch(fresh, live)

    @staticmethod
    def _to_switch(slots: list[Slot], live: list[Run]) -> Slot:
        """The one of ``slots`` (idle) to switch to another Blender version: one with no
        worker yet, else one whose version no waiting run needs, else the first."""
        wanted = {r.blender for r in live if r.pending}
        return next(
            (s for s in slots if s.blender is None),
            next((s for s in slots if s.blender not in wanted), slots[0]),
        )


def _dependencies(job: Queued, states: Mapping[str, str | None]) -> tuple[str | None, list[str]]:
    """(why ``job`` can never run, or None; the jobs it still waits for, with their state)."""
    blocked = []
    for dep in job.depends_on:
        state = states.get(dep)
        if state is None:
            return f"job {dep}, which this job depends on, no longer exists", []
        if state in _DEAD_ENDS:
            return f"job {dep}, which this job depends on, {_DEAD_ENDS[state]}", []
        if state != "COMPLETED":
            blocked.append(f"{dep} ({state})")
    return None, blocked
