"""A multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``): a head that
renders nothing and nodes that each declare one GPU, with `rayfarm up --address`
attached to it. One render actor per GPU node, tasks spread over the nodes, a node
removed mid-job (the job still completes, every frame correct and stored once), and a
node added mid-job getting work without a restart.

The nodes' "GPUs" are Ray resources only: Cycles finds no GPU in them, so the actors
render on the CPU and say so (``CPU (no usable GPU backend on this node)``).
"""

import re
import subprocess
import time
from collections import Counter

import numpy as np
import pytest
import ray
from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray.cluster_utils import Cluster
from ray.experimental.internal_kv import _internal_kv_get

from rayfarm import Farm, JobState

from helpers import PYTHON
from helpers.blender import pixels, render_reference
from helpers.farms import WAIT_S, run_farm

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

#: GCS notices a lost node within ~1.5 s instead of its default 30 s.
FAST_HEALTH = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_initial_delay_ms": 0,
}


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "num_gpus": 0, "_system_config": FAST_HEALTH},
    )
    nodes = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    ray.init(address=c.address)
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def cluster_farm(cluster, tmp_path_factory, farm_env):
    c, _ = cluster
    yield from run_farm(tmp_path_factory.mktemp("cluster-farm"), farm_env,
                        ("--address", c.address))  # fmt: skip


@pytest.fixture(scope="module")
def client(cluster_farm):
    with Farm(cluster_farm.url) as farm:
        yield farm


@pytest.fixture(scope="module")
def scene(make_scene):
    # Slow enough per frame (on these shared cores) that a node can leave mid-job.
    return make_scene("--width", "96", "--height", "72", "--samples", "512", "--frames", "12")


def _events(farm, job_id, kind):
    return [e for e in farm.events(job_id) if e["kind"] == kind]


def _wait_for(predicate, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _workers(client):
    return client.health()["workers"]["count"]


def _check_frames(job, scene, tmp_path):
    refs = render_reference(scene, tmp_path / "ref", job.spec.frame_list)
    got = job.download(tmp_path / "farm")
    for path in got:
        frame = int(path.stem)
        assert np.array_equal(pixels(path), pixels(refs[frame])), f"frame {frame} differs"


def test_a_node_leaves_mid_job_and_the_job_completes(cluster, cluster_farm, client, scene,
                                                       tmp_path):  # fmt: skip
    c, nodes = cluster
    _wait_for(lambda: _workers(client) == 2)  # one actor per GPU node, none on the head
    job = client.submit(scene, frames="1-8")
    ids = {n.node_id for n in nodes}

    def both_busy():
        started = _events(cluster_farm, job.id, "task_started")
        return {e["node"] for e in started} >= ids

    _wait_for(both_busy)
    # Take the node away like a crash or a preemption (SIGKILL, no graceful drain that
    # would let its task finish) while a task on it is less than half rendered.
    victim = nodes[1]

    def early_task_on_victim():
        events = cluster_farm.events(job.id)
        done = {e["task"] for e in events if e["kind"] == "task_done"}
        running = {e["task"] for e in events if e["kind"] == "task_started"
                   and e["node"] == victim.node_id and e["task"] not in done}  # fmt: skip
        latest = {e["task"]: e for e in events if e["kind"] == "progress"}
        early = [t for t in running if t in latest]
        return [t for t in early if 2 * int(latest[t]["samples"]) <= int(latest[t]["of"])]

    _wait_for(early_task_on_victim)
    c.remove_node(victim, allow_graceful=False)

    status = job.wait(timeout=WAIT_S)
    assert status.state is JobState.COMPLETED, status.error
    failed = _events(cluster_farm, job.id, "task_failed")
    lost = [e for e in failed if "left the cluster" in e["error"]]
    assert lost and all(e["retry"] == "True" for e in lost), failed
    redone = {e["task"] for e in lost}
    finished = Counter(e["task"] for e in _events(cluster_farm, job.id, "task_done"))
    assert all(finished[t] == 1 for t in redone)  # rendered again, elsewhere, once
    frames = Counter(e["frame"] for e in _events(cluster_farm, job.id, "frame"))
    assert sorted(frames) == [str(f) for f in range(1, 9)] and set(frames.values()) == {1}
    assert {e["device"] for e in _events(cluster_farm, job.id, "task_done")} == {
        "CPU (no usable GPU backend on this node)"
    }
    _check_frames(job.refresh(), scene, tmp_path)
    _wait_for(lambda: _workers(client) == 1)  # the pool shrank with the cluster


def test_a_node_added_mid_job_gets_work(cluster, cluster_farm, client, scene, tmp_path):
    c, nodes = cluster
    job = client.submit(scene, frames="1-12")
    _wait_for(lambda: _events(cluster_farm, job.id, "task_started"))
    joined = c.add_node(num_cpus=1, num_gpus=1)
    nodes.append(joined)
    status = job.wait(timeout=WAIT_S)
    assert status.state is JobState.COMPLETED, status.error
    on_new = [e for e in _events(cluster_farm, job.id, "task_done")
              if e["node"] == joined.node_id]  # fmt: skip
    assert on_new, "the node that joined rendered nothing"
    assert _workers(client) == 2
    _check_frames(job.refresh(), scene, tmp_path)
    # Autoscaling off (no RAYFARM_MAX_RENDER_NODES): the farm followed the nodes it was
    # given and never asked the cluster for any (no request_resources call on record).
    assert _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) is None


def test_render_job_goes_through_the_farm_when_its_service_runs(
    cluster, cluster_farm, client, small_scene, tmp_path
):
    """`python -m rayfarm.cluster.render_job` on a cluster where the farm's service runs:
    the job goes to the farm's dispatcher and storage, so the API knows it."""
    c, _ = cluster
    module = [PYTHON, "-m", "rayfarm.cluster.render_job", str(small_scene), "--frames", "1-2",
              "--address", c.address]  # fmt: skip
    elsewhere = subprocess.run([*module, "--output", (tmp_path / "x").as_uri()],
                               capture_output=True, text=True, timeout=120)  # fmt: skip
    assert elsewhere.returncode == 2 and "the farm on this cluster writes to" in elsewhere.stderr
    run = subprocess.run(module, capture_output=True, text=True, timeout=WAIT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "using the farm's dispatcher" in run.stdout
    job_id = re.search(r"job ([0-9a-f]{16}) queued", run.stdout)[1]
    job = client.job(job_id)
    assert job.state is JobState.COMPLETED and [f.frame for f in job.frames()] == [1, 2]
    assert (cluster_farm.storage_dir / "jobs" / job_id / "manifest.json").is_file()


def test_the_control_plane_lives_on_the_head(cluster, cluster_farm, client):
    """The dispatcher, the API replicas and the proxy reserve no CPU; pinned to the head,
    they never die with a worker (a replica on a removed node failed requests in flight)."""
    from ray.util.state import list_actors

    c, _ = cluster
    _wait_for(lambda: _workers(client) >= 1)
    head = c.head_node.node_id
    placed = {(a.class_name, a.node_id) for a in list_actors(filters=[("state", "=", "ALIVE")])}
    control = {name: node for name, node in placed if not name.startswith("RenderActor")}
    assert {"Dispatcher", "ServeReplica:rayfarm:api", "ProxyActor"} <= set(control), placed
    assert set(control.values()) == {head}, control
    assert any(name == "RenderActor" and node != head for name, node in placed)
