"""The Ray Serve application: the FastAPI app behind Serve's HTTP proxy.

The deployment builds its heavy state (Redis client, storage, dispatcher handle)
in ``__init__``; it reserves no CPU so the render actors get the cores.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from rayfarm.cluster import grpc_ingress
from rayfarm.cluster.api import AppContext, create_app, set_process_context
from rayfarm.cluster.backpressure import bound_receive_queues
from rayfarm.cluster.dispatcher import ON_HEAD, get_dispatcher, start_dispatcher
from rayfarm.cluster.settings import Settings

__all__ = ["APP_NAME", "RayfarmAPI", "app_builder", "build_app"]

APP_NAME = "rayfarm"
#: What cluster/deploy/serve.yaml and ray-cluster.yaml ship in place of real settings.
PLACEHOLDER = "CHANGE-ME"
app = create_app()


class _Dispatcher:
    """The dispatcher actor as the API reaches it: looked up on first use and again
    after it restarts."""

    def __init__(self) -> None:
        self._handle: Any = None

    def handle(self) -> Any:
        if self._handle is None:
            self._handle = get_dispatcher()
        return self._handle

    def notify(self) -> None:
        """Fire-and-forget nudge: something changed in Redis."""
        try:
            self.handle().notify.remote()
        except (ValueError, ray.exceptions.RayError):
            self._handle = None
            raise

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle(), method).remote(*args)
        except ray.exceptions.RayActorError:
            self._handle = None
            raise

    async def inspect(self, inputs: Any, blender: str) -> dict[str, Any]:
        """Catalogue a scene folder with the dispatcher's inspector actor, read by
        Blender ``blender``."""
        result: dict[str, Any] = await self.call("inspect", inputs, blender)
        return result

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("stats")
        return result


#: Serve logs every request at INFO by default; on a render node that costs CPU the
#: renders need (clients long-poll the status), so only warnings are logged.
LOGGING = {"log_level": "WARNING", "enable_access_log": False}


@serve.deployment(
    name="api",
    ray_actor_options={"num_cpus": 0},
    # Every open event stream and status long-poll holds one: 4 096 per replica (HAProxy
    # itself caps connections per replica lower; BENCHMARKS.md).
    max_ongoing_requests=4096,
    logging_config=LOGGING,
)
@serve.ingress(app)
class RayfarmAPI:
    def __init__(self, settings: dict[str, Any]) -> None:
        dispatcher = _Dispatcher()
        ctx = AppContext.build(
            Settings.from_dict(settings),
            notify=dispatcher.notify,
            inspect=dispatcher.inspect,
            stats=dispatcher.stats,
        )
        set_process_context(ctx)
        # Serve would read every request body ahead of the app, whole, into memory.
        bound_receive_queues()

    # gRPC (rayfarm.v1.RayfarmService): Serve's proxy calls the method named after the RPC.
    async def SubmitJob(self, request: Any, grpc_context: Any) -> Any:
        return await grpc_ingress.submit_job(request, grpc_context)

    async def CancelJob(self, request: Any, grpc_context: Any) -> Any:
        return await grpc_ingress.cancel_job(request, grpc_context)

    async def StreamProgress(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
        async for event in grpc_ingress.stream_progress(request, grpc_context):
            yield event


def build_app(settings: Settings) -> serve.Application:
    """The API deployment, its replicas on the head node beside the dispatcher and the
    proxy: on a worker they would die with it (a GPU node scaled down), failing every
    request in flight."""
    deployment: Any = RayfarmAPI  # a serve.Deployment at run time; its stubs do not say so
    fast = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    return deployment.options(
        num_replicas=settings.api_replicas or (2 if fast else 1),
        ray_actor_options={"num_cpus": 0, "resources": ON_HEAD},
    ).bind(settings.to_dict())


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application ``serve deploy cluster/deploy/serve.yaml`` builds on a running
    cluster.

    Settings come from ``args`` (the config's ``args:``), then the environment
    (``REDIS_URL``, ``RAYFARM_STORAGE``, ``RAYFARM_*``: the application's
    ``runtime_env.env_vars``). Starts the dispatcher too (named and detached; a running
    one is reused), so one ``serve deploy`` brings up the whole service, as ``rayfarm up
    --address auto`` does.
    """
    settings = Settings.from_env(**args)
    if not settings.redis_url:
        # rayfarm up starts a local Redis; on a cluster the job state must outlive any node.
        raise ValueError("serve deploy needs REDIS_URL: a Redis every node reaches")
    for name, value in (("REDIS_URL", settings.redis_url), ("RAYFARM_STORAGE", settings.storage)):
        if PLACEHOLDER in value:
            raise ValueError(f"{name} is still the placeholder {value!r}: set it in serve.yaml")
    if settings.auth:
        from rayfarm.cluster.local import bootstrap_admin

        bootstrap_admin(settings.redis_url, os.environ.get("RAYFARM_ADMIN_TOKEN"), generate=False)
    start_dispatcher(settings)
    return build_app(settings)
