"""The farm's request for render nodes: the dispatcher's demand (``rayfarm.cluster.demand``)
passed to Ray's autoscaler with ``ray.autoscaler.sdk.request_resources``.

- On only with ``max_render_nodes`` (``RAYFARM_MAX_RENDER_NODES``) above 0. Off, the farm
  never calls the autoscaler and renders on the nodes the cluster has, as before.
- Every dispatcher round computes the request anew from the queue: it rises as work is
  queued, falls as it drains, and an empty queue asks for nothing (or for
  ``min_render_nodes``), so Ray's ``idle_timeout_minutes`` can remove the nodes once
  the pool has released their actors (``Pool.release``). The request is one render
  slot per bundle, shaped as a GPU render actor asks (``{"GPU": gpu_share}``), never
  more than ``max_render_nodes`` nodes' worth.
- ``request_resources`` keeps one standing request per cluster: the last call wins,
  whoever makes it. The request is sent when it changes, and again every
  ``REQUEST_REFRESH_S`` (so one overwritten by another caller, or lost with the GCS,
  comes back); a dispatcher that starts sends its own at once, replacing whatever an
  earlier one left, and ``rayfarm up`` withdraws it when it stops (``withdraw``).
- Every call is recorded (``requests``): what the farm asked for is observable, and
  the tests assert on it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import ray

from rayfarm.cluster.demand import Limits, PoolDemand, Request, request
from rayfarm.cluster.settings import Settings

__all__ = ["REQUEST_REFRESH_S", "Scaler", "withdraw"]

log = logging.getLogger(__name__)

#: Seconds after which an unchanged request is sent again.
REQUEST_REFRESH_S = 60.0
#: Calls to ``request_resources`` remembered (``Scaler.requests``).
REQUESTS_KEPT = 1000


def _request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


class Scaler:
    """The request for render nodes, and what the farm knows of its size. ``send``
    passes a request to the cluster (``request_resources``; another callable where the
    scaler's arithmetic is tested without a cluster)."""

    def __init__(
        self,
        settings: Settings,
        send: Callable[[list[dict[str, float]]], None] = _request_resources,
    ) -> None:
        self.settings = settings
        self._send_to_cluster = send
        self.enabled = settings.autoscaling
        self.limits = Limits(
            max_nodes=settings.max_render_nodes,
            min_nodes=settings.min_render_nodes,
            pool_max_nodes=settings.pool_max_nodes,
            slots_per_node=settings.slots_per_node,
        )
        self.pools: dict[str, PoolDemand] = {}
        # Before the first round: the minimum (warm nodes), so a dispatcher that starts
        # keeps min_render_nodes' actors.
        self.asked: Request = request({}, self.limits) if self.enabled else Request(0, 0, {})
        self.nodes_up = 0
        self.slots_up = 0
        self._sent: list[dict[str, float]] | None = None  # the last request sent (None: none)
        self._sent_at = float("-inf")
        #: Every call made: ``{"at": unix time, "bundles": [...]}``, oldest first.
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUESTS_KEPT)

    @property
    def want(self) -> int | None:
        """Render actors the pool should hold at most: the slots asked for on an
        autoscaled farm, None (every slot the cluster has) otherwise."""
        return self.asked.slots if self.enabled else None

    def update(self, pools: Mapping[str, PoolDemand], slots_up: int, nodes_up: int) -> None:
        """The farm's work by pool is ``pools``, the cluster holds ``slots_up`` render
        slots on ``nodes_up`` render nodes: ask for what the work wants (autoscaling on)."""
        self.pools, self.slots_up, self.nodes_up = dict(pools), slots_up, nodes_up
        if not self.enabled:
            return
        self.asked = request(pools, self.limits)
        share = self.settings.gpu_share
        bundles = [{"GPU": int(share) if share == int(share) else share}] * self.asked.slots
        if bundles != self._sent or time.monotonic() - self._sent_at >= REQUEST_REFRESH_S:
            self._send(bundles)

    def _send(self, bundles: list[dict[str, float]]) -> None:
        try:
            self._send_to_cluster(bundles)
        except Exception as exc:  # the GCS busy or restarting: the jobs are admitted anyway
            log.warning("could not ask the cluster for render nodes (tried again): %s", exc)
            return
        self._sent, self._sent_at = bundles, time.monotonic()
        self.requests.append({"at": time.time(), "bundles": bundles})

    def render_nodes(self) -> int:
        """Render nodes up now: live nodes with a GPU (the head has none)."""
        return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)

    def waiting_reason(self) -> str | None:
        """Why a job that may start waits while the farm grows, or None (it does not)."""
        if not self.enabled or self.asked.nodes <= self.nodes_up:
            return None
        return (f"waiting for render nodes: {self.nodes_up} of {self.asked.nodes} up, "
                "scaling up")  # fmt: skip

    def status(self) -> dict[str, Any]:
        """The farm's size and demand, as ``/farm`` and ``/metrics`` show them."""
        return {
            "autoscaling": self.enabled,
            "min_nodes": self.settings.min_render_nodes,
            "max_nodes": self.settings.max_render_nodes,
            "nodes_up": self.nodes_up,
            "nodes_requested": self.asked.nodes,
            "slots_up": self.slots_up,
            "slots_requested": self.asked.slots,
            "requests_made": len(self.requests),
            "pools": {name: self._pool(name, p) for name, p in sorted(self.pools.items())},
        }

    def _pool(self, name: str, pool: PoolDemand) -> dict[str, int]:
        wanted = self.asked.wanted.get(name, pool.slots)
        return {"queued": pool.queued, "running": pool.running, "wanted": wanted}


def withdraw(settings: Settings) -> None:
    """Withdraw the farm's standing request (the farm stops: its nodes may go). A
    cluster that no longer answers is only logged: the farm stops all the same."""
    if not settings.autoscaling:
        return
    try:
        _request_resources([])
    except Exception as exc:
        log.warning("could not withdraw the farm's request for render nodes: %s", exc)
