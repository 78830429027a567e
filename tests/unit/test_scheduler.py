"""The scheduler on its own (``rayfarm.cluster.scheduler``): no Ray, no Redis, runs and
slots built here. The rules the dispatcher always had (Blender versions, scene affinity,
failed-on avoidance, blocked nodes, batches, the ``tiles="auto"`` probe, admission while
the farm is full) and the new ones (fair share, quotas, urgent jobs, dependencies,
preview order), then properties over random farms (hypothesis): no slot given twice, no
task twice, no task of a job whose dependencies are unfinished, no quota exceeded, and
every job's every task scheduled in the end."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayfarm.cluster import keys
from rayfarm.cluster.job_index import queue_score
from rayfarm.cluster.runs import MAX_BATCH, Run, Slot, expand
from rayfarm.cluster.scheduler import Policy, Queued, Quota, Scheduler
from rayfarm.frames import preview_order
from rayfarm.models import JobRecord, JobSpec, JobState

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SCHED = Scheduler()


def _job(n: int, frames: str = "1-4", owner: str = "ana", project: str | None = None,
         priority: int = 50, blender: str = "5.0", **spec: object) -> JobRecord:  # fmt: skip
    s = JobSpec(frames=frames, priority=priority, project=project, **spec)  # type: ignore[arg-type]
    count = len(s.frame_list)
    return JobRecord(id=f"{n:016x}", state=JobState.PROCESSING, owner=owner, spec=s,
               scene_file="s.blend", frames_total=count, tasks_total=count, rendered_by=blender,
               created_at=T0 + timedelta(seconds=n))  # fmt: skip


def _run(job: JobRecord, grid: tuple[int, int] | None = (1, 1), urgent: bool = False) -> Run:
    run = Run(job=job, scene_hash=f"scene-{job.id}", inputs=None,  # type: ignore[arg-type]
              score=queue_score(job.spec.priority, job.created_at.isoformat()), grid=grid,
              urgent=urgent)  # fmt: skip
    if grid is not None:
        run.pending.extend(expand(job, run.scene_hash, set(), grid))
    return run


def _slots(*versions: str | None, kind: str = "cpu") -> list[Slot]:
    return [Slot(i, handle=None, blender=v, kind=kind, node=f"node{i}")
            for i, v in enumerate(versions)]  # fmt: skip


def _busy(slot: Slot, run: Run) -> Slot:
    slot.busy, slot.run, slot.user, slot.project = True, run.id, run.user, run.project
    return slot


def _plan(runs: list[Run], slots: list[Slot], policy: Policy | None = None) -> list[tuple]:
    """(run id, frames, slot index) of each assignment, marking the slots busy."""
    plan = SCHED.plan(runs, slots, policy or Policy())
    out = []
    for a in plan.assignments:
        _busy(a.slot, a.run)
        out.append((a.run.id, [t.frame for t in a.tasks], a.slot.index))
    return out


# -- the rules the dispatcher always had ---------------------------------------------------


def test_a_task_goes_to_an_actor_already_running_its_blender():
    runs = [_run(_job(1, "1", blender="5.3"))]
    assert _plan(runs, _slots("5.0", "5.3")) == [(runs[0].id, [1], 1)]


def test_a_later_job_that_fits_an_idle_actor_takes_it_while_the_first_is_served():
    first, later = _run(_job(1, blender="5.0")), _run(_job(2, blender="5.3"))
    slots = _slots("5.0", "5.3")
    _busy(slots[0], first)  # the first job renders already, on a 5.0 actor
    assert _plan([first, later], slots) == [(later.id, [1], 1)]
    # Not yet served, the first job takes the idle actor, which switches.
    first, later = _run(_job(1, blender="5.0")), _run(_job(2, blender="5.3"))
    slots = _slots("5.3", "5.3")
    _busy(slots[1], later)
    assert _plan([first, later], slots) == [(first.id, [1], 0)]


def test_a_higher_priority_job_switches_an_actor_rather_than_wait():
    high = _run(_job(1, priority=80, blender="5.0"))
    low = _run(_job(2, priority=50, blender="5.3"))
    slots = _slots("5.0", "5.3")
    _busy(slots[0], high)
    assert _plan([high, low], slots) == [(high.id, [1], 1)]


def test_the_actor_to_switch_is_one_without_a_worker_then_one_nobody_waits_for():
    run = _run(_job(1, blender="5.0"))
    other = _run(_job(2, blender="5.3"))
    slots = _slots("5.3", None, "5.3")
    _busy(slots[2], other)
    assert _plan([run, other], slots)[0][2] == 1  # no worker yet
    run, waiting = _run(_job(1, blender="4.5")), _run(_job(2, blender="5.3"))
    slots = _slots("5.3", "5.0", "5.0")
    _busy(slots[2], waiting)
    _busy(_slots("5.3")[0], run)  # (another slot elsewhere serves it: served)
    got = SCHED.plan([run, waiting], slots, Policy()).assignments
    first = next(a for a in got if a.run is run)
    assert first.slot.blender == "5.0"  # 5.3 is what the other waiting job needs


def test_an_actor_that_holds_the_scene_is_preferred():
    run = _run(_job(1, "1"))
    slots = _slots("5.0", "5.0", "5.0")
    slots[2].holds = run.scene_hash
    assert _plan([run], slots) == [(run.id, [1], 2)]


def test_a_failed_task_goes_to_another_actor_or_waits_while_it_is_busy():
    run = _run(_job(1, "1-3"))
    run.failed_on[keys.task_key(1, 0)] = {0}
    slots = _slots("5.0", "5.0")
    _busy(slots[1], _run(_job(9)))
    # Only actor 0 is idle: it takes frame 2; frame 1 waits for another actor.
    assert _plan([run], slots) == [(run.id, [2], 0)]
    assert [t.frame for t in run.pending] == [1, 3]
    # Ruled out on every actor, the task may run on one of them again.
    run = _run(_job(1, "1"))
    run.failed_on[keys.task_key(1, 0)] = {0, 1}
    assert _plan([run], _slots("5.0", "5.0")) == [(run.id, [1], 0)]


def test_a_blocked_node_gets_none_of_the_jobs_tasks():
    run, other = _run(_job(1, "1-2")), _run(_job(2, "1"))
    run.blocked.add("node0")
    slots = _slots("5.0", "5.0")
    got = _plan([run, other], slots)
    assert (run.id, [1], 1) in got and (other.id, [1], 0) in got


def test_short_frames_go_in_batches():
    run = _run(_job(1, "1-200"))
    run.frame_s.append(0.0)
    got = _plan([run], _slots("5.0", "5.0"))
    assert [len(frames) for _, frames, _ in got] == [MAX_BATCH, MAX_BATCH]
    assert got[0][1] == list(range(1, MAX_BATCH + 1))


def test_an_auto_tiled_job_probes_its_scene_first_and_once():
    old = _run(_job(1, "1-8"))
    auto = _run(_job(2, "1"), grid=None)
    got = _plan([old, auto], _slots("5.0", "5.0", "5.0"))
    assert got[0] == (auto.id, [], 0)  # a probe: no tasks
    assert auto.probing and [r for r, _, _ in got].count(auto.id) == 1


def test_jobs_start_when_there_is_room_or_they_outrank_the_waiting_work():
    waiting = _run(_job(1, "1-10"))
    slots = _slots("5.0", "5.0")
    later = Queued("b" * 16, "ana", "", 50, tasks=4)
    urgent_one = Queued("c" * 16, "ana", "", 50, tasks=4, urgent=True)
    higher = Queued("d" * 16, "ana", "", 70, tasks=4)
    # The farm is full (10 tasks wait for 2 actors): only a job that outranks them starts.
    assert SCHED.admit([higher, later], {}, [waiting], slots, Policy()).start == [higher.id]
    assert SCHED.admit([urgent_one, later], {}, [waiting], slots, Policy()).start == [urgent_one.id]
    waiting.pending.clear()
    got = SCHED.admit([later], {}, [waiting], slots, Policy())
    assert got.start == [later.id]  # two idle actors, nothing waiting


def test_a_newcomers_job_starts_while_the_farm_is_full():
    big = _run(_job(1, "1-40", owner="ana"))
    slots = _slots("5.0", "5.0")
    for slot in slots:
        _busy(slot, big)
    small = Queued("b" * 16, "ben", "", 50, tasks=4)
    again = Queued("c" * 16, "ben", "", 50, tasks=4)
    got = SCHED.admit([small, again], {}, [big], slots, Policy())
    assert got.start == [small.id]  # one job per share that has nothing waiting
    # A farm with no slots at all (scaled to zero) starts nothing new: its queue stays.
    assert SCHED.admit([small], {}, [big], [], Policy()).start == []
    # When a slot frees, the newcomer gets it, not the big job's 38 waiting frames.
    small_run = _run(_job(2, "1-4", owner="ben"))
    slots[0].busy = False
    assert _plan([big, small_run], slots) == [(small_run.id, [1], 0)]


# -- fair share, quotas, urgent jobs, dependencies -----------------------------------------


def _steady(runs: list[Run], slots: list[Slot], policy: Policy, rounds: int = 200) -> Counter:
    """Free one random busy slot at a time and refill: the slots each share holds."""
    rng = random.Random(7)
    _plan(runs, slots, policy)
    for _ in range(rounds):
        slot = rng.choice([s for s in slots if s.busy])
        slot.busy, slot.run, slot.user, slot.project = False, None, None, None
        _plan(runs, slots, policy)
    return Counter(s.project for s in slots if s.busy)


def test_running_slots_follow_the_project_weights():
    a = _run(_job(1, "1-1000", owner="ana", project="film"))
    b = _run(_job(2, "1-1000", owner="ben", project="ads"))
    held = _steady([a, b], _slots(*["5.0"] * 8), Policy(weights={"film": 3}))
    assert held == {"film": 6, "ads": 2}
    held = _steady([a, b], _slots(*["5.0"] * 8), Policy())
    assert held == {"film": 4, "ads": 4}


def test_users_share_a_project_equally_and_priority_orders_inside_a_share():
    low = _run(_job(1, "1-100", owner="ana", priority=10))
    high = _run(_job(2, "1-100", owner="ana", priority=90))
    ben = _run(_job(3, "1-100", owner="ben", priority=10))
    slots = _slots(*["5.0"] * 4)
    got = _plan([low, high, ben], slots)
    assert Counter(r for r, _, _ in got) == {high.id: 2, ben.id: 2}


def test_an_urgent_job_goes_before_every_share():
    a = _run(_job(1, "1-100", owner="ana"))
    b = _run(_job(2, "1-100", owner="ben", priority=0), urgent=True)
    got = _plan([a, b], _slots("5.0", "5.0", "5.0"))
    assert [r for r, _, _ in got] == [b.id] * 3


def test_quotas_cap_a_users_and_a_projects_slots_and_say_so():
    a = _run(_job(1, "1-100", owner="ana", project="film"))
    b = _run(_job(2, "1-100", owner="ben", project="film"))
    slots = _slots(*["5.0"] * 6)
    policy = Policy(users={"ana": Quota(cpu=1)}, projects={"film": Quota(cpu=3, gpu=0)})
    plan = SCHED.plan([a, b], slots, policy)
    assert Counter(x.run.id for x in plan.assignments) == {a.id: 1, b.id: 2}
    assert plan.idle == 3
    assert plan.waiting == {
        a.id: "over quota: user ana's jobs hold the 1 CPU slot(s) it may have at once",
        b.id: "over quota: project film's jobs hold the 3 CPU slot(s) it may have at once",
    }
    # GPU slots are counted apart: the project may hold none of those.
    gpus = _slots("5.0", kind="gpu")
    assert SCHED.plan([_run(_job(3, owner="cy", project="film"))], gpus, policy).assignments == []
    # A queued job of a user at quota waits with the reason.
    for x in plan.assignments:
        _busy(x.slot, x.run)
    got = SCHED.admit([Queued("e" * 16, "ana", "film", 50, 4)], {}, [a, b], slots, policy)
    assert got.start == [] and "user ana's jobs hold the 1 CPU" in got.wait["e" * 16]
    # So it does in the instant a slot of ana's is free before her next task takes it.
    held = next(x.slot for x in plan.assignments if x.run is a)
    held.busy, held.run, held.user, held.project = False, None, None, None
    got = SCHED.admit([Queued("e" * 16, "ana", "film", 50, 4)], {}, [a, b], slots, policy)
    assert got.start == [] and "user ana's jobs hold the 1 CPU" in got.wait["e" * 16]
    zero = Policy(users={"ana": Quota(cpu=0)})
    got = SCHED.admit([Queued("e" * 16, "ana", "", 50, 4)], {}, [], _slots("5.0"), zero)
    assert got.wait == {"e" * 16: "over quota: user ana may hold no CPU slots"}


def test_a_job_waits_for_its_dependencies_and_fails_when_one_fails():
    slots = _slots("5.0", "5.0")
    dep1, dep2 = "1" * 16, "2" * 16
    job = Queued("f" * 16, "ana", "", 50, 4, depends_on=(dep1, dep2))
    got = SCHED.admit([job], {dep1: "COMPLETED", dep2: "PROCESSING"}, [], slots, Policy())
    assert got.start == [] and got.wait == {job.id: f"blocked by {dep2} (PROCESSING)"}
    got = SCHED.admit([job], {dep1: "COMPLETED", dep2: "COMPLETED"}, [], slots, Policy())
    assert got.start == [job.id]
    for state, says in (("FAILED", "failed"), ("CANCELLED", "was cancelled"),
                        (None, "no longer exists")):  # fmt: skip
        got = SCHED.admit([job], {dep1: "COMPLETED", dep2: state}, [], slots, Policy())
        assert got.fail == {job.id: f"job {dep2}, which this job depends on, {says}"}
    # A blocked job does not hold back the jobs behind it.
    free = Queued("a" * 16, "ana", "", 50, 4)
    got = SCHED.admit([job, free], {dep1: "PENDING", dep2: "PENDING"}, [], slots, Policy())
    assert got.start == [free.id]


def test_preview_order_renders_the_ends_and_middles_first():
    assert preview_order(list(range(1, 10))) == [1, 9, 5, 3, 7, 2, 4, 6, 8]
    job = _job(1, "10-50x10", order="preview")
    assert [t.frame for t in expand(job, "h", set(), (1, 1))] == [10, 50, 30, 20, 40]
    assert [t.frame for t in expand(_job(1, "10-50x10"), "h", set(), (1, 1))] == [
        10, 20, 30, 40, 50,
    ]  # fmt: skip
    tiled = [(t.frame, t.tile) for t in expand(job, "h", {50}, (2, 1))]
    assert tiled == [(10, 0), (10, 1), (30, 0), (30, 1), (20, 0), (20, 1), (40, 0), (40, 1)]
    for n in range(40):
        assert sorted(preview_order(list(range(n)))) == list(range(n))


# -- properties over random farms -----------------------------------------------------------

USERS, PROJECTS, VERSIONS = ("ana", "ben", "cy"), (None, "film", "ads"), ("5.0", "5.3")


@st.composite
def farms(draw: st.DrawFn) -> dict:
    slots = draw(st.lists(st.sampled_from((*VERSIONS, None)), min_size=1, max_size=5))
    jobs = []
    for n in range(draw(st.integers(1, 6))):
        jobs.append({
            "n": n + 1,
            "frames": draw(st.integers(1, 8)),
            "owner": draw(st.sampled_from(USERS)),
            "project": draw(st.sampled_from(PROJECTS)),
            "priority": draw(st.sampled_from((40, 50, 60))),
            "blender": draw(st.sampled_from(VERSIONS)),
            "auto": draw(st.booleans()),
            "urgent": draw(st.integers(0, 5)) == 0,
            # Only earlier jobs: a submitted job can only wait for jobs that exist.
            "depends_on": draw(st.lists(st.integers(1, n), unique=True, max_size=2))
            if n else [],
        })  # fmt: skip
    quota = st.none() | st.integers(1, 3)
    policy = Policy(
        weights={p: draw(st.integers(1, 4)) for p in ("film", "ads")},
        users={u: Quota(cpu=draw(quota)) for u in USERS},
        projects={p: Quota(cpu=draw(quota)) for p in ("film", "ads")},
    )
    # A doomed job fails at its first frame (its dependents fail with it); a flaky job's
    # first frame fails once, on one actor, and is retried on another.
    doomed, flaky = draw(st.sets(st.integers(1, 6), max_size=1)), draw(st.sets(st.integers(1, 6)))
    return {"slots": slots, "jobs": jobs, "policy": policy, "doomed": doomed, "flaky": flaky}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(farm=farms(), rng=st.randoms(use_true_random=False))
def test_any_farm_schedules_every_task_once_within_its_rules(farm: dict, rng: random.Random):
    policy: Policy = farm["policy"]
    slots = _slots(*farm["slots"])
    jobs = {j["n"]: (j, _job(j["n"], f"1-{j['frames']}", j["owner"], j["project"],
                             j["priority"], j["blender"])) for j in farm["jobs"]}  # fmt: skip
    ids = {n: job.id for n, (_, job) in jobs.items()}
    state = {job.id: "PENDING" for _, job in jobs.values()}
    runs: dict[str, Run] = {}
    given_out: Counter = Counter()  # (job id, frame) -> times handed out
    doing: dict[int, tuple[Run, list]] = {}  # slot index -> its run and tasks (None: probe)
    failures: Counter = Counter()
    for _ in range(2000):
        # Admission.
        queued = [Queued(job.id, spec["owner"], spec["project"] or "", spec["priority"],
                         spec["frames"], spec["urgent"],
                         tuple(ids[d] for d in spec["depends_on"]))
                  for spec, job in jobs.values() if state[job.id] == "PENDING"]  # fmt: skip
        queued.sort(key=lambda q: (not q.urgent, -q.priority, q.id))
        admission = SCHED.admit(queued, dict(state), runs.values(), slots, policy)
        for job_id in admission.fail:
            state[job_id] = "FAILED"
        for job_id in admission.start:
            spec, job = next(x for x in jobs.values() if x[1].id == job_id)
            assert all(state[ids[d]] == "COMPLETED" for d in spec["depends_on"])
            state[job_id] = "PROCESSING"
            runs[job_id] = _run(job, grid=None if spec["auto"] else (1, 1), urgent=spec["urgent"])
        # Assignment.
        idle_before = {s.index for s in slots if not s.busy}
        plan = SCHED.plan(list(runs.values()), slots, policy)
        used = [a.slot.index for a in plan.assignments]
        assert len(used) == len(set(used)) and set(used) <= idle_before
        for a in plan.assignments:
            _busy(a.slot, a.run)
            doing[a.slot.index] = (a.run, a.tasks or None)
            for t in a.tasks:
                given_out[(a.run.id, t.frame)] += 1
                assert t.job_id == a.run.id
        held = Counter((s.user, s.kind) for s in slots if s.busy)
        for (user, kind), n in held.items():
            limit = policy.users[user].limit(kind)
            assert limit is None or n <= limit, (user, n, limit)
        by_project = Counter((s.project, s.kind) for s in slots if s.busy and s.project)
        for (project, kind), n in by_project.items():
            limit = policy.projects[project].limit(kind)
            assert limit is None or n <= limit, (project, n, limit)
        if all(s in ("COMPLETED", "FAILED") for s in state.values()):
            break
        # Some of the busy slots finish.
        busy = [s for s in slots if s.busy]
        assert busy or not runs, "work waits while every slot is idle"
        for slot in rng.sample(busy, rng.randint(1, len(busy))) if busy else []:
            run, tasks = doing.pop(slot.index)
            slot.busy, slot.run, slot.user, slot.project = False, None, None, None
            if run.stopped:
                continue  # its job failed meanwhile
            n = next(n for n, i in ids.items() if i == run.id)
            if tasks is None:  # the probe measured the scene: whole frames
                run.probing = False
                run.grid = (1, 1)
                run.pending.extend(expand(run.job, run.scene_hash, set(), (1, 1)))
            elif tasks[0].frame == 1 and n in farm["doomed"]:
                run.stopped = True
                run.pending.clear()
                state[run.id] = "FAILED"
                del runs[run.id]
                continue
            elif tasks[0].frame == 1 and n in farm["flaky"] and not failures[run.id]:
                failures[run.id] += 1
                given_out[(run.id, 1)] -= 1
                run.failed_on.setdefault(keys.task_key(1, 0), set()).add(slot.index)
                run.pending.appendleft(tasks[0])
                run.pending.extend(tasks[1:])  # the rest of its batch goes back too
                for t in tasks[1:]:
                    given_out[(run.id, t.frame)] -= 1
            if (
                not run.pending
                and run.grid is not None
                and not any(r is run for r, _ in doing.values())
            ):
                state[run.id] = "COMPLETED"
                del runs[run.id]
    else:
        pytest.fail(f"not done after 2000 rounds: {state}")
    for spec, job in jobs.values():
        lost = spec["n"] in farm["doomed"] or any(
            state[ids[d]] == "FAILED" for d in spec["depends_on"]
        )
        assert state[job.id] == ("FAILED" if lost else "COMPLETED"), (spec, state)
        if state[job.id] == "COMPLETED":  # every frame handed out exactly once
            assert {f: given_out[(job.id, f)] for f in job.spec.frame_list} == {
                f: 1 for f in job.spec.frame_list
            }
