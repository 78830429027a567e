"""``rayfarm up``: the whole farm on one machine (or attached to a running cluster).

Starts what is missing, in order — Redis (unless ``REDIS_URL``), Ray (unless
``address``), the dispatcher, the Serve app — and stops exactly what it started.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rayfarm.cluster.settings import NAMESPACE, Settings

__all__ = ["up"]

log = logging.getLogger("rayfarm.up")


def up(settings: Settings, address: str | None = None, ready: Any = print) -> None:
    """Run the farm in the foreground until SIGINT/SIGTERM; then stop what was started."""
    import ray
    from ray import serve

    from rayfarm.cluster.dispatcher import start_dispatcher
    from rayfarm.cluster.redis_server import RedisServer
    from rayfarm.cluster.serve import APP_NAME, LOGGING, build_app

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if not settings.redis_url:
            redis = stack.enter_context(RedisServer(data_dir / "redis"))
            settings = dataclasses.replace(settings, redis_url=redis.url)
        ray.init(
            address=address,
            namespace=NAMESPACE,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        stack.callback(ray.shutdown)
        dispatcher = start_dispatcher(settings)
        stack.callback(lambda: ray.kill(dispatcher, no_restart=True))
        serve.start(
            http_options={"host": settings.host, "port": settings.port}, logging_config=LOGGING
        )
        stack.callback(serve.shutdown)
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        ready(
            f"rayfarm is up at http://{settings.host}:{settings.port} "
            f"(storage {settings.storage}, redis {settings.redis_url}); Ctrl-C stops it"
        )
        while not stop.wait(0.5):
            pass
        ready("rayfarm: stopping")
