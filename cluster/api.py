"""The HTTP API (FastAPI): ``create_app`` puts the app together from its routers, one
per resource (``rayfarm.cluster.routes``: jobs, frames and outputs, blobs, scenes,
health; ``observe``, ``accounts`` and ``scheduling`` keep theirs beside their logic),
its middleware and its error handlers (``routes.handlers``).

Served by Ray Serve (``rayfarm.cluster.serve``, which gives the process its context
with ``set_process_context``) and usable as a plain ASGI app for tools and tests
(``create_app(AppContext.build(settings))``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import rayfarm
from rayfarm.cluster import accounts, observe, scheduling, web
from rayfarm.cluster.accounts import AuditMiddleware, CrossSiteGuard, LocalHostGuard
from rayfarm.cluster.context import AppContext, process_context, set_process_context
from rayfarm.cluster.routes import blobs, frames, health, jobs, scenes
from rayfarm.cluster.routes.handlers import install_handlers

__all__ = ["AppContext", "create_app", "set_process_context"]


def create_app(ctx: AppContext | None = None) -> FastAPI:
    """The FastAPI app. Pass a context now, or set ``app.state.ctx`` before serving."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = getattr(app.state, "ctx", None) or process_context()
        # Every replica runs the housekeeping loop; one sweeps at a time (a Redis lock).
        # Every replica sends job-end webhooks; each end goes to one (a consumer group).
        loops = []
        if ctx is not None:
            loops = [
                asyncio.create_task(ctx.sweeper.run()),
                asyncio.create_task(ctx.notifier.run()),
            ]
        yield
        for loop in loops:
            loop.cancel()
        ctx = getattr(app.state, "ctx", None) or process_context()
        if ctx is not None:
            await ctx.close()

    app = FastAPI(
        lifespan=lifespan,
        title="rayfarm",
        version=rayfarm.__version__,
        description="A render farm for Blender built on Ray.",
    )
    app.state.ctx = ctx
    app.include_router(jobs.router)
    app.include_router(frames.router)
    app.include_router(blobs.router)
    app.include_router(scenes.router)
    app.include_router(observe.router)
    app.include_router(accounts.router)
    app.include_router(scheduling.router)
    web.install(app)  # the web page at /, its files under /ui
    app.add_middleware(CrossSiteGuard)
    app.add_middleware(AuditMiddleware)  # it records what the cross-site guard refuses too
    # Outermost: on a farm without accounts, nothing (not even an audit record) for a
    # request a rebound DNS name made a browser send.
    app.add_middleware(LocalHostGuard)

    app.include_router(health.router)
    install_handlers(app)
    return app
