"""The Ray Serve application: the FastAPI app behind Serve's HTTP proxy.

The deployment builds its heavy state (Redis client, storage, dispatcher handle)
in ``__init__``; it reserves no CPU so the render actors get the cores.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import serve

from rayfarm.cluster.api import AppContext, create_app, set_process_context
from rayfarm.cluster.dispatcher import get_dispatcher
from rayfarm.cluster.settings import Settings

__all__ = ["APP_NAME", "RayfarmAPI", "build_app"]

APP_NAME = "rayfarm"
app = create_app()


class _Notifier:
    """Fire-and-forget nudges to the dispatcher; looks it up again after a restart."""

    def __init__(self) -> None:
        self._handle: Any = None

    def __call__(self) -> None:
        try:
            if self._handle is None:
                self._handle = get_dispatcher()
            self._handle.notify.remote()
        except (ValueError, ray.exceptions.RayError):
            self._handle = None
            raise


class _Inspector:
    """Asks the dispatcher's inspector actor to catalogue a scene folder."""

    def __init__(self) -> None:
        self._handle: Any = None

    async def __call__(self, inputs: Any) -> dict[str, Any]:
        if self._handle is None:
            self._handle = get_dispatcher()
        try:
            result: dict[str, Any] = await self._handle.inspect.remote(inputs)
            return result
        except ray.exceptions.RayActorError:
            self._handle = None
            raise


#: Serve logs every request at INFO by default; on a render node that costs CPU the
#: renders need (clients long-poll the status), so only warnings are logged.
LOGGING = {"log_level": "WARNING", "enable_access_log": False}


@serve.deployment(
    name="api",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1024,
    logging_config=LOGGING,
)
@serve.ingress(app)
class RayfarmAPI:
    def __init__(self, settings: dict[str, Any]) -> None:
        ctx = AppContext(Settings.from_dict(settings))
        ctx.notify = _Notifier()
        ctx.inspect = _Inspector()
        set_process_context(ctx)


def build_app(settings: Settings) -> serve.Application:
    deployment: Any = RayfarmAPI  # a serve.Deployment at run time; its stubs do not say so
    return deployment.bind(settings.to_dict())
