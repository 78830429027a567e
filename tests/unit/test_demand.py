"""The farm's demand on its own (``rayfarm.cluster.demand``): no Ray, no Redis, runs,
slots and queued jobs built here. What the work of each pool (Blender version x kind of
slot) could use, and the request for render nodes that follows: raised as the queue
grows, capped by the farm's and each pool's maximum, the minimum kept, nothing asked for
an empty queue; then properties over random farms (hypothesis). The scaler's requests (what
it passes to ``request_resources``, recorded here instead of sent to a cluster) and the
autoscaling settings' checks close the file."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_scheduler import _busy, _job, _run, _slots

from rayfarm.cluster.demand import Limits, PoolDemand, demand, request
from rayfarm.cluster.scaler import REQUEST_REFRESH_S, Scaler
from rayfarm.cluster.scheduler import Policy, Queued, Quota
from rayfarm.cluster.settings import Settings


def _queued(n: int, tasks: int, blender: str | None = "5.0", user: str = "ana") -> Queued:
    return Queued(f"q{n:015x}", user, "", 50, tasks, blender=blender)


def _asked(pools: dict[str, PoolDemand], **limits: object) -> tuple[int, int]:
    got = request(pools, Limits(**limits))  # type: ignore[arg-type]
    return got.slots, got.nodes


def test_an_empty_farm_asks_for_nothing_and_a_minimum_for_its_warm_nodes():
    assert demand([], [], [], "gpu", "5.0") == {}
    assert _asked({}, max_nodes=8) == (0, 0)
    assert _asked({}, max_nodes=8, min_nodes=2) == (2, 2)
    # 2-GPU nodes: the warm nodes' every GPU is asked for.
    assert _asked({}, max_nodes=8, min_nodes=2, slots_per_node=2) == (4, 2)


def test_the_work_of_each_pool_is_its_busy_slots_its_pending_tasks_and_queued_jobs():
    running = _run(_job(1, "1-10", blender="5.3"))
    probing = _run(_job(2, "1-3", blender="5.0"), grid=None)  # tiles="auto", not measured
    slots = _slots("5.3", "5.3", "5.0", kind="gpu")
    _busy(slots[0], running)
    _busy(slots[1], running)
    for _ in range(2):  # two of its tasks are on the busy slots
        running.pending.popleft()
    queued = [_queued(3, 6, "5.0"), _queued(4, 4, None)]  # None: the farm's newest, 5.3
    pools = demand([running, probing], slots, queued, "gpu", "5.3")
    assert pools == {
        "5.3/gpu": PoolDemand(queued=8 + 4, usable=12, running=2),
        "5.0/gpu": PoolDemand(queued=1 + 6, usable=7, running=0),
    }
    assert _asked(pools, max_nodes=100) == (14 + 7, 21)


def test_the_request_rises_with_the_queue_up_to_the_maximum_and_falls_to_nothing():
    asked = []
    for tasks in (0, 1, 3, 6, 20, 2000, 5, 0):
        pools = demand([], [], [_queued(1, tasks)] if tasks else [], "gpu", "5.0")
        asked.append(_asked(pools, max_nodes=6))
    assert asked == [(0, 0), (1, 1), (3, 3), (6, 6), (6, 6), (6, 6), (5, 5), (0, 0)]


def test_each_pool_is_capped_by_its_own_maximum_and_all_by_the_farms():
    pools = demand([], [], [_queued(1, 50, "5.3"), _queued(2, 50, "5.0")], "gpu", "5.3")
    got = request(pools, Limits(max_nodes=10, pool_max_nodes={"5.0": 2}))
    assert got.wanted == {"5.3/gpu": 50, "5.0/gpu": 2}
    assert (got.slots, got.nodes) == (10, 10)
    got = request(pools, Limits(max_nodes=10, pool_max_nodes={"5.0": 2, "5.3": 3}))
    assert (got.slots, got.nodes) == (5, 5)
    got = request(pools, Limits(max_nodes=10, pool_max_nodes={"5.0": 0, "5.3": 3}))
    assert got.wanted["5.0/gpu"] == 0 and got.slots == 3


def test_nodes_of_several_slots_are_asked_for_whole():
    pools = {"5.0/gpu": PoolDemand(queued=5, usable=5)}
    # 4-GPU nodes: 5 slots fill 2 nodes; the cap of 3 nodes is 12 slots.
    assert _asked(pools, max_nodes=3, slots_per_node=4) == (5, 2)
    pools = {"5.0/gpu": PoolDemand(queued=50, usable=50)}
    assert _asked(pools, max_nodes=3, slots_per_node=4) == (12, 3)


def test_quotas_cap_what_a_users_and_a_projects_work_may_ask_for():
    policy = Policy(users={"ana": Quota(gpu=2)}, projects={"film": Quota(gpu=3, cpu=0)})
    ana = _run(_job(1, "1-10", owner="ana"))
    slots = _slots("5.0", kind="gpu")
    _busy(slots[0], ana)  # ana holds one of her two GPU slots already
    queued = [
        _queued(2, 10, user="ana"),  # ana: no room left
        Queued("q3", "ben", "film", 50, 10, blender="5.0"),  # film: 3
        Queued("q4", "cy", "film", 50, 10, blender="5.0"),  # film: no room left
        _queued(5, 4, user="dee"),  # no quota
    ]
    pools = demand([ana], slots, queued, "gpu", "5.0", policy)
    assert pools["5.0/gpu"] == PoolDemand(queued=10 + 10 + 10 + 10 + 4, usable=1 + 3 + 4,
                                          running=1)  # fmt: skip
    # A CPU quota does not cap GPU work, and the other way round.
    cpu = demand([], [], [queued[2]], "cpu", "5.0", policy)
    assert cpu["5.0/cpu"].usable == 0


def test_stopped_runs_ask_for_nothing():
    run = _run(_job(1, "1-10"))
    run.stopped = True
    assert demand([run], [], [], "gpu", "5.0") == {}


_WORK = st.lists(st.tuples(st.sampled_from(["5.3", "5.0", "4.5"]), st.integers(0, 300)), max_size=8)


@given(
    work=_WORK,
    more=st.tuples(st.sampled_from(["5.3", "5.0", "4.5"]), st.integers(1, 300)),
    max_nodes=st.integers(1, 20),
    min_nodes=st.integers(0, 20),
    per_node=st.integers(1, 8),
    caps=st.dictionaries(st.sampled_from(["5.3", "5.0", "4.5"]), st.integers(0, 20)),
)
def test_the_request_stays_in_its_bounds_and_never_falls_as_work_is_added(
    work, more, max_nodes, min_nodes, per_node, caps
):
    min_nodes = min(min_nodes, max_nodes)
    limits = Limits(max_nodes, min_nodes, caps, per_node)
    queued = [_queued(i, n, v) for i, (v, n) in enumerate(work)]
    got = request(demand([], [], queued, "gpu", "5.0"), limits)
    assert min_nodes * per_node <= got.slots <= max_nodes * per_node
    assert got.nodes == -(-got.slots // per_node) and got.nodes <= max_nodes
    for name, slots in got.wanted.items():
        cap = caps.get(name.split("/")[0])
        assert cap is None or slots <= cap * per_node
    if min_nodes == 0 and not any(n for _, n in work):
        assert got.slots == 0  # no work, no minimum: no standing request
    grown = request(demand([], [], [*queued, _queued(99, more[1], more[0])], "gpu", "5.0"),
                    limits)  # fmt: skip
    assert grown.slots >= got.slots


# -- the scaler: what is passed to request_resources -------------------------------------------


def _scaler(**settings: object) -> tuple[Scaler, list[list[dict[str, float]]]]:
    sent: list[list[dict[str, float]]] = []
    return Scaler(Settings(**settings), send=sent.append), sent  # type: ignore[arg-type]


def _work(tasks: int, blender: str = "5.0") -> dict[str, PoolDemand]:
    return demand([], [], [_queued(1, tasks, blender)] if tasks else [], "gpu", "5.0")


def test_the_request_follows_the_queue_within_the_maximum_and_an_empty_queue_withdraws_it():
    scaler, sent = _scaler(max_render_nodes=3)
    assert scaler.want == 0  # no warm nodes: no actor before there is work
    for tasks in (0, 2, 2, 20, 2000, 1, 0, 0):
        scaler.update(_work(tasks), slots_up=0, nodes_up=0)
    # Sent when it changes (the first at once: it replaces whatever an earlier dispatcher
    # left), never above 3 GPUs, and nothing left standing once the queue is empty.
    assert sent == [[], [{"GPU": 1}] * 2, [{"GPU": 1}] * 3, [{"GPU": 1}], []]
    assert [r["bundles"] for r in scaler.requests] == sent
    assert scaler.want == 0 and scaler.status()["nodes_requested"] == 0


def test_an_unchanged_request_is_sent_again_after_a_while():
    scaler, sent = _scaler(max_render_nodes=3)
    scaler.update(_work(1), slots_up=0, nodes_up=0)
    scaler.update(_work(1), slots_up=0, nodes_up=0)
    assert len(sent) == 1
    scaler._sent_at -= REQUEST_REFRESH_S  # a minute later: overwritten by another caller?
    scaler.update(_work(1), slots_up=1, nodes_up=1)
    assert sent == [[{"GPU": 1}]] * 2


def test_a_request_the_cluster_refused_is_sent_again_next_round():
    sent: list[list[dict[str, float]]] = []

    def send(bundles: list[dict[str, float]]) -> None:
        if not sent:  # the first call fails, as with the GCS restarting
            sent.append([])
            raise ConnectionError("GCS unavailable")
        sent.append(bundles)

    scaler = Scaler(Settings(max_render_nodes=2), send=send)
    scaler.update(_work(5), slots_up=0, nodes_up=0)  # raises nothing: admission goes on
    assert scaler.requests == deque()
    scaler.update(_work(5), slots_up=0, nodes_up=0)
    assert sent[1:] == [[{"GPU": 1}] * 2] and len(scaler.requests) == 1


def test_warm_nodes_shared_gpus_and_nodes_of_several_gpus():
    scaler, sent = _scaler(max_render_nodes=4, min_render_nodes=1, render_node_gpus=2,
                           gpu_share=0.5)  # fmt: skip
    assert scaler.want == 4  # one warm node of 2 GPUs, two actors on each
    scaler.update({}, slots_up=0, nodes_up=0)
    assert sent == [[{"GPU": 0.5}] * 4]
    scaler.update(_work(30), slots_up=4, nodes_up=1)
    assert sent[-1] == [{"GPU": 0.5}] * 16 and scaler.status()["nodes_requested"] == 4
    scaler.update({}, slots_up=16, nodes_up=4)
    assert sent[-1] == [{"GPU": 0.5}] * 4  # back to the warm node, not to nothing


def test_a_job_waiting_for_nodes_says_how_many_are_up():
    scaler, _ = _scaler(max_render_nodes=6)
    scaler.update(_work(6), slots_up=0, nodes_up=0)
    assert scaler.waiting_reason() == "waiting for render nodes: 0 of 6 up, scaling up"
    scaler.update(_work(6), slots_up=4, nodes_up=4)
    assert scaler.waiting_reason() == "waiting for render nodes: 4 of 6 up, scaling up"
    scaler.update(_work(6), slots_up=6, nodes_up=6)
    assert scaler.waiting_reason() is None
    status = scaler.status()
    assert status["pools"] == {"5.0/gpu": {"queued": 6, "running": 0, "wanted": 6}}
    assert (status["nodes_up"], status["slots_requested"], status["max_nodes"]) == (6, 6, 6)


def test_autoscaling_off_asks_for_nothing_and_keeps_every_slot():
    scaler, sent = _scaler()
    scaler.update(_work(500), slots_up=2, nodes_up=1)
    assert sent == [] and scaler.want is None and scaler.waiting_reason() is None
    status = scaler.status()
    assert status["autoscaling"] is False and status["requests_made"] == 0
    assert (status["slots_up"], status["slots_requested"], status["nodes_requested"]) == (2, 0, 0)
    assert status["pools"]["5.0/gpu"]["queued"] == 500


# -- the settings ------------------------------------------------------------------------------


def test_autoscaling_is_off_unless_a_maximum_is_set(monkeypatch):
    for name in ("RAYFARM_MAX_RENDER_NODES", "RAYFARM_MIN_RENDER_NODES", "RAYFARM_MAX_POOL_NODES"):
        monkeypatch.delenv(name, raising=False)
    assert not Settings.from_env().autoscaling
    monkeypatch.setenv("RAYFARM_MAX_RENDER_NODES", "6")
    monkeypatch.setenv("RAYFARM_MAX_POOL_NODES", "5.0=2")
    monkeypatch.setenv("RAYFARM_RENDER_NODE_GPUS", "4")
    monkeypatch.setenv("RAYFARM_GPU_SHARE", "0.5")
    settings = Settings.from_env(blender="5.3,5.0")
    assert settings.autoscaling and settings.slots_per_node == 8
    assert settings.pool_max_nodes == {"5.0": 2}
    assert Settings.from_dict(settings.to_dict()) == settings  # as the dispatcher gets them


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RAYFARM_MIN_RENDER_NODES": "2"}, "must be at most RAYFARM_MAX_RENDER_NODES (0)"),
        ({"RAYFARM_MAX_RENDER_NODES": "2", "RAYFARM_MIN_RENDER_NODES": "3"}, "at most"),
        ({"RAYFARM_MAX_RENDER_NODES": "-1"}, "at least 0"),
        ({"RAYFARM_MAX_POOL_NODES": "5.0"}, "'5.0' is not VERSION=NODES"),
        ({"RAYFARM_MAX_POOL_NODES": "5.0=two"}, "is not VERSION=NODES"),
        ({"RAYFARM_MAX_POOL_NODES": "4.2=1"}, "names Blender 4.2, which the farm does not offer"),
        ({"RAYFARM_RENDER_NODE_GPUS": "0"}, "RAYFARM_RENDER_NODE_GPUS must be at least 1"),
        ({"RAYFARM_ACTOR_IDLE_S": "0"}, "RAYFARM_ACTOR_IDLE_S must be a positive number"),
    ],
)
def test_bad_autoscaling_settings_are_refused_naming_the_setting(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(blender="5.3,5.0")
