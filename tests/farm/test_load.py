"""Load: 200 submissions at once with status polling on loopback (the storm of
``bench/load.py``, the same code): every job accepted exactly once and finished, the
listing exact, no 5xx, and the service answering health checks throughout.

The farm's render actors render nothing (``NoopActor``): what is under load is the
service — the API replicas, the checks, Redis and the dispatcher's bookkeeping.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections import Counter

import pytest

from helpers import AUTH, ROOT
from helpers.farms import run_farm

pytestmark = pytest.mark.slow

JOBS = 200


def _bench_load():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def noop_farm(tmp_path_factory, farm_env):
    env = {**farm_env, "RAYFARM_ACTOR_CLASS": "rayfarm.render.noop:NoopActor"}
    yield from run_farm(tmp_path_factory.mktemp("load-farm"), env)


def test_a_storm_of_submissions_is_accepted_exactly_once(noop_farm, make_scene):
    load = _bench_load()
    scene = make_scene("--width", "32", "--height", "24", "--samples", "1", "--frames", "1")
    storm = load.storm(noop_farm.url, scene.read_bytes(), jobs=JOBS, pollers=8, headers=AUTH)
    result = asyncio.run(storm)
    assert result.statuses == Counter({201: JOBS}), (result.statuses, result.transport_errors)
    assert len(set(result.accepted)) == JOBS
    assert sorted(result.listed) == sorted(result.accepted)  # none lost, none twice
    assert Counter(result.final[j] for j in result.accepted) == Counter({"COMPLETED": JOBS})
    assert result.polls > 0 and not result.poll_errors, result.poll_errors[:5]
    assert len(result.health_ms) > 0 and not result.health_failures, result.health_failures[:5]
    assert result.ok(JOBS)
