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
first that fails.

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
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # what the benches share
    BenchError,
    Processes,
    descendants,
    kill_seen,
    killpg,
    machine,
    percentile,
    run_bench,
)

from rayfarm.cluster.ports import free_port

PYTHON = sys.executable
SCRIPT = Path(__file__).resolve()
HOST = "127.0.0.1"
JOB_ID = "0123456789abcdef"
SERVERS = ("echo", "bare", "proxy", "serve", "fast", "candidate")
DEFAULT_SERVERS = ("echo", "bare", "proxy", "serve")
CLIENTS = (1, 8, 32)
#: The echo server's levels run this long at most: its figures do not move.
ECHO_DURATION_S = 2.0
SSE_LEVELS = (100, 500, 1000, 2000, 4000)
#: Serve's default ingress (the Python proxy actor, the app in a thread of one replica):
#: what ``rayfarm up`` deployed before issue 6, with the app as it is now.
PROXY: dict[str, Any] = {
    "env": {
        "RAYFARM_FAST_INGRESS": "0",
        "RAY_SERVE_ENABLE_HA_PROXY": "0",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "1",
    },
    "max_ongoing": None,
    "replicas": 1,
}
#: The fast ingress (``RAYFARM_FAST_INGRESS=1``): HAProxy on the farm's port in front of two
#: replicas that answer HTTP themselves, the app on the replica's own event loop.
FAST: dict[str, Any] = {
    "env": {
        "RAYFARM_FAST_INGRESS": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    },
    "max_ongoing": None,
    "replicas": 2,
}
#: What BENCHMARKS.md proposes on top of the fast ingress: room for more event streams.
CANDIDATE: dict[str, Any] = {**FAST, "max_ongoing": 4096}
#: The admin token every request carries (the bench's own Redis: a fixed one will do).
BENCH_TOKEN = "rf_" + "b" * 43
AUTH_LINE = b"Authorization: Bearer %s\r\n" % BENCH_TOKEN.encode()
#: Issue 6: a Serve deployment's throughput at 8 clients over bare uvicorn's, at least.
TARGET_RATIO = 0.8
#: ... its p99 at 8 clients, at most.
TARGET_P99_MS = 20.0
#: An event reaches every open stream within this, for an SSE level to pass.
SSE_DELIVERY_S = 1.0
#: Seconds of an idle server's CPU use sampled before it is loaded.
IDLE_SAMPLE_S = 2.0
SERVER_START_S = 180.0
SERVER_STOP_S = 60.0
#: Longest a load or SSE client process may run past its own schedule.
CLIENT_SLACK_S = 60.0
#: Longest one status request may take before it counts as failed.
REQUEST_TIMEOUT_S = 10.0
SSE_OPEN_TIMEOUT_S = 15.0
SSE_WAIT_S = 5.0
SSE_OPEN_CONCURRENCY = 50
#: What the echo server answers: the size of a real status body.
ECHO_BODY = (
    b'{"id":"0123456789abcdef","state":"PENDING","frames_done":0,"frames_total":4,'
    b'"tasks_done":0,"tasks_total":4,"error":null,"event":"1700000000000-0"}'
)


# -- the servers (each in its own process) ---------------------------------------------------


def _settings(args: argparse.Namespace) -> Any:
    """The farm's settings as ``rayfarm up`` reads them, on the bench's Redis and port."""
    from rayfarm.cluster.settings import Settings

    data = Path(args.data_dir)
    return Settings.from_env(
        redis_url=args.redis_url,
        storage=(data / "storage").as_uri(),
        data_dir=str(data),
        host=HOST,
        port=args.port,
    )


def role_bare(args: argparse.Namespace) -> int:
    """Plain uvicorn serving the app over the bench's Redis."""
    import uvicorn

    from rayfarm.cluster.api import create_app
    from rayfarm.cluster.context import AppContext

    app = create_app(AppContext.build(_settings(args)))
    uvicorn.run(app, host=HOST, port=args.port, log_level="warning", access_log=False)
    return 0


def role_serve(args: argparse.Namespace) -> int:
    """The Serve deployment as ``rayfarm up`` starts it (cluster/local.py), without the
    dispatcher; ``--serve-env``, ``--max-ongoing`` and ``--replicas`` change it."""
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    # The environment before ray is imported: Serve reads it once, into constants.
    for pair in args.serve_env:
        name, _, value = pair.partition("=")
        os.environ[name] = value
    from rayfarm.cluster.local import local_serve_env

    local_serve_env()
    import ray
    from ray import serve

    from rayfarm.cluster.local import LOCAL_SYSTEM_CONFIG, grpc_options
    from rayfarm.cluster.serve import APP_NAME, LOGGING, RayfarmAPI, build_app
    from rayfarm.cluster.settings import NAMESPACE

    settings = _settings(args)
    if args.replicas:
        settings = replace(settings, api_replicas=args.replicas)
    ray.init(
        address="local",
        namespace=NAMESPACE,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
        _system_config=LOCAL_SYSTEM_CONFIG,
    )
    try:
        serve.start(
            http_options={"host": settings.host, "port": settings.port},
            grpc_options=grpc_options(settings),
            logging_config=LOGGING,
        )
        application = build_app(settings)
        if args.max_ongoing:  # no setting for it: build_app's options, and this one
            deployment: Any = RayfarmAPI
            application = deployment.options(
                num_replicas=settings.api_replicas, max_ongoing_requests=args.max_ongoing
            ).bind(settings.to_dict())
        serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
        ready = {"url": f"http://{HOST}:{settings.port}", "direct": _direct_targets()}
        Path(args.ready).write_text(json.dumps(ready))
        while not stopping:
            time.sleep(0.2)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def _direct_targets() -> list[str]:
    """The replicas' own HTTP ports where direct ingress is on (empty otherwise)."""
    import ray
    from ray.serve._private.constants import RAY_SERVE_ENABLE_DIRECT_INGRESS
    from ray.serve.context import _get_global_client

    if not RAY_SERVE_ENABLE_DIRECT_INGRESS:
        return []
    client = _get_global_client()
    assert client is not None  # serve.run() made one
    controller = client._controller
    deadline = time.monotonic() + 30
    while True:  # the controller learns the replicas' ports on its next loop
        groups = ray.get(controller.get_target_groups.remote(from_proxy_manager=True))
        found = [
            f"http://{HOST}:{t.port}"
            for g in groups
            if str(g.protocol).upper().endswith("HTTP")
            for t in g.targets
            if "replica" in t.name.lower()
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def role_echo(args: argparse.Namespace) -> int:
    """A canned 200 for every request: how fast the load generator itself can go."""
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(ECHO_BODY), ECHO_BODY)
    )

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport, self.buffer = transport, b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            n = self.buffer.count(b"\r\n\r\n")
            if n:
                self.buffer = self.buffer[self.buffer.rindex(b"\r\n\r\n") + 4 :]
                self.transport.write(answer * n)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Echo, HOST, args.port)
        async with server:
            await server.serve_forever()

    _run(main())
    return 0


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - ray[serve] brings it
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- the load generator (its own process) -----------------------------------------------------


def _split(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    return host, int(port)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 response: (status, body, whether the server keeps the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    keep = b"connection: close" not in lower
    at = lower.find(b"content-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at)
        body = await reader.readexactly(int(lower[at + 15 : end]))
    elif b"transfer-encoding: chunked" in lower:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        body, keep = await reader.read(), False
    return status, body, keep


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    urls = args.url.split(",")
    path = args.path.encode()
    loop = asyncio.get_running_loop()
    # uvloop's loop.time() counts whole milliseconds: latencies need the real clock.
    clock = time.perf_counter
    start = clock()
    record_from = start + args.warmup
    stop_at = record_from + args.duration
    hard_stop = loop.time() + args.warmup + args.duration + REQUEST_TIMEOUT_S
    latencies: list[float] = []
    counted = [0]  # every request answered, the warm-up's included (CPU per request)
    errors: dict[str, int] = {}
    bodies: list[bytes] = []

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def client(n: int) -> None:
        host, port = _split(urls[n % len(urls)])
        head = b"GET %s HTTP/1.1\r\nHost: %s:%d\r\n" % (path, host.encode(), port)
        request = head + AUTH_LINE + b"\r\n"
        writer = None
        try:
            async with asyncio.timeout_at(hard_stop):
                while clock() < stop_at:
                    if writer is None:
                        try:
                            reader, writer = await asyncio.open_connection(host, port)
                        except OSError as exc:
                            if clock() >= record_from:
                                error(f"connect: {type(exc).__name__}")
                            await asyncio.sleep(0.05)
                            continue
                    began = clock()
                    try:
                        writer.write(request)
                        status, body, keep = await _read_response(reader)
                    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                        if began >= record_from:
                            error(f"read: {type(exc).__name__}")
                        writer.close()
                        writer = None
                        continue
                    took = clock() - began
                    counted[0] += 1
                    if began >= record_from:
                        latencies.append(took)
                        if status != 200:
                            error(f"HTTP {status}")
                    if len(bodies) < 1:
                        bodies.append(body)
                    if not keep:
                        writer.close()
                        writer = None
        except TimeoutError:
            error("timeout")
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(client(n) for n in range(args.clients)))
    return {
        "clients": args.clients,
        "seconds": args.duration,
        "answered": counted[0],
        "latencies_ms": [round(x * 1000, 4) for x in latencies],
        "errors": errors,
        "sample_body": bodies[0].decode(errors="replace") if bodies else None,
    }


def role_load(args: argparse.Namespace) -> int:
    result = _run(_load(args))
    Path(args.result).write_text(json.dumps(result))
    return 0


# -- the SSE client (its own process) -----------------------------------------------------------


async def _sse(args: argparse.Namespace) -> dict[str, Any]:
    from rayfarm.cluster.store import JobStore

    host, port = _split(args.url.split(",")[0])
    loop = asyncio.get_running_loop()
    request = (
        b"GET /jobs/%s/events HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n%s\r\n"
        % (args.job.encode(), host.encode(), port, AUTH_LINE)
    )
    # Streams replay the job's log from its start: earlier levels' pings included.
    token = f"{os.getpid()}-{time.time_ns()}"
    nonce = f'"nonce": "{token}"'.encode()
    opened: list[asyncio.StreamWriter] = []
    got: dict[int, float] = {}
    failed: dict[str, int] = {}
    ping = asyncio.Event()
    everyone = asyncio.Event()
    gate = asyncio.Semaphore(SSE_OPEN_CONCURRENCY)
    open_deadline = loop.time() + SSE_OPEN_TIMEOUT_S

    def fail(kind: str) -> None:
        failed[kind] = failed.get(kind, 0) + 1

    async def stream(n: int) -> None:
        """Open the stream, read up to the job's first event, then wait for the ping."""
        try:
            async with gate:
                async with asyncio.timeout_at(open_deadline):
                    reader, writer = await asyncio.open_connection(host, port, limit=2**20)
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    if head[9:12] != b"200":
                        fail(f"HTTP {head[9:12].decode()}")
                        writer.close()
                        return
                    while b"event: " not in await reader.readuntil(b"\n\n"):
                        pass
            opened.append(writer)
            while True:
                message = await reader.readuntil(b"\n\n")
                if nonce in message:
                    got[n] = time.perf_counter()
                    if len(got) == args.streams:
                        everyone.set()
                    break
        except TimeoutError:
            fail("open timeout")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            fail(f"{'stream' if ping.is_set() else 'open'}: {type(exc).__name__}")

    began = loop.time()
    tasks = [asyncio.create_task(stream(n)) for n in range(args.streams)]
    while len(opened) + sum(failed.values()) < args.streams and loop.time() < open_deadline:
        await asyncio.sleep(0.05)
    open_s = loop.time() - began
    await asyncio.sleep(0.5)  # the last streams reach their wait in the server
    store = JobStore.from_url(args.redis_url)
    try:
        sent = time.perf_counter()
        ping.set()
        await store.event(args.job, "bench_ping", streams=args.streams, nonce=token)
    finally:
        await store.close()
    try:
        await asyncio.wait_for(everyone.wait(), SSE_WAIT_S)
    except TimeoutError:
        pass
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for writer in opened:
        writer.close()
    delays = sorted(t - sent for t in got.values())
    return {
        "streams": args.streams,
        "opened": len(opened),
        "open_s": round(open_s, 3),
        "failed": failed,
        "delivered": len(delays),
        "delivered_within_s": sum(1 for d in delays if d <= SSE_DELIVERY_S),
        "p50_ms": round(statistics.median(delays) * 1000, 2) if delays else None,
        "max_ms": round(delays[-1] * 1000, 2) if delays else None,
    }


def role_sse(args: argparse.Namespace) -> int:
    result = _run(_sse(args))
    Path(args.result).write_text(json.dumps(result))
    return 0


# -- the driver -----------------------------------------------------------------------------------


@dataclass
class Server:
    """One server under test, in a process session of its own; every process ever seen
    under it is stopped with it (Ray's workers start sessions of their own)."""

    name: str
    procs: Processes
    log: Path
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    direct: list[str] = field(default_factory=list)
    seen: dict[int, int] = field(default_factory=dict)

    def start(self, cmd: list[Any], ready: Path | None, probe: str, url: str = "") -> None:
        self.process = self.procs.start(cmd, self.log, env=_env())
        deadline = time.monotonic() + SERVER_START_S
        while ready is not None and not ready.exists():
            self._check(deadline)
            time.sleep(0.2)
        if ready is not None:
            info = json.loads(ready.read_text())
            url, self.direct = info["url"], info["direct"]
        self.url = url
        while not _answers(url + probe):
            self._check(deadline)
            time.sleep(0.2)
        self.tree()

    def _check(self, deadline: float) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise BenchError(f"{self.name} exited ({self.process.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            raise BenchError(
                f"{self.name} did not answer in {SERVER_START_S:.0f} s; see {self.log}"
            )

    def tree(self) -> dict[int, tuple[str, float]]:
        """pid -> (name, CPU seconds) of every process under the server now."""
        if self.process is None:
            return {}
        found = descendants(self.process.pid)
        self.seen.update((pid, start) for pid, (start, _, _) in found.items())
        return {pid: (name, cpu) for pid, (_, name, cpu) in found.items()}

    def stop(self) -> None:
        """SIGTERM (the Serve role then shuts Serve and its Ray down); after
        SERVER_STOP_S, kill its session; then any process ever seen under it."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            self.tree()  # note every process under it now
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(SERVER_STOP_S)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop in {SERVER_STOP_S:.0f} s: killing it")
        self.process = None
        killpg(process.pid)
        process.wait()
        kill_seen(self.seen)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "REDIS_URL", "RAYFARM_STORAGE", "RAYFARM_DATA_DIR"):
        env.pop(name, None)
    return env


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {BENCH_TOKEN}"})
        with urllib.request.urlopen(request, timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _cpu_by_name(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    used: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        old = before.get(pid)
        delta = cpu - (old[1] if old is not None and old[0] == name else 0.0)
        if delta > 0.005:
            used[name] = round(used.get(name, 0.0) + delta, 2)
    return dict(sorted(used.items(), key=lambda kv: -kv[1]))


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
        cmd = [PYTHON, SCRIPT, "--role", "load", "--url", url, "--result", result_file]
        cmd += ["--path", f"/jobs/{JOB_ID}/status", "--clients", clients]
        cmd += ["--duration", duration, "--warmup", self.args.warmup]
        before = server.tree()
        self._client(cmd, self.out / f"load-{server.name}.log", duration + self.args.warmup)
        cpu = _cpu_by_name(before, server.tree())
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
        cmd = [PYTHON, SCRIPT, "--role", "sse", "--url", url, "--result", result_file]
        cmd += ["--job", JOB_ID, "--streams", streams, "--redis-url", self.redis_url]
        self._client(cmd, self.out / f"sse-{server.name}.log", SSE_OPEN_TIMEOUT_S + SSE_WAIT_S)
        row: dict[str, Any] = json.loads(result_file.read_text())
        row["pass"] = row["opened"] == streams and row["delivered_within_s"] == streams
        print(
            f"  {server.name:<10} {streams:>5} streams: opened {row['opened']} in "
            f"{row['open_s']:.1f} s, got the event {row['delivered']} (max {row['max_ms']} ms)"
            f"{'' if not row['failed'] else ' failed ' + json.dumps(row['failed'])} "
            f"{'PASS' if row['pass'] else 'FAIL'}",
            flush=True,
        )
        return row

    def _client(self, cmd: list[Any], log: Path, seconds: float) -> None:
        process = self.procs.start(cmd, log, env=_env())
        try:
            rc = process.wait(seconds + CLIENT_SLACK_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"the client ran over its time; see {log}") from None
        if rc != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise BenchError(f"the client exited {rc}; see {log}:\n{tail}")

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


def _serve_cmd(
    args: argparse.Namespace, config: dict[str, Any], port: int, data: Path, ready: Path
) -> list[Any]:
    cmd: list[Any] = [PYTHON, SCRIPT, "--role", "serve", "--port", port]
    cmd += ["--redis-url", args.redis_url, "--data-dir", data, "--ready", ready]
    for name, value in config["env"].items():
        cmd += ["--serve-env", f"{name}={value}"]
    if config.get("max_ongoing"):
        cmd += ["--max-ongoing", config["max_ongoing"]]
    if config.get("replicas"):
        cmd += ["--replicas", config["replicas"]]
    return cmd


async def _create_job(redis_url: str) -> None:
    from rayfarm.cluster.auth import AuthStore
    from rayfarm.cluster.store import JobStore, connect
    from rayfarm.models import Job, JobSpec, JobState

    spec = JobSpec(frames="1-4")
    job = Job(
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


def _candidate(args: argparse.Namespace) -> dict[str, Any]:
    """The candidate: the command line's changes to the deployment, else CANDIDATE."""
    if not (args.serve_env or args.max_ongoing or args.replicas):
        return CANDIDATE
    env = dict(pair.partition("=")[::2] for pair in args.serve_env)
    return {"env": env, "max_ongoing": args.max_ongoing, "replicas": args.replicas}


def start_server(
    name: str, args: argparse.Namespace, procs: Processes, out: Path, candidate: dict[str, Any]
) -> Server:
    server = Server(name, procs, out / f"{name}.log")
    port = free_port()
    url = f"http://{HOST}:{port}"
    probe = f"/jobs/{JOB_ID}/status"
    if name == "echo":
        server.start([PYTHON, SCRIPT, "--role", "echo", "--port", port], None, probe, url)
    elif name == "bare":
        cmd = [PYTHON, SCRIPT, "--role", "bare", "--port", port, "--redis-url", args.redis_url]
        server.start([*cmd, "--data-dir", out / "bare"], None, probe, url)
    else:
        config = {"proxy": PROXY, "serve": {"env": {}}, "fast": FAST, "candidate": candidate}[name]
        ready = out / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        server.start(_serve_cmd(args, config, port, out / name, ready), ready, probe)
    return server


def measure(args: argparse.Namespace, procs: Processes, out: Path) -> dict[str, Any]:
    from rayfarm.cluster.redis_server import RedisServer

    info = machine()
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu_model']}), ray {info['ray']}, "
        f"python {info['python']}, load {info['load_average']}; files in {out}",
        flush=True,
    )
    candidate = _candidate(args)
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
                idle = sum(_cpu_by_name(before, server.tree()).values())
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
    print(
        f"  {'server':<10} {'clients':>7} {'req/s':>9} {'x bare':>7} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'errors':>7} {'server CPU ms/req':>18}"
    )
    for name, measured in servers.items():
        for r in measured["load"]:
            ratio = f"{r['rps'] / bare[r['clients']]['rps']:.2f}" if r["clients"] in bare else "-"
            print(
                f"  {name:<10} {r['clients']:>7} {r['rps']:>9.1f} {ratio:>7} {r['p50_ms']:>8.2f} "
                f"{r['p99_ms']:>8.2f} {r['errors']:>7} {r['server_cpu_per_request_ms']:>18.3f}"
            )
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
            parts.append(f"{v['ratio_at_8']:.2f}x {_verdict(v['ratio_pass'])}")
            parts.append(f"p99 {v['p99_at_8_ms']:.1f} ms {_verdict(v['p99_pass'])}")
        if "errors_at_32" in v:
            parts.append(f"{v['errors_at_32']} errors at 32 {_verdict(v['errors_pass'])}")
        print(f"  {name:<10} {'; '.join(parts)}  => {_verdict(v['pass'])}")


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -- main -----------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    p.add_argument(
        "--servers",
        help="comma-separated, in order, of echo,bare,proxy,serve,fast,candidate (default "
        "echo,bare,serve,fast; and candidate with --serve-env, --max-ongoing or --replicas)",
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
    p.add_argument("--out", type=Path, help="logs and raw results (a temp dir)")
    p.add_argument("--json", type=Path, help="also write the results here as JSON")
    # The bench's own processes: servers and clients.
    p.add_argument(
        "--role", choices=("bare", "serve", "echo", "load", "sse"), help=argparse.SUPPRESS
    )
    for name in ("--url", "--path", "--redis-url", "--data-dir", "--ready", "--result", "--job"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--streams", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role is None:
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
    roles = {
        "bare": role_bare,
        "serve": role_serve,
        "echo": role_echo,
        "load": role_load,
        "sse": role_sse,
    }
    if args.role is not None:
        if args.role == "load":
            args.clients = args.clients[0]
        return roles[args.role](args)
    outcome: dict[str, Any] = {}

    def work(procs: Processes, out: Path) -> dict[str, Any]:
        outcome.update(measure(args, procs, out))
        return outcome

    rc = run_bench(args.out, args.json, "rayfarm-api-", work)
    if (
        rc == 0
        and args.check
        and not outcome.get("verdicts", {}).get("serve", {}).get("pass", True)
    ):
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
