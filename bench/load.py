"""Load: a storm of concurrent submissions, then a sustained status-poll load.

The bench starts a local farm (``rayfarm up``) whose render actors render nothing
(``RAYFARM_ACTOR_CLASS=rayfarm.render.noop:NoopActor``, so the service is what is
measured; ``--render`` keeps Blender) and a tiny scene, and then:

1. **baseline**: ``--baseline`` submissions sent one at a time (``POST /jobs``,
   multipart: the .blend and its spec), each timed;
2. **storm**: ``--jobs`` submissions (200) sent all at once, each on its own connection,
   while ``--pollers`` clients poll the status of jobs already accepted and one client
   asks ``GET /healthz`` every 100 ms; then every job is followed to a terminal state;
3. **exactly once**: the farm's job listing must hold every accepted job once and no
   other (a submission that failed on the wire but was stored would show up here);
4. **status load**: ``--clients`` clients poll ``GET /jobs/{id}/status`` of the storm's
   jobs for ``--duration`` seconds, against one client doing the same (the baseline);
5. **Redis memory**: ``used_memory`` before the storm and after it, per job.

Every submission answered 201, no 5xx, no health check failed, every job in a terminal
state and the listing exact: the table says PASS; with ``--check`` the exit status is 2
otherwise. ``storm()`` is also what ``tests/farm/test_load.py`` runs.

    python bench/load.py                         # make bench-load; ~1 minute
    python bench/load.py --jobs 200 --pollers 8 --clients 32 --duration 10 --json /tmp/load.json

Exit status: 0 when the measurement ran, 1 when something broke, 2 with ``--check`` when
a check failed, 130 on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # what the benches share
    BenchError,
    LocalFarm,
    Processes,
    add_output_options,
    machine,
    make_scene,
    run_bench,
)
from _report import pass_fail, percentile, print_columns

NOOP_ACTOR = "rayfarm.render.noop:NoopActor"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}
#: Longest the storm waits for its jobs to finish.
FINISH_TIMEOUT_S = 600.0
HEALTH_EVERY_S = 0.1
#: The report's tables: each column's title and its values' format.
SUBMIT_COLUMNS = (("", "24"), ("p50 ms", ">9.1f"), ("p99 ms", ">9.1f"), ("max ms", ">9.1f"))
STATUS_COLUMNS = (("clients", ">7d"), ("req/s", ">9.1f"), ("p50 ms", ">9.2f"),
                  ("p99 ms", ">9.2f"), ("errors", ">7d"))  # fmt: skip


@dataclass
class StormResult:
    """What one storm saw (times in ms)."""

    submitted: int = 0
    accepted: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: list[str] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    storm_s: float = 0.0
    polls: int = 0
    poll_errors: list[str] = field(default_factory=list)
    health_ms: list[float] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)
    final: dict[str, str] = field(default_factory=dict)
    finish_s: float = 0.0
    listed: list[str] = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if code >= 500)

    @property
    def lost(self) -> list[str]:
        """Accepted, but not in the farm's listing."""
        return sorted(set(self.accepted) - set(self.listed))

    @property
    def extra(self) -> list[str]:
        """In the listing, but never acknowledged (or listed twice)."""
        counts = Counter(self.listed)
        return sorted({j for j in self.listed if j not in set(self.accepted) or counts[j] > 1})

    @property
    def unfinished(self) -> list[str]:
        return sorted(j for j in self.accepted if self.final.get(j) not in TERMINAL)

    def ok(self, jobs: int) -> bool:
        return (
            len(self.accepted) == jobs
            and len(set(self.accepted)) == jobs
            and self.statuses == Counter({201: jobs})
            and not self.transport_errors
            and not self.poll_errors
            and not self.health_failures
            and not self.lost
            and not self.extra
            and not self.unfinished
        )

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("submit_ms", "health_ms", "accepted", "listed", "final"):
            out.pop(name)
        out["statuses"] = {str(k): v for k, v in self.statuses.items()}
        out.update(
            accepted=len(self.accepted),
            server_errors=self.server_errors,
            lost=self.lost,
            extra=self.extra,
            unfinished=self.unfinished,
            states=dict(Counter(self.final.values())),
            submit_p50_ms=percentile(self.submit_ms, 50),
            submit_p99_ms=percentile(self.submit_ms, 99),
            submit_max_ms=max(self.submit_ms, default=float("nan")),
            health_checks=len(self.health_ms),
            health_p99_ms=percentile(self.health_ms, 99),
            health_max_ms=max(self.health_ms, default=float("nan")),
        )
        return out


def _form(scene: bytes, frames: str) -> dict[str, Any]:
    return {
        "files": {"scene": ("storm.blend", scene)},
        "data": {"spec": json.dumps({"frames": frames})},
    }


async def _submit(client: httpx.AsyncClient, scene: bytes, result: StormResult) -> None:
    started = time.perf_counter()
    try:
        r = await client.post("/jobs", **_form(scene, "1"))
    except httpx.HTTPError as exc:
        result.transport_errors.append(f"{type(exc).__name__}: {exc}")
        return
    result.submit_ms.append((time.perf_counter() - started) * 1000)
    result.statuses[r.status_code] += 1
    if r.status_code == 201:
        result.accepted.append(r.json()["id"])


async def _poll(client: httpx.AsyncClient, result: StormResult, stop: asyncio.Event) -> None:
    rng = random.Random()
    while not stop.is_set():
        if not result.accepted:
            await asyncio.sleep(0.01)
            continue
        job_id = rng.choice(result.accepted)
        try:
            r = await client.get(f"/jobs/{job_id}/status")
            if r.status_code != 200:
                result.poll_errors.append(f"{r.status_code}: {r.text[:200]}")
            else:
                result.final[job_id] = r.json()["state"]
            result.polls += 1
        except httpx.HTTPError as exc:
            result.poll_errors.append(f"{type(exc).__name__}: {exc}")


async def _health(client: httpx.AsyncClient, result: StormResult, stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            r = await client.get("/healthz")
            result.health_ms.append((time.perf_counter() - started) * 1000)
            if r.status_code != 200:
                result.health_failures.append(f"{r.status_code}: {r.text[:200]}")
        except httpx.HTTPError as exc:
            result.health_failures.append(f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(HEALTH_EVERY_S)


async def _finish(client: httpx.AsyncClient, result: StormResult, timeout_s: float) -> None:
    """Follow every accepted job until it is in a terminal state (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        todo = [j for j in result.accepted if result.final.get(j) not in TERMINAL]
        if not todo:
            return
        for job_id in todo:
            r = await client.get(f"/jobs/{job_id}/status")
            if r.status_code == 200:
                result.final[job_id] = r.json()["state"]
        await asyncio.sleep(0.2)


async def _listing(client: httpx.AsyncClient) -> list[str]:
    ids: list[str] = []
    while True:
        page = (await client.get("/jobs", params={"offset": len(ids), "limit": 500})).json()
        ids += [j["id"] for j in page["jobs"]]
        if not page["jobs"] or len(ids) >= page["total"]:
            return ids


async def _ids(url: str, headers: dict[str, str]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=60.0, headers=headers) as client:
        return await _listing(client)


async def storm(
    url: str,
    scene: bytes,
    jobs: int = 200,
    pollers: int = 8,
    finish_timeout_s: float = FINISH_TIMEOUT_S,
    headers: dict[str, str] | None = None,
) -> StormResult:
    """``jobs`` concurrent submissions of ``scene`` (one frame each), each on its own
    connection, with ``pollers`` status pollers and a health checker running; then
    every job followed to a terminal state and the farm's listing read back. The farm
    is expected to hold no other job."""
    result = StormResult(submitted=jobs)
    limits = httpx.Limits(max_connections=jobs + pollers + 2, max_keepalive_connections=0)
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=timeout, headers=headers
    ) as client:
        stop = asyncio.Event()
        side = [asyncio.create_task(_poll(client, result, stop)) for _ in range(pollers)]
        side.append(asyncio.create_task(_health(client, result, stop)))
        started = time.perf_counter()
        await asyncio.gather(*(_submit(client, scene, result) for _ in range(jobs)))
        result.storm_s = time.perf_counter() - started
        await _finish(client, result, finish_timeout_s)
        result.finish_s = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*side)
        result.listed = await _listing(client)
    return result


async def _baseline(url: str, scene: bytes, n: int, headers: dict[str, str]) -> list[float]:
    """``n`` submissions one at a time; each one's ms."""
    times = []
    async with httpx.AsyncClient(base_url=url, timeout=120.0, headers=headers) as client:
        for _ in range(n):
            started = time.perf_counter()
            r = await client.post("/jobs", **_form(scene, "1"))
            if r.status_code != 201:
                raise BenchError(f"baseline submission answered {r.status_code}: {r.text}")
            times.append((time.perf_counter() - started) * 1000)
            await client.post(f"/jobs/{r.json()['id']}/cancel")
    return times


async def _status_load(
    url: str, job_ids: list[str], clients: int, duration_s: float, headers: dict[str, str]
) -> dict[str, Any]:
    """``clients`` clients polling statuses back to back for ``duration_s``."""
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=clients)

    async def one(client: httpx.AsyncClient) -> None:
        rng = random.Random()
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                r = await client.get(f"/jobs/{rng.choice(job_ids)}/status")
                if r.status_code != 200:
                    errors.append(str(r.status_code))
                    continue
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=30.0, headers=headers
    ) as client:
        await asyncio.gather(*(one(client) for _ in range(clients)))
    return {
        "clients": clients,
        "rps": round(len(latencies) / duration_s, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "errors": len(errors),
    }


def _redis_memory(farm: LocalFarm) -> int:
    import redis

    match = re.search(r"redis (redis://\S+?)\)", farm.log.read_text())
    if not match:
        raise BenchError(f"the farm did not print its Redis URL; see {farm.log}")
    client = redis.Redis.from_url(match[1])
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def measure(args: argparse.Namespace, procs: Processes, out: Path) -> dict[str, Any]:
    info = machine()
    print(f"machine: {info['nproc']} CPUs ({info['cpu_model']}); files in {out}", flush=True)
    tiny = ["--width", "32", "--height", "24", "--samples", "1", "--frames", "1"]
    scene_path = make_scene(procs, out / "storm.blend", tiny)
    scene = scene_path.read_bytes()
    farm = LocalFarm(procs, out / "farm", out / "farm.log")
    farm.env = {"RAYFARM_CPU_ACTORS": "2"}
    if not args.render:
        farm.env["RAYFARM_ACTOR_CLASS"] = NOOP_ACTOR
    client = farm.start()
    try:
        warm = client.submit(scene_path, frames="1")  # Serve, the actors, the catalogue
        if warm.wait(timeout=300).state.value != "COMPLETED":
            raise BenchError(f"the warm-up job did not complete: {warm.refresh().error}")
        auth = farm.auth
        base = asyncio.run(_baseline(farm.url, scene, args.baseline, auth))
        # The warm-up and baseline jobs stay in the farm: the storm's listing is the rest.
        before_ids = set(asyncio.run(_ids(farm.url, auth)))
        memory_before = _redis_memory(farm)
        result = asyncio.run(storm(farm.url, scene, args.jobs, args.pollers, headers=auth))
        result.listed = [j for j in result.listed if j not in before_ids]
        memory_after = _redis_memory(farm)
        load = [asyncio.run(_status_load(farm.url, result.accepted, n, args.duration, auth))
                for n in (1, args.clients)]  # fmt: skip
    finally:
        farm.stop()
    summary = result.summary()
    outcome = {
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "out")},
        "baseline_submit_ms": {
            "n": len(base),
            "p50": round(percentile(base, 50), 1),
            "p99": round(percentile(base, 99), 1),
        },
        "storm": summary,
        "status_load": load,
        "redis_bytes_per_job": round((memory_after - memory_before) / max(1, len(result.accepted))),
        "pass": result.ok(args.jobs) and all(row["errors"] == 0 for row in load),
    }
    report(outcome)
    return outcome


def report(o: dict[str, Any]) -> None:
    s, b = o["storm"], o["baseline_submit_ms"]
    print()
    print(f"submissions: {s['submitted']} at once vs {b['n']} one at a time")
    print_columns(SUBMIT_COLUMNS, [
        ("one at a time", b["p50"], b["p99"]),
        ("storm", s["submit_p50_ms"], s["submit_p99_ms"], s["submit_max_ms"]),
    ])  # fmt: skip
    print(
        f"  accepted {s['accepted']}/{s['submitted']} in {s['storm_s']:.2f} s "
        f"({s['accepted'] / max(s['storm_s'], 1e-9):.0f}/s); answers {s['statuses']}; "
        f"5xx {s['server_errors']}; transport errors {len(s['transport_errors'])}"
    )
    print(
        f"  exactly once: lost {len(s['lost'])}, extra {len(s['extra'])}; final states "
        f"{s['states']} after {s['finish_s']:.1f} s; unfinished {len(s['unfinished'])}"
    )
    print(
        f"  during the storm: {s['polls']} status polls ({len(s['poll_errors'])} failed); "
        f"{s['health_checks']} health checks ({len(s['health_failures'])} failed), "
        f"p99 {s['health_p99_ms']:.1f} ms, max {s['health_max_ms']:.1f} ms"
    )
    print()
    print("status poll load (GET /jobs/{id}/status over the storm's jobs)")
    print_columns(STATUS_COLUMNS, [
        (r["clients"], r["rps"], r["p50_ms"], r["p99_ms"], r["errors"]) for r in o["status_load"]
    ])  # fmt: skip
    print(f"\nRedis memory per job: {o['redis_bytes_per_job']} bytes")
    print(f"checks: {pass_fail(o['pass'])}")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=200, help="submissions in the storm")
    p.add_argument("--pollers", type=int, default=8, help="status pollers during the storm")
    p.add_argument("--baseline", type=int, default=20, help="submissions one at a time")
    p.add_argument("--clients", type=int, default=32, help="clients of the status load")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of status load")
    p.add_argument("--render", action="store_true", help="render with Blender, not the no-op")
    p.add_argument("--check", action="store_true", help="exit 2 when a check fails")
    add_output_options(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    return run_bench(
        args.out, args.json, "rayfarm-load-", lambda procs, out: measure(args, procs, out),
        passed=(lambda result: bool(result["pass"])) if args.check else None,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
