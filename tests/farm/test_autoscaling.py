"""An elastic farm on Ray's fake multi-node provider (no cloud): a head that renders
nothing, an autoscaler that starts "GPU" nodes as local raylets, and `rayfarm up
--address` attached with ``RAYFARM_MAX_RENDER_NODES``.

From zero render nodes, a 20-frame job makes the farm ask for nodes (the job says it
waits for them), nodes join and get render actors without a restart, the job completes
with every frame stored once; the emptied queue withdraws the request, the idle actors
are released and Ray removes the nodes; a second job that arrives during the scale-down
is served. The request never exceeds the farm's maximum (20 tasks would use 20 slots) and
an empty queue leaves none standing: asserted on what the dispatcher passed to
``request_resources`` and on the request standing in Ray's GCS, where the (v1) autoscaler
reads it. The node count and the standing request are sampled all along.

The render actor is the no-op one (``RAYFARM_ACTOR_CLASS``, each task ``RAYFARM_NOOP_TASK_S``
long): what is under test is the farm's size, not Blender.

Ray's traps (shared/DESIGN.md): ``ray.cluster_utils.AutoscalingCluster`` wants an
``example.yaml`` the wheel lacks and runs ``ray stop --force`` (every Ray of this user, other
engineers' and CI jobs' included), so the head is started here as its ``start`` does it
(``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...``, the autoscaler updating
every second) with the config it would generate; the fake nodes join
the GCS named by the provider's ``gcs_address`` (default: port 6379), so a free port works
when it is named there; the head, the farm and this process run with one auth mode.
Everything the head and its fake nodes start carries a mark in its environment, and is
stopped by it (never ``ray stop``, which would stop other users' Ray too).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray.experimental.internal_kv import _internal_kv_get

from rayfarm import Farm, JobState
from rayfarm.cluster.ports import free_port
from rayfarm.render.noop import PNG

from helpers import ADMIN_TOKEN, PYTHON
from helpers.farms import WAIT_S, run_farm

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

#: The farm's maximum (RAYFARM_MAX_RENDER_NODES), and the cluster's too: Ray's v1
#: autoscaler on the fake provider launches one node more than a standing request of 2
#: asks for when an update runs while its (synchronous, slow here) launcher is still
#: creating the first two ("2 launching" and one "uninitialized" counted apart; seen: 3
#: nodes). The farm's cap is asserted on its requests, not on Ray's count.
MAX_NODES = 2
CLUSTER_MAX = MAX_NODES
#: Ray removes a node idle this long (6 s); the farm releases an actor idle for
#: ACTOR_IDLE_S, and a task takes TASK_S (20 frames on 2 nodes: ~10 s of rendering).
IDLE_TIMEOUT_MINUTES = 0.1
ACTOR_IDLE_S = 2
TASK_S = 1.0
MARK = "RAYFARM_TEST_CLUSTER"
AUTH = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
#: As AutoscalingCluster.start: the autoscaler looks every second (default 5 s).
AUTOSCALER = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
WAITING = "waiting for render nodes: 0 of 2 up, scaling up"


#: Autoscaling config lists the fake provider does not use (the schema wants them).
UNUSED = ("initialization_commands", "setup_commands", "head_setup_commands",
          "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
          "cluster_synced_files", "rsync_exclude", "rsync_filter")  # fmt: skip


def _config(gcs_address: str) -> dict[str, Any]:
    """The autoscaling config of a fake cluster: a head with nothing to render on and a
    GPU node type from 0 (what ray-cluster.yaml declares, on the fake provider)."""
    return {
        "cluster_name": "rayfarm-elastic",
        "max_workers": CLUSTER_MAX,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
            # Nodes asked for together start together (else one per autoscaler round).
            "launch_multiple": True,
        },
        "auth": {},
        "available_node_types": {
            "ray.head.default": {
                "resources": {"CPU": 0, "GPU": 0},
                "node_config": {},
                "max_workers": 0,
            },
            "ray.worker.gpu": {
                "resources": {"CPU": 1, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": CLUSTER_MAX,
            },
        },
        "head_node_type": "ray.head.default",
        **{key: [] for key in UNUSED},
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def _marked(mark: str) -> set[int]:
    """Pids of the processes whose environment carries ``mark``."""
    found = set()
    needle = f"{MARK}={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def _stop(mark: str) -> None:
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _marked(mark):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _live(_marked(mark)):
            time.sleep(0.2)


def _live(pids: set[int]) -> set[int]:
    """Of ``pids``, those not zombies (a killed daemon waits for init to reap it)."""
    live = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                live.add(pid)
        except (OSError, IndexError):
            continue
    return live


@pytest.fixture(scope="module")
def fake_cluster() -> Iterator[str]:
    """A fake autoscaling cluster's GCS address; this process is a driver on it."""
    from ray._private.services import get_node_ip_address

    mark = f"{os.getpid()}-{time.monotonic_ns()}"
    # Short: Ray's Unix sockets live under it (at most 107 bytes a path).
    temp = Path(tempfile.mkdtemp(prefix="rf-", dir="/tmp"))
    address = f"{get_node_ip_address()}:{free_port()}"
    config = temp / "autoscaling.yaml"
    config.write_text(json.dumps(_config(address)))
    env = {**os.environ, **AUTH, **AUTOSCALER, MARK: mark}
    patch = pytest.MonkeyPatch()
    try:
        started = subprocess.run(
            [str(Path(PYTHON).parent / "ray"), "start", "--head",
             f"--port={address.rsplit(':', 1)[1]}", f"--autoscaling-config={config}",
             "--num-cpus=0", "--num-gpus=0", f"--temp-dir={temp}", "--include-dashboard=false",
             "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        for name, value in AUTH.items():  # this driver with the head's auth mode
            patch.setenv(name, value)
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        yield address
    finally:
        ray.shutdown()
        patch.undo()
        _stop(mark)
        shutil.rmtree(temp, ignore_errors=True)
    assert not _live(_marked(mark)), "the fake cluster left processes running"


@pytest.fixture(scope="module")
def elastic_farm(fake_cluster, tmp_path_factory, farm_env):
    env = {**farm_env, **AUTH,
           "RAYFARM_MAX_RENDER_NODES": str(MAX_NODES),
           "RAYFARM_ACTOR_IDLE_S": str(ACTOR_IDLE_S),
           "RAYFARM_ACTOR_CLASS": "rayfarm.render.noop:NoopActor",
           "RAYFARM_NOOP_TASK_S": str(TASK_S)}  # fmt: skip
    yield from run_farm(tmp_path_factory.mktemp("elastic-farm"), env,
                        ("--address", fake_cluster))  # fmt: skip


@pytest.fixture(scope="module")
def client(elastic_farm):
    with Farm(elastic_farm.url) as farm:
        yield farm


def _render_nodes() -> int:
    """Live nodes with a GPU, as Ray's GCS knows them (the head has none)."""
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


def _requests() -> list[list[dict[str, float]]]:
    """Each request the dispatcher passed to ``request_resources``, oldest first."""
    dispatcher = ray.get_actor("dispatcher", namespace="rayfarm")
    return [r["bundles"] for r in ray.get(dispatcher.scaling_requests.remote())]


def _gpu_nodes() -> set[str]:
    """Ids of every render node the cluster had, gone ones included."""
    return {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU", 0) > 0}


def _standing() -> list[dict[str, float]]:
    """The request standing in the GCS, as the autoscaler reads it (v1: a KV entry that
    ``request_resources`` overwrites); none ever made reads as none."""
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    bundles: list[dict[str, float]] = json.loads(raw) if raw else []
    return bundles


def _farm(farm_url: str) -> dict[str, Any]:
    r = httpx.get(f"{farm_url}/farm", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def _metric(farm_url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{farm_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name}{labels} is not in /metrics")


def _wait_for(predicate: Any, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class _Sampler(threading.Thread):
    """The render node count and the standing request's size, sampled every 0.2 s while
    the test runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.counts: list[int] = []
        self.standing: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.counts.append(_render_nodes())
            self.standing.append(len(_standing()))
            time.sleep(0.2)


def _check_frames(farm: Any, job: Any, frames: list[int], tmp_path: Path) -> None:
    """Every frame stored once, as the no-op actor renders it, and in the manifest."""
    farm_dir = farm.storage_dir
    stored = sorted(int(e["frame"]) for e in farm.events(job.id) if e["kind"] == "frame")
    assert stored == frames
    assert [f.frame for f in job.frames()] == frames
    for path in job.download(tmp_path):
        assert path.read_bytes() == PNG, path
    manifest = json.loads((farm_dir / "jobs" / job.id / "manifest.json").read_text())
    assert sorted(int(f) for f in manifest["frames"]) == frames


def test_render_nodes_follow_the_queue_up_from_zero_and_back(
    fake_cluster, elastic_farm, client, make_scene, tmp_path
):
    scene = make_scene("--width", "32", "--height", "24", "--samples", "1", "--frames", "20")
    # At rest: no render node, no actor, and no standing request (the dispatcher's
    # first one withdrew whatever an earlier farm left).
    assert _render_nodes() == 0
    _wait_for(lambda: _requests(), "the dispatcher's first request")
    assert _requests() == [[]] and _standing() == []
    rest = _farm(elastic_farm.url)
    assert rest["actors"] == [] and rest["scaling"]["autoscaling"] is True
    assert (rest["scaling"]["nodes_up"], rest["scaling"]["nodes_requested"]) == (0, 0)

    sampler = _Sampler()
    sampler.start()
    try:
        # A 20-frame job: the farm asks for nodes, up to its maximum of 2.
        first = client.submit(scene, frames="1-20")
        _wait_for(lambda: first.refresh().state is not JobState.PENDING or first.detail,
                  "the job to say why it waits")  # fmt: skip
        waited = [e for e in elastic_farm.events(first.id) if e["kind"] == "waiting"]
        assert waited and waited[0]["reason"] == WAITING, waited
        _wait_for(lambda: _farm(elastic_farm.url)["scaling"]["nodes_requested"] == MAX_NODES,
                  "the farm to ask for its maximum")  # fmt: skip
        assert _metric(elastic_farm.url, "rayfarm_render_nodes_requested") == MAX_NODES
        pool = f"{first.refresh().rendered_by}/gpu"  # its Blender version, on GPU slots
        assert _metric(elastic_farm.url, "rayfarm_pool_tasks_queued", pool=pool) > 0
        status = first.wait(timeout=WAIT_S)
        assert status.state is JobState.COMPLETED, status.error
        assert first.refresh().detail is None
        # It rendered on the nodes that joined (the farm started with none), on render
        # actors made for them without a restart. (Whether the second node still found a
        # task depends on how long the fake provider takes to boot it: not asserted.)
        done = [e for e in elastic_farm.events(first.id) if e["kind"] == "task_done"]
        rendered_on = {e["node"] for e in done}
        assert rendered_on and rendered_on <= _gpu_nodes(), rendered_on
        _check_frames(elastic_farm, first, list(range(1, 21)), tmp_path / "first")

        # The queue is empty: the request is withdrawn and the idle actors released.
        _wait_for(lambda: _requests()[-1] == [], "the request to be withdrawn")
        _wait_for(lambda: not _farm(elastic_farm.url)["actors"], "the actors to be released")
        # A second job while the farm scales down (its nodes idle, or leaving) is served.
        assert _render_nodes() >= 1  # Ray removes a node only after 6 s idle
        second = client.submit(scene, frames="1-6")
        status = second.wait(timeout=WAIT_S)
        assert status.state is JobState.COMPLETED, status.error
        _check_frames(elastic_farm, second, list(range(1, 7)), tmp_path / "second")

        # Nothing left to do: after Ray's idle timeout, no render node.
        _wait_for(lambda: _render_nodes() == 0, "the render nodes to be removed")
    finally:
        sampler.done.set()
        sampler.join()
    # Both came up (the farm asked for 2). Not "exactly 2": Ray's own count is not the
    # farm's to cap. CI once sampled 3 GPU nodes alive with a cluster maximum of 2 (a node
    # the autoscaler terminated is Alive in the GCS until its raylet is declared dead, and
    # the v1 launcher can overshoot, see MAX_NODES). What the farm controls, its request,
    # is asserted capped below.
    assert max(sampler.counts) >= MAX_NODES
    assert max(sampler.standing) == MAX_NODES and _standing() == []
    requests = _requests()
    assert requests[-1] == [], "an empty queue leaves a standing request"
    assert all(len(r) <= MAX_NODES for r in requests), requests
    assert all(b == {"GPU": 1} for r in requests for b in r), requests
    assert sorted({len(r) for r in requests})[-1:] == [MAX_NODES]
    # The farm sees it too (its next round), and asks for nothing.
    _wait_for(lambda: _farm(elastic_farm.url)["scaling"]["nodes_up"] == 0,
              "the farm to count no render node")  # fmt: skip
    at_rest = _farm(elastic_farm.url)["scaling"]
    assert (at_rest["nodes_requested"], at_rest["slots_requested"]) == (0, 0)
    assert _metric(elastic_farm.url, "rayfarm_render_slots_requested") == 0
