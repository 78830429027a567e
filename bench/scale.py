"""Dispatch throughput: how many tasks a second the farm's dispatcher sustains when the
render itself costs nothing, and what each task costs in Redis.

A local multi-node Ray cluster (``ray.cluster_utils``: a head and ``--nodes`` nodes
that each declare one GPU) runs the farm's dispatcher with the no-op render actor
(``rayfarm.render.noop``: returns a 1x1 PNG at once), so everything else a task
costs is measured: the dispatcher's bookkeeping, its Redis writes (task started and
done, the frame, events, counters), storing the frame, and Ray's actor calls.

1. baseline: the same no-op actors driven straight from a Ray driver, with as many
   calls in flight as actors (Ray's own ceiling on this machine for this shape);
2. farm: a job of ``--tasks`` whole frames queued in Redis and dispatched.

Reported: tasks/s for both and their ratio, Redis commands per task (from INFO
commandstats, the commands inside Lua scripts included: the round trips are O(1) per
task when this stays flat as the job grows), script calls per task (EVALSHA: each is
one round trip), Redis memory per task (used_memory after the job, over the tasks),
and the tasks per actor call (the dispatcher batches short tasks: its task_started
events of one call share their time and actor).

    python bench/scale.py                      # make bench-scale: 10 000 tasks, 8 nodes
    python bench/scale.py --tasks 2000 --nodes 4 --json /tmp/scale.json

Exit status: 0 when the measurement ran, 1 when something broke, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Processes, add_output_options, run_bench

from rayfarm import JobRecord, JobSpec, JobState

TARGET_TASKS_PER_S = 1000.0
NOOP = "rayfarm.render.noop:NoopActor"


def _redis_stats(client: Any) -> tuple[int, int, int]:
    """(commands run so far, script calls so far, used_memory bytes)."""
    stats = client.info("commandstats")
    calls = sum(int(v["calls"]) for v in stats.values())
    scripts = sum(
        int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")
    )
    return calls, scripts, int(client.info("memory")["used_memory"])


def _tasks_per_call(client: Any, events_key: str) -> float:
    """Mean tasks per actor call: the task_started events one call wrote (one script,
    one time) share their ``at`` and ``actor``."""
    calls: set[tuple[bytes, bytes]] = set()
    started = 0
    start = "-"
    while chunk := client.xrange(events_key, min=start, count=10_000):
        for _, fields in chunk:
            if fields[b"kind"] == b"task_started":
                started += 1
                calls.add((fields[b"at"], fields[b"actor"]))
        start = "(" + chunk[-1][0].decode()
    return started / max(1, len(calls))


def _baseline(n_tasks: int) -> float:
    """Tasks/s of the no-op actors driven directly (one call in flight per actor)."""
    import ray

    from rayfarm.render.actor import CONTROL
    from rayfarm.render.noop import NoopActor
    from rayfarm.render.tasks import RenderTask

    gpus = int(ray.cluster_resources().get("GPU", 0))
    # As the farm's pool makes them: ``interrupt`` has a concurrency group of its own.
    remote = ray.remote(concurrency_groups={CONTROL: 1})(NoopActor)  # type: ignore[call-overload]
    actors = [remote.options(num_gpus=1, num_cpus=0).remote() for _ in range(gpus)]
    ray.get([a.info.remote() for a in actors])
    task = RenderTask("b" * 16, "h", 1, 0, (1, 1), None, None, None, None, "png", 8)
    started = time.perf_counter()
    inflight = {a.render.options(num_returns=2).remote(task, None)[0]: a for a in actors}
    done = len(inflight)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        actor = inflight.pop(ready[0])
        ray.get(ready[0])
        if done < n_tasks:
            inflight[actor.render.options(num_returns=2).remote(task, None)[0]] = actor
            done += 1
    seconds = time.perf_counter() - started
    for a in actors:
        ray.kill(a)
    return n_tasks / seconds


async def _queue_job(redis_url: str, tag: str, n_tasks: int) -> str:
    from rayfarm.cluster.store import JobStore
    from rayfarm.render.inputs import InputFile, Inputs

    spec = JobSpec(frames=f"1-{n_tasks}")
    job = JobRecord(id=tag + "0" * (16 - len(tag)), state=JobState.PENDING, owner="bench",
                    spec=spec, scene_file="noop.blend", frames_total=n_tasks,
                    tasks_total=n_tasks, created_at=datetime.now(UTC))  # fmt: skip
    inputs = Inputs("file:///nowhere", "noop.blend", (InputFile("noop.blend", "0" * 64, 0),))
    store = JobStore.from_url(redis_url)
    try:
        await store.create(job, inputs.to_json(), inputs.digest)
    finally:
        await store.close()
    return job.id


def _run_job(client: Any, dispatcher: Any, redis_url: str, tag: str, n: int) -> tuple[str, float]:
    """Queue a job of ``n`` whole frames; (its id, seconds from queued to COMPLETED)."""
    import ray

    job_id = asyncio.run(_queue_job(redis_url, tag, n))
    started = time.perf_counter()
    ray.get(dispatcher.notify.remote())
    key = f"rayfarm:job:{job_id}"
    while client.hget(key, "state") not in (b"COMPLETED", b"FAILED"):
        if time.perf_counter() - started > 1800:
            raise RuntimeError("the job did not finish in 30 minutes")
        time.sleep(0.02)
    return job_id, time.perf_counter() - started


def _farm(redis_url: str, storage: str, n_tasks: int) -> tuple[float, dict[str, Any]]:
    """Seconds from queued to COMPLETED for a job of ``n_tasks`` whole frames."""
    import ray
    import redis

    from rayfarm.cluster.dispatcher import start_dispatcher
    from rayfarm.cluster.settings import Settings

    settings = Settings.from_env(redis_url=redis_url, storage=storage, actor_class=NOOP)
    client = redis.Redis.from_url(redis_url)
    dispatcher = start_dispatcher(settings)
    # Warm up: a small job brings every actor up (and Ray's workers with it).
    _run_job(client, dispatcher, redis_url, "0a", 64)
    calls0, scripts0, mem0 = _redis_stats(client)
    job_id, seconds = _run_job(client, dispatcher, redis_url, "5ca1e", n_tasks)
    key = f"rayfarm:job:{job_id}"
    calls1, scripts1, mem1 = _redis_stats(client)
    state = client.hget(key, "state")
    state = state.decode() if isinstance(state, bytes) else str(state)
    events = client.xlen(f"{key}:events")
    per_call = _tasks_per_call(client, f"{key}:events")
    ray.kill(dispatcher)
    client.close()
    return seconds, {
        "state": state,
        "redis_commands_per_task": (calls1 - calls0) / n_tasks,
        "redis_scripts_per_task": (scripts1 - scripts0) / n_tasks,
        "redis_bytes_per_task": (mem1 - mem0) / n_tasks,
        "events": events,
        "tasks_per_call": per_call,
    }


def measure(procs: Processes, out: Path, n_tasks: int, nodes: int) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from rayfarm.cluster.redis_server import RedisServer

    redis_server = RedisServer(out / "redis").start()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=0, num_gpus=1)
        ray.init(address=cluster.address, namespace="rayfarm", logging_level=logging.ERROR)
        cluster.wait_for_nodes()
        baseline = _baseline(min(n_tasks, 5000))
        seconds, farm = _farm(redis_server.url, (out / "storage").as_uri(), n_tasks)
    finally:
        ray.shutdown()
        cluster.shutdown()
        redis_server.stop()
    rate = n_tasks / seconds
    result = {
        "tasks": n_tasks, "nodes": nodes, "baseline_tasks_per_s": baseline,
        "farm_tasks_per_s": rate, "farm_seconds": seconds, **farm,
    }  # fmt: skip
    print(f"\n{n_tasks} no-op tasks on {nodes} simulated GPU nodes ({farm['state']})")
    print(f"  {'':<26} {'tasks/s':>9}")
    print(f"  {'Ray alone (baseline)':<26} {baseline:>9.0f}")
    print(f"  {'rayfarm dispatcher':<26} {rate:>9.0f}   {rate / baseline:.2f}x baseline")
    print(f"  Redis commands per task: {farm['redis_commands_per_task']:.1f} "
          f"(script calls: {farm['redis_scripts_per_task']:.2f}); "
          f"memory per task: {farm['redis_bytes_per_task']:.0f} bytes; "
          f"events: {farm['events']}; "
          f"tasks per actor call: {farm['tasks_per_call']:.1f}")  # fmt: skip
    verdict = "met" if rate >= TARGET_TASKS_PER_S else "MISSED"
    print(f"  target >= {TARGET_TASKS_PER_S:.0f} tasks/s: {verdict}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--nodes", type=int, default=8)
    add_output_options(p)
    args = p.parse_args(argv)
    return run_bench(
        args.out, args.json, "rayfarm-scale-",
        lambda procs, out: measure(procs, out, args.tasks, args.nodes),
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
