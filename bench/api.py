"""Is the status endpoint fast? ``GET /jobs/{id}/status`` and the event stream, served
by bare uvicorn and by Ray Serve, measured in one run.

Every open Blender and notebook polls a job's status or follows its event stream, so
these two routes are the farm's hot paths. The bench starts its own ``redis-server``
(``RedisServer``, AOF on, as the farm runs it), stores one PENDING job, and serves the
same FastAPI app (``create_app``) over that Redis in turn by:

- **echo**: a canned HTTP answer from a raw asyncio protocol, the cheapest server there
  is: the load generator's own ceiling on this machine (no target).
- **bare**: plain uvicorn in a subprocess (uvloop and httptools, access log off) serving
  ``create_app(AppContext.build(settings))``: one process, no Ray. The ceiling for this stack.
- **proxy**: Serve's default ingress (``RAYFARM_FAST_INGRESS=0``): Serve's Python proxy
  actor takes the HTTP request and hands it to one replica over a Ray actor call, the app
  on a second event loop in a thread of the replica (the deployment before issue 6).
- **serve**: the deployment exactly as ``rayfarm up`` makes it in this environment: a local
  Ray started with ``local_serve_env()`` and ``LOCAL_SYSTEM_CONFIG``, ``serve.start`` with
  ``LOGGING``, ``serve.run(build_app(settings))`` (without the dispatcher: these routes do
  not use it). Where an HAProxy binary is found that is the fast ingress: HAProxy on the
  farm's port in front of two replicas that answer HTTP themselves
  (``RAY_SERVE_ENABLE_HA_PROXY``), the app on the replica's own event loop
  (``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``).
- **fast** (when asked for): the fast ingress whatever the environment says
  (``RAYFARM_FAST_INGRESS=1``, two replicas).
- **candidate** (when asked for): ``fast`` with ``max_ongoing_requests=4096`` (``CANDIDATE``),
  or the deployment changed by ``--serve-env``, ``--max-ongoing`` and ``--replicas``.

The load generator is a separate process (uvloop, raw asyncio streams, one HTTP/1.1
keep-alive connection per client): for 1, 8 and 32 concurrent clients it sends
``GET /jobs/{id}/status`` back to back for ``--warmup`` seconds, then records every
request's latency for ``--duration`` seconds. Throughput is requests answered per second
of the measured window; any non-200 answer, reset or timeout is an error. The client
shares the machine's cores with the server, as it does with every server measured. The
CPU seconds of every process of the server (Ray's workers, HAProxy, ...) are read from
/proc around each level.

Then the event stream: K simultaneous ``GET /jobs/{id}/events`` streams on the job
(``--sse`` levels, opened 50 at a time, each read up to the job's first event), one
event appended with ``JobStore.event``, and the time until every stream got it. A level
passes when every stream opened and got the event within 1 s; the levels stop at the
first that fails. The bench is one user, so its servers run with the farm's per-user cap
on streams (``RAYFARM_MAX_STREAMS_PER_USER``) raised to the highest level.

Targets (issue 6) for Serve: at 8 clients at least 0.8x bare uvicorn's throughput with
p99 at most 20 ms, and no failed request at 32 clients. The table says PASS or FAIL for
each Serve configuration; with ``--check`` the exit status is 2 when the deployment as
``rayfarm up`` makes it (``serve``) misses the target.

    python bench/api.py                        # make bench-api: echo,bare,proxy,serve; ~3 min
    python bench/api.py --servers bare,proxy,serve --sse= --json /tmp/api.json
    python bench/api.py --servers bare,candidate --serve-env RAY_SERVE_ENABLE_HA_PROXY=1

Exit status: 0 when the measurement ran, 1 when something broke, 2 with ``--check``
when the target is missed, 130 on Ctrl-C or SIGTERM. Every process the bench starts
(Redis, uvicorn, the local Rays with their workers and HAProxy) is stopped before it
exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _api_clients import BENCH_TOKEN, JOB_ID, SSE_DELIVERY_S, SSE_OPEN_TIMEOUT_S, SSE_WAIT_S
from _api_clients import SCRIPT as CLIENT
from _api_servers import PROXY, SERVERS, Server, candidate_config, start_server
from _common import PYTHON, Processes, add_output_options, bench_env, machine, run_bench
from _report import pass_fail, percentile, print_columns

DEFAULT_SERVERS = ("echo", "bare", "proxy", "serve")
CLIENTS = (1, 8, 32)
#: The echo server's levels run this long at most: its figures do not move.
ECHO_DURATION_S = 2.0
SSE_LEVELS = (100, 500, 1000, 2000, 4000)
#: Issue 6: a Serve deployment's throughput at 8 clients over bare uvicorn's, at least.
TARGET_RATIO = 0.8
#: ... its p99 at 8 clients, at most.
TARGET_P99_MS = 20.0
#: Seconds of an idle server's CPU use sampled before it is loaded.
IDLE_SAMPLE_S = 2.0
#: Longest a load or SSE client process may run past its own schedule.
CLIENT_SLACK_S = 60.0
#: The status table: each column's title and its values' format.
LOAD_COLUMNS = (
    ("server", "<10"), ("clients", ">7"), ("req/s", ">9.1f"), ("x bare", ">7"),
    ("p50 ms", ">8.2f"), ("p99 ms", ">8.2f"), ("errors", ">7"), ("server CPU ms/req", ">18.3f"),
)  # fmt: skip


@dataclass
class Bench:
    procs: Processes
    out: Path
    args: argparse.Namespace
    redis_url: str = ""

    def load(self, server: Server, clients: int, url: str) -> dict[str, Any]:
        """One level of status load; the row of the table."""
        result_file = self.out / f"load-{server.name}-{clients}.json"
        duration = self.args.duration
        if server.name == "echo":
            duration = min(duration, ECHO_DURATION_S)
        cmd = [PYTHON, CLIENT, "load", "--url", url, "--result", result_file]
        cmd += ["--path", f"/jobs/{JOB_ID}/status", "--clients", clients]
        cmd += ["--duration", duration, "--warmup", self.args.warmup]
        before = server.tree()
        self._client(cmd, self.out / f"load-{server.name}.log", duration + self.args.warmup)
        cpu = server.cpu_since(before)
        raw = json.loads(result_file.read_text())
        lat = raw["latencies_ms"]
        errors = sum(raw["errors"].values())
        row = {
            "server": server.name,
            "clients": clients,
            "requests": len(lat),
            "rps": round(len(lat) / raw["seconds"], 1),
            "p50_ms": round(percentile(lat, 50), 2),
            "p90_ms": round(percentile(lat, 90), 2),
            "p99_ms": round(percentile(lat, 99), 2),
            "max_ms": round(max(lat), 2) if lat else None,
            "errors": errors,
            "error_kinds": raw["errors"],
            "server_cpu_s": cpu,
            "server_cpu_per_request_ms": round(
                sum(cpu.values()) * 1000 / max(1, raw["answered"]), 3
            ),
            "sample_body": raw["sample_body"],
        }
        print(
            f"  {server.name:<10} {clients:>3} clients: {row['rps']:>8.1f} req/s  p50 "
            f"{row['p50_ms']:>7.2f} ms  p99 {row['p99_ms']:>7.2f} ms  errors {errors}; CPU s "
            + ", ".join(f"{k} {v:.2f}" for k, v in list(cpu.items())[:4]),
            flush=True,
        )
        return row

    def sse(self, server: Server, streams: int, url: str) -> dict[str, Any]:
        result_file = self.out / f"sse-{server.name}-{streams}.json"
        cmd = [PYTHON, CLIENT, "sse", "--url", url, "--result", result_file]
        cmd += ["--job", JOB_ID, "--streams", streams, "--redis-url", self.redis_url]
        self._client(cmd, self.out / f"sse-{server.name}.log", SSE_OPEN_TIMEOUT_S + SSE_WAIT_S)
        row: dict[str, Any] = json.loads(result_file.read_text())
        row["pass"] = row["opened"] == streams and row["delivered_within_s"] == streams
        print(
            f"  {server.name:<10} {streams:>5} streams: opened {row['opened']} in "
            f"{row['open_s']:.1f} s, got the event {row['delivered']} (max {row['max_ms']} ms)"
            f"{'' if not row['failed'] else ' failed ' + json.dumps(row['failed'])} "
            f"{pass_fail(row['pass'])}",
            flush=True,
        )
        return row

    def _client(self, cmd: list[Any], log: Path, seconds: float) -> None:
        self.procs.run(cmd, log, bench_env(), seconds + CLIENT_SLACK_S)

    def measure(self, server: Server, sse: bool = True) -> dict[str, Any]:
        url = (
            ",".join(server.direct)
            if self.args.ingress == "direct" and server.direct
            else server.url
        )
        rows = [self.load(server, n, url) for n in self.args.clients]
        streams: list[dict[str, Any]] = []
        if sse:
            for k in self.args.sse:
                streams.append(self.sse(server, k, url))
                if not streams[-1]["pass"]:
                    break
                time.sleep(1.0)  # the server lets go of the last level's streams
        return {"url": url, "load": rows, "sse": streams}


async def _create_job(redis_url: str) -> None:
    from rayfarm.cluster.auth import AuthStore
    from rayfarm.cluster.store import JobStore, connect
    from rayfarm.models import JobRecord, JobSpec, JobState

    spec = JobSpec(frames="1-4")
    job = JobRecord(
        id=JOB_ID, state=JobState.PENDING, owner="bench", spec=spec, scene_file="shot.blend",
        frames_total=len(spec.frame_list), tasks_total=len(spec.frame_list),
        created_at=datetime.now(UTC),
    )  # fmt: skip
    redis = connect(redis_url)
    try:
        await JobStore(redis).create(job, json.dumps({"main": "shot.blend", "files": []}), "0" * 64)
        await AuthStore(redis).bootstrap(BENCH_TOKEN)  # requests carry its token
    finally:
        await redis.aclose()


def measure(args: argparse.Namespace, procs: Processes, out: Path) -> dict[str, Any]:
    from rayfarm.cluster.redis_server import RedisServer

    info = machine()
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu_model']}), ray {info['ray']}, "
        f"python {info['python']}, load {info['load_average']}; files in {out}",
        flush=True,
    )
    candidate = candidate_config(args)
    config = {
        "clients": args.clients,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "sse_levels": args.sse,
        "ingress": args.ingress,
        "proxy": PROXY,
        "candidate": candidate,
    }
    result: dict[str, Any] = {"machine": info, "config": config, "servers": {}}
    bench = Bench(procs, out, args)
    redis = RedisServer(out / "redis")
    redis.start()
    try:
        args.redis_url = bench.redis_url = redis.url
        asyncio.run(_create_job(redis.url))
        for name in args.server_list:
            started = time.perf_counter()
            server = start_server(name, args, procs, out, candidate)
            try:
                up_s = time.perf_counter() - started
                before, at = server.tree(), time.perf_counter()
                time.sleep(IDLE_SAMPLE_S)
                idle = sum(server.cpu_since(before).values())
                idle_share = idle / (time.perf_counter() - at)
                direct = f" (replicas at {', '.join(server.direct)})" if server.direct else ""
                print(
                    f"{name}: up in {up_s:.1f} s at {server.url}{direct}; idle, it uses "
                    f"{idle_share:.1%} of a core",
                    flush=True,
                )
                measured = bench.measure(server, sse=name != "echo")
                measured.update(up_s=round(up_s, 1), idle_core_share=round(idle_share, 3))
                result["servers"][name] = measured
            finally:
                server.stop()
    finally:
        redis.stop()
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report(result)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _verdicts(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    servers = result["servers"]
    if "bare" not in servers:
        return {}
    bare = {r["clients"]: r for r in servers["bare"]["load"]}
    verdicts = {}
    for name, measured in servers.items():
        if name in ("bare", "echo"):
            continue
        rows = {r["clients"]: r for r in measured["load"]}
        at8, at32 = rows.get(8), rows.get(32)
        v: dict[str, Any] = {}
        if at8 is not None and 8 in bare:
            v["ratio_at_8"] = round(at8["rps"] / bare[8]["rps"], 3)
            v["ratio_pass"] = v["ratio_at_8"] >= TARGET_RATIO
            v["p99_at_8_ms"] = at8["p99_ms"]
            v["p99_pass"] = at8["p99_ms"] <= TARGET_P99_MS
        if at32 is not None:
            v["errors_at_32"] = at32["errors"]
            v["errors_pass"] = at32["errors"] == 0
        v["pass"] = all(x for k, x in v.items() if k.endswith("_pass"))
        verdicts[name] = v
    return verdicts


def report(result: dict[str, Any]) -> None:
    servers, config = result["servers"], result["config"]
    bare = {r["clients"]: r for r in servers.get("bare", {}).get("load", [])}
    print(
        f"\nGET /jobs/{{id}}/status: {config['duration_s']:g} s per level after "
        f"{config['warmup_s']:g} s of warm-up"
    )
    rows = [
        (name, r["clients"], r["rps"],
         f"{r['rps'] / bare[r['clients']]['rps']:.2f}" if r["clients"] in bare else "-",
         r["p50_ms"], r["p99_ms"], r["errors"], r["server_cpu_per_request_ms"])
        for name, measured in servers.items()
        for r in measured["load"]
    ]  # fmt: skip
    print_columns(LOAD_COLUMNS, rows)
    if any(m["sse"] for m in servers.values()):
        print(f"\nevent streams held, the event delivered to all within {SSE_DELIVERY_S:g} s")
        for name, measured in servers.items():
            if not measured["sse"]:
                continue
            held = max((s["streams"] for s in measured["sse"] if s["pass"]), default=0)
            levels = ", ".join(
                f"{s['streams']} {'ok' if s['pass'] else 'FAIL'} (max {s['max_ms']} ms"
                + (f", {s['opened']} opened" if s["opened"] != s["streams"] else "")
                + ")"
                for s in measured["sse"]
            )
            print(f"  {name:<10} {held:>6}   {levels}")
    verdicts = _verdicts(result)
    result["verdicts"] = verdicts
    if not verdicts:
        return
    print(
        f"\ntargets: at 8 clients >= {TARGET_RATIO}x bare with p99 <= {TARGET_P99_MS:g} ms; "
        "no failed request at 32 clients"
    )
    for name, v in verdicts.items():
        parts = []
        if "ratio_at_8" in v:
            parts.append(f"{v['ratio_at_8']:.2f}x {pass_fail(v['ratio_pass'])}")
            parts.append(f"p99 {v['p99_at_8_ms']:.1f} ms {pass_fail(v['p99_pass'])}")
        if "errors_at_32" in v:
            parts.append(f"{v['errors_at_32']} errors at 32 {pass_fail(v['errors_pass'])}")
        print(f"  {name:<10} {'; '.join(parts)}  => {pass_fail(v['pass'])}")


# -- main -----------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    p.add_argument(
        "--servers",
        help="comma-separated, in order, of echo,bare,proxy,serve,fast,candidate (default "
        "echo,bare,proxy,serve; and candidate with --serve-env, --max-ongoing or --replicas)",
    )
    p.add_argument(
        "--clients", type=_ints, default=list(CLIENTS), help="concurrency levels (1,8,32)"
    )
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per level (5)")
    p.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each level (1)"
    )
    p.add_argument(
        "--sse",
        type=_ints,
        default=list(SSE_LEVELS),
        help="simultaneous event streams to try, in order; empty: none",
    )
    p.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the candidate's environment for Ray and Serve, over LOCAL_SERVE_ENV",
    )
    p.add_argument("--max-ongoing", type=int, help="the candidate's max_ongoing_requests")
    p.add_argument("--replicas", type=int, help="the candidate's API replicas")
    p.add_argument(
        "--ingress",
        choices=("port", "direct"),
        default="port",
        help="load the farm's port (default) or, with direct ingress, the replicas' own",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 2 when the deployment as rayfarm runs it misses the target",
    )
    add_output_options(p, "logs and raw results (a temp dir)")
    args = p.parse_args(argv)
    servers = args.servers or ",".join(DEFAULT_SERVERS)
    if args.servers is None and (args.serve_env or args.max_ongoing or args.replicas):
        servers += ",candidate"
    args.server_list = [s.strip() for s in servers.split(",") if s.strip()]
    unknown = sorted(set(args.server_list) - set(SERVERS))
    if unknown or not args.server_list:
        p.error(f"--servers: unknown {unknown}")
    if len(set(args.server_list)) != len(args.server_list):
        p.error("--servers: each server once")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)

    def serve_passed(result: dict[str, Any]) -> bool:
        """The deployment as ``rayfarm up`` makes it met the target (or was not run)."""
        return bool(result.get("verdicts", {}).get("serve", {}).get("pass", True))

    return run_bench(
        args.out, args.json, "rayfarm-api-", lambda procs, out: measure(args, procs, out),
        passed=serve_passed if args.check else None,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
