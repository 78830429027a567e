"""Deployment configs: ray-cluster.yaml, cluster/deploy/serve.yaml, cluster/deploy/kuberay.yaml.

Config checks only (no cluster is started): each file is validated by the validator its tool
uses (Ray's autoscaler schema and config checks, Serve's deploy schema), then held to what the
farm needs: the Python 3.11 GPU Ray image at the installed Ray's version, a head that renders
nothing, GPU workers, Redis and S3 from the environment, rayfarm installed on every node.
"""

import copy
import importlib
import inspect
import json
import os
import re
import shlex
import socket
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.resource_demand_scheduler import get_bin_pack_residual
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from helpers import ROOT

DEPLOY = ROOT / "cluster" / "deploy"
#: The image every node runs: Python 3.11 (the farm's; Blender has environments of its own),
#: CUDA, and the Ray this machine runs (`ray up` and `serve deploy` refuse a client/cluster
#: version mismatch).
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
IMAGE_FAMILY = re.compile(r"^rayproject/ray:\d+\.\d+\.\d+-py311-gpu$")
#: What the dispatcher asks Ray for (cluster/dispatcher.py, _new_actor): a GPU RenderActor
#: takes num_gpus=1, num_cpus=0; a CPU RenderActor num_cpus=1.
GPU_ACTOR = {"GPU": 1}
CPU_ACTOR = {"CPU": 1}


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return _load(ROOT / "ray-cluster.yaml")


@pytest.fixture(scope="module")
def serve_config() -> dict[str, Any]:
    return _load(DEPLOY / "serve.yaml")


@pytest.fixture(scope="module")
def kuberay() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kuberay.yaml").read_text()) if d]
    (raycluster,) = [d for d in docs if d.get("kind") == "RayCluster"]
    return raycluster


def _workers(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    types: dict[str, dict[str, Any]] = cluster["available_node_types"]
    return {name: t for name, t in types.items() if name != cluster["head_node_type"]}


# -- ray-cluster.yaml --------------------------------------------------------------------------


def test_ray_cluster_yaml_passes_rays_own_schema_and_checks(cluster):
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(cluster, json.loads(schema_path.read_text()))
    # What `ray up` does before launching: merge the AWS defaults, then validate the result
    # (head type among the node types, min_workers within max_workers, ...).
    validate_config(prepare_config(copy.deepcopy(cluster)))
    assert cluster["provider"]["type"] == "aws"


def test_ray_cluster_yaml_runs_the_py311_gpu_image_of_this_ray(cluster):
    docker = cluster["docker"]
    images = [docker["image"], docker.get("head_image"), docker.get("worker_image")]
    for image in filter(None, images):
        assert IMAGE_FAMILY.match(image), image
    assert docker["image"] == IMAGE, f"bump the image tag to the installed Ray: {IMAGE}"


def test_head_renders_nothing(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--num-gpus=0" in start
    # Ray's own bin-packing: neither kind of RenderActor fits on the head; the control plane
    # (Serve, dispatcher, assembler, inspector: no CPU, no GPU) does.
    unplaced, _ = get_bin_pack_residual([head["resources"]], [GPU_ACTOR, CPU_ACTOR, {}])
    assert unplaced == [GPU_ACTOR, CPU_ACTOR]


def test_gpu_workers_autoscale_one_render_actor_per_gpu(cluster):
    workers = _workers(cluster)
    assert workers
    for name, node_type in workers.items():
        gpus = node_type["resources"].get("GPU", 0)
        assert gpus >= 1, name
        # A GPU actor fits on it, once per GPU.
        unplaced, _ = get_bin_pack_residual([node_type["resources"]], [GPU_ACTOR] * (gpus + 1))
        assert unplaced == [GPU_ACTOR], name
        # From 0: the farm's requests bring them up and they go when idle.
        assert node_type["min_workers"] == 0 < node_type["max_workers"], name
        assert node_type["max_workers"] <= cluster["max_workers"], name


def test_the_farm_asks_for_at_most_the_gpu_workers_the_cluster_has(cluster):
    """RAYFARM_MAX_RENDER_NODES (autoscaling on) is the GPU workers' max_workers, and the
    settings take it."""
    from rayfarm.cluster.settings import Settings

    options = " ".join(cluster["docker"]["run_options"])
    (value,) = re.findall(r"--env RAYFARM_MAX_RENDER_NODES=(\S+)", options)
    assert int(value) == sum(t["max_workers"] for t in _workers(cluster).values())
    assert Settings(max_render_nodes=int(value)).autoscaling
    assert cluster["idle_timeout_minutes"] > 0


def test_redis_and_s3_come_from_the_environment(cluster):
    options = cluster["docker"]["run_options"]
    env = dict(
        option.removeprefix("--env ").split("=", 1)
        for option in options
        if option.startswith("--env ")
    )
    assert env["REDIS_URL"].startswith(("redis://", "rediss://"))
    assert env["RAYFARM_STORAGE"].startswith("s3://")
    # Ray joins run_options into a shell command line: each must stay one shell word or flag.
    for option in options + cluster["docker"].get("worker_run_options", []):
        assert len(shlex.split(option)) <= 2 and not re.search(r"[<>|;&$`'\"]", option), option
    # No keys in the file: S3 credentials come from instance profiles.
    assert "AWS_SECRET_ACCESS_KEY" not in (ROOT / "ray-cluster.yaml").read_text()
    for name, node_type in _workers(cluster).items():
        assert "IamInstanceProfile" in node_type["node_config"], name


def test_every_node_installs_this_checkout_of_rayfarm(cluster):
    assert cluster["file_mounts"] == {"/home/ray/rayfarm": "."}
    assert ".gitignore" in cluster["rsync_filter"]
    assert ".venv/" in (ROOT / ".gitignore").read_text().split()
    setup = cluster["setup_commands"]  # common to head and workers
    assert any('pip install -q "/home/ray/rayfarm[cluster,render]"' in c for c in setup), setup
    # Everything the package build reads is in the mounted checkout.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = [*pyproject["tool"]["setuptools"]["package-dir"].values()]
    needed.append(pyproject["project"]["readme"])
    for path in needed:
        assert (ROOT / path).exists(), path


# -- cluster/deploy/serve.yaml -----------------------------------------------------------------


def test_serve_config_passes_serves_own_schema(serve_config):
    ServeDeploySchema.model_validate(serve_config)
    # Serve ignores unknown keys (forward compatibility), so a typo would pass silently.
    assert set(serve_config) <= set(ServeDeploySchema.model_fields)
    for app in serve_config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields)


def test_serve_config_runs_the_rayfarm_app_at_the_root(serve_config):
    from rayfarm.cluster.serve import APP_NAME

    (app,) = serve_config["applications"]
    assert app["name"] == APP_NAME and app["route_prefix"] == "/"
    env = app["runtime_env"]["env_vars"]
    assert env["REDIS_URL"].startswith(("redis://", "rediss://"))
    assert env["RAYFARM_STORAGE"].startswith("s3://")
    assert serve_config["http_options"]["port"] == 8000


def test_serve_config_import_path_is_an_application_builder(serve_config):
    (app,) = serve_config["applications"]
    module_name, _, attr = app["import_path"].partition(":")
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        pytest.skip(f"{app['import_path']} is the proposed builder, not yet in cluster/serve.py")
    builder = getattr(module, attr)
    # What Serve requires of a builder: a plain function of one argument, the config's args.
    assert inspect.isfunction(builder)
    assert len(inspect.signature(builder).parameters) == 1


# -- cluster/deploy/kuberay.yaml, Dockerfile ---------------------------------------------------


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = pod_template["spec"]["containers"]
    return containers


def test_kuberay_raycluster_head_renders_nothing(kuberay):
    assert kuberay["apiVersion"] == "ray.io/v1"
    assert kuberay["spec"]["rayVersion"] == ray.__version__
    assert kuberay["spec"]["enableInTreeAutoscaling"] is True
    head = kuberay["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["num-gpus"] == "0"
    for container in _containers(head["template"]):
        assert "nvidia.com/gpu" not in json.dumps(container.get("resources", {}))


def test_kuberay_gpu_workers_autoscale(kuberay):
    groups = kuberay["spec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["replicas"] == group["minReplicas"] == 0 < group["maxReplicas"]
        (container,) = _containers(group["template"])
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The dispatcher (on the head) asks for at most the GPU pods the groups may have.
    (head,) = _containers(kuberay["spec"]["headGroupSpec"]["template"])
    env = {e["name"]: e.get("value") for e in head.get("env", [])}
    assert int(env["RAYFARM_MAX_RENDER_NODES"]) == sum(g["maxReplicas"] for g in groups)
    assert kuberay["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] > 0


def test_kuberay_containers_run_rayfarm_with_settings_from_a_secret(kuberay):
    spec = kuberay["spec"]
    templates = [spec["headGroupSpec"]["template"]]
    templates += [g["template"] for g in spec["workerGroupSpecs"]]
    overwrite = kuberay["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for template in templates:
        for container in _containers(template):
            assert container["image"] == IMAGE
            assert {"secretRef": {"name": "rayfarm"}} in container["envFrom"]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env["RAYFARM_PIP"].startswith("rayfarm[cluster,render] @ ")
            # Our command replaces KubeRay's, so it must still start Ray.
            assert overwrite and "$KUBERAY_GEN_RAY_START_CMD" in container["args"][-1]


def test_dockerfile_builds_on_the_same_image():
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    assert f"FROM {IMAGE}" in lines


def test_a_local_farms_serve_ports_are_distinct_and_below_the_ephemeral_range(monkeypatch):
    """HAProxy's stats/metrics ports, Serve's fallback proxy ports and the replicas' port
    ranges: each free when chosen, none shared, all below Linux's ephemeral range (a
    port the kernel also hands to outgoing connections was taken under HAProxy in CI)."""
    from rayfarm.cluster import local

    ranges = [(low, high) for low, high, _ in local.DIRECT_INGRESS_PORT_ENV]
    names = [*local.HAPROXY_PORT_ENV, *(name for pair in ranges for name in pair)]
    # A copy of the environment for this test: what local_serve_env sets must not reach
    # the farms later tests start.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in names})
    local.local_serve_env()
    ports = [int(os.environ[name]) for name in local.HAPROXY_PORT_ENV]
    for low, high, span in local.DIRECT_INGRESS_PORT_ENV:
        first, last = int(os.environ[low]), int(os.environ[high])
        assert last - first + 1 == span
        ports += range(first, last + 1)
    assert len(set(ports)) == len(ports)
    low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert max(ports) < low_ephemeral


def test_free_ports_for_listening_servers_are_distinct_free_and_below_the_ephemeral_range():
    """The ports tests and `rayfarm up` give Redis and the farm's own HTTP/gRPC servers:
    CI saw HAProxy lose the farm's HTTP port, picked with bind(0), to an outgoing
    connection. Picks never repeat in one process, even though each was free."""
    from rayfarm.cluster.ports import free_port

    picks = [free_port() for _ in range(200)]
    assert len(set(picks)) == len(picks)
    low_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert max(picks) < low_ephemeral
    for port in picks[:20]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


# -- Blender environments on every node ---------------------------------------------------------


def test_every_deployment_offers_and_builds_the_same_blender_versions(cluster, kuberay):
    """ray-cluster.yaml, the KubeRay manifest and the node image all offer the same valid
    versions (RAYFARM_BLENDER) and build their environments when a node is set up (the
    image at build time), with the CPython 3.13 that bpy 5.1 and newer need."""
    from rayfarm.render.environments import parse_versions

    offered = set()
    options = " ".join(cluster["docker"]["run_options"])
    (value,) = re.findall(r"--env RAYFARM_BLENDER=(\S+)", options)
    offered.add(parse_versions(value))
    setup = " && ".join(cluster["setup_commands"])
    assert "uv python install 3.13" in setup and "rayfarm blender install" in setup
    spec = kuberay["spec"]
    templates = [spec["headGroupSpec"]["template"]]
    templates += [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        for container in _containers(template):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            offered.add(parse_versions(env["RAYFARM_BLENDER"]))
            assert "rayfarm blender install" in container["args"][-1]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (value,) = re.findall(r"RAYFARM_BLENDER=(\S+)", dockerfile)
    offered.add(parse_versions(value))
    assert "rayfarm blender install" in dockerfile
    assert len(offered) == 1, offered


def test_the_deployment_docs_say_what_the_files_set(cluster, kuberay):
    """docs/deploy.md's elastic farm names the maximum and the idle timeouts the two
    cluster files set (the README points there)."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    (gpu,) = _workers(cluster).values()
    (group,) = kuberay["spec"]["workerGroupSpecs"]
    assert gpu["max_workers"] == group["maxReplicas"]
    assert f"goes from {gpu['min_workers']} to {gpu['max_workers']} nodes" in docs
    assert f"({gpu['max_workers']} in both files" in docs
    assert f"`idle_timeout_minutes: {cluster['idle_timeout_minutes']}`" in docs
    idle_s = kuberay["spec"]["autoscalerOptions"]["idleTimeoutSeconds"]
    assert f"`idleTimeoutSeconds: {idle_s}`" in docs
    assert "docs/deploy.md#an-elastic-farm" in (ROOT / "README.md").read_text()
