"""The servers ``bench/api.py`` measures: what each runs (a role of this script, in a
process of its own) and how the driver starts, waits for and stops one (``Server``).

- **bare**: plain uvicorn serving ``create_app(AppContext.build(settings))`` over the bench's
  Redis (uvloop and httptools, access log off);
- **serve**: the Serve deployment as ``rayfarm up`` starts it (cluster/local.py), without
  the dispatcher; ``--serve-env``, ``--max-ongoing`` and ``--replicas`` change it (the
  ``proxy``, ``fast`` and ``candidate`` servers are this role so changed); it writes its
  URL and its replicas' own (direct ingress) to ``--ready``;
- **echo**: a canned 200 from a raw asyncio protocol, the load generator's ceiling.

    python bench/_api_servers.py ROLE --port PORT [options]     # as bench/api.py runs it
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _api_clients import BENCH_TOKEN, HOST, JOB_ID, run_loop
from _common import PYTHON, Processes, Service, Tree, answers, bench_env, cpu_by_name

from rayfarm.cluster.ports import free_port

SCRIPT = Path(__file__).resolve()
SERVERS = ("echo", "bare", "proxy", "serve", "fast", "candidate")
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
SERVER_START_S = 180.0
SERVER_STOP_S = 60.0
#: What the echo server answers: the size of a real status body.
ECHO_BODY = (
    b'{"id":"0123456789abcdef","state":"PENDING","frames_done":0,"frames_total":4,'
    b'"tasks_done":0,"tasks_total":4,"error":null,"event":"1700000000000-0"}'
)


# -- the roles (each in its own process) -----------------------------------------------------


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

    run_loop(main())
    return 0


# -- the driver's side ------------------------------------------------------------------------


class Server(Service):
    """One server under test (see ``Service``): its URL, and its replicas' own where
    Serve's direct ingress is on."""

    def __init__(self, name: str, procs: Processes, log: Path) -> None:
        super().__init__(name, procs, log)
        self.url = ""
        self.direct: list[str] = []

    def start(
        self, cmd: list[Any], ready: Path | None, url: str = "", env: dict[str, str] | None = None
    ) -> None:
        """Start ``cmd`` with ``env`` added to the bench's environment; its URL is ``url``,
        or what it writes to ``ready`` once up. Up when the job's status answers there."""
        self.launch(cmd, {**bench_env(), **(env or {})})
        if ready is not None:
            self.wait_for(ready.exists, SERVER_START_S)
            info = json.loads(ready.read_text())
            url, self.direct = info["url"], info["direct"]
        self.url = url
        self.wait_for(lambda: answers(f"{url}/jobs/{JOB_ID}/status", BENCH_TOKEN), SERVER_START_S)
        self.tree()

    def cpu_since(self, before: Tree) -> dict[str, float]:
        """CPU seconds each of its processes used since ``before`` (a ``tree()``), by
        name, those that used any."""
        used = cpu_by_name(before, self.tree())
        return {name: round(seconds, 2) for name, seconds in used.items() if seconds > 0.005}

    def stop(self) -> None:
        """SIGTERM (the Serve role then shuts Serve and its Ray down), then as ``shut_down``."""
        self.shut_down(signal.SIGTERM, SERVER_STOP_S)


def candidate_config(args: argparse.Namespace) -> dict[str, Any]:
    """The candidate: the command line's changes to the deployment, else CANDIDATE."""
    if not (args.serve_env or args.max_ongoing or args.replicas):
        return CANDIDATE
    env = dict(pair.partition("=")[::2] for pair in args.serve_env)
    return {"env": env, "max_ongoing": args.max_ongoing, "replicas": args.replicas}


def start_server(
    name: str, args: argparse.Namespace, procs: Processes, out: Path, candidate: dict[str, Any]
) -> Server:
    """Server ``name`` (one of SERVERS) over ``args.redis_url``, up and answering.

    The bench is one user: the farm's per-user cap on event streams
    (``RAYFARM_MAX_STREAMS_PER_USER``, 64 by default: a security limit, tested on its own)
    is raised to the most streams the bench opens, so a level measures what the server
    holds, not the cap."""
    server = Server(name, procs, out / f"{name}.log")
    port = free_port()
    url = f"http://{HOST}:{port}"
    env = {"RAYFARM_MAX_STREAMS_PER_USER": str(max([1, *args.sse]))}
    if name == "echo":
        server.start([PYTHON, SCRIPT, "echo", "--port", port], None, url)
    elif name == "bare":
        cmd = [PYTHON, SCRIPT, "bare", "--port", port, "--redis-url", args.redis_url]
        server.start([*cmd, "--data-dir", out / "bare"], None, url, env)
    else:
        config = {"proxy": PROXY, "serve": {"env": {}}, "fast": FAST, "candidate": candidate}[name]
        ready = out / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        server.start(_serve_cmd(args, config, port, out / name, ready), ready, env=env)
    return server


def _serve_cmd(
    args: argparse.Namespace, config: dict[str, Any], port: int, data: Path, ready: Path
) -> list[Any]:
    cmd: list[Any] = [PYTHON, SCRIPT, "serve", "--port", port]
    cmd += ["--redis-url", args.redis_url, "--data-dir", data, "--ready", ready]
    for name, value in config["env"].items():
        cmd += ["--serve-env", f"{name}={value}"]
    if config.get("max_ongoing"):
        cmd += ["--max-ongoing", config["max_ongoing"]]
    if config.get("replicas"):
        cmd += ["--replicas", config["replicas"]]
    return cmd


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--port", type=int, required=True)
    for name in ("--redis-url", "--data-dir", "--ready"):
        p.add_argument(name)
    p.add_argument("--max-ongoing", type=int)
    p.add_argument("--replicas", type=int)
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


ROLES = {"bare": role_bare, "serve": role_serve, "echo": role_echo}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    return ROLES[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
