"""The clients ``bench/api.py`` loads its servers with, each run in a process of its
own (this script, one role), so that the driver never shares their event loop:

- **load**: ``--clients`` HTTP/1.1 keep-alive connections on raw asyncio streams, each
  sending ``GET --path`` back to back: every latency after ``--warmup`` seconds, for
  ``--duration`` seconds, into ``--result``;
- **sse**: ``--streams`` event streams on ``--job``, one event appended, and how soon each
  stream got it, into ``--result``.

    python bench/_api_clients.py ROLE --url URL --result FILE [options]   # as bench/api.py runs it

Every request carries ``BENCH_TOKEN``, the admin of the bench's own Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import percentile

SCRIPT = Path(__file__).resolve()
HOST = "127.0.0.1"
JOB_ID = "0123456789abcdef"
#: The admin token every request carries (the bench's own Redis: a fixed one will do).
BENCH_TOKEN = "rf_" + "b" * 43
AUTH_LINE = b"Authorization: Bearer %s\r\n" % BENCH_TOKEN.encode()
#: An event reaches every open stream within this, for an SSE level to pass.
SSE_DELIVERY_S = 1.0
#: Longest one status request may take before it counts as failed.
REQUEST_TIMEOUT_S = 10.0
SSE_OPEN_TIMEOUT_S = 15.0
SSE_WAIT_S = 5.0
SSE_OPEN_CONCURRENCY = 50


def run_loop(coro: Any) -> Any:
    """``coro`` on uvloop (the servers' loop too), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - ray[serve] brings it
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- the load generator -----------------------------------------------------------------------


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
    result = run_loop(_load(args))
    Path(args.result).write_text(json.dumps(result))
    return 0


# -- the SSE client ---------------------------------------------------------------------------


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
        "p50_ms": round(percentile(delays, 50) * 1000, 2) if delays else None,
        "max_ms": round(delays[-1] * 1000, 2) if delays else None,
    }


def role_sse(args: argparse.Namespace) -> int:
    result = run_loop(_sse(args))
    Path(args.result).write_text(json.dumps(result))
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--url", required=True, help="comma-separated: the clients take turns")
    p.add_argument("--result", required=True)
    for name in ("--path", "--job", "--redis-url"):
        p.add_argument(name)
    p.add_argument("--clients", type=int)
    p.add_argument("--streams", type=int)
    p.add_argument("--duration", type=float)
    p.add_argument("--warmup", type=float)
    return p.parse_args(argv)


ROLES = {"load": role_load, "sse": role_sse}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    return ROLES[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
