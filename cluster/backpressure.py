"""Request bodies handed to the app as it reads them, under Ray Serve's fast ingress.

A replica that answers HTTP itself (HAProxy in front, ``rayfarm up``'s default) wraps
each request's ``receive`` in Serve's ``ASGIDIReceiveProxy``, which reads the body as
fast as the client sends it into an unbounded queue, to notice a client that leaves.
The app reading the body slowly (an upload parsed and spooled, refused at its limit)
then does not slow the client down: a 2.36 GB chunked upload grew one replica by
1.7 GB before the app got to its size check, and a refused one had already cost it all.

``bound_receive_queues`` swaps in a subclass whose queue holds at most
``RECEIVE_QUEUE_MESSAGES`` messages (a few MB: uvicorn hands over at most 256 KiB per
message): past that the proxy waits for the app, uvicorn stops reading the socket, and
TCP makes the client wait. A request without a body is one message, so a client that
leaves is still noticed at once where the app reads nothing (event streams, long-polls);
one that leaves mid-upload is noticed when the app reaches the end of what was queued.

Serve's own Python proxy (no HAProxy, or the fallback while replicas start) queues the
body in the proxy actor instead, out of a replica's reach; there the upload limit, met
while reading, is what bounds it (docs/operations.md, "Configuration": RAYFARM_FAST_INGRESS).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["RECEIVE_QUEUE_MESSAGES", "bound_receive_queues"]

log = logging.getLogger("rayfarm.api")

#: Body messages Serve may hold for a request ahead of the app (each at most 256 KiB).
RECEIVE_QUEUE_MESSAGES = 16


def bound_receive_queues(max_messages: int = RECEIVE_QUEUE_MESSAGES) -> bool:
    """Make this process's Serve replica queue at most ``max_messages`` of a request's
    body ahead of the app (direct ingress). Call it in the replica (the deployment's
    ``__init__``); idempotent. False, logged, where this Ray's Serve is not built as
    expected (the replica then works as Serve made it, with unbounded queues)."""
    try:
        from ray.serve._private import replica
        from ray.serve._private.direct_ingress_http_util import ASGIDIReceiveProxy
    except ImportError:
        log.warning("Ray Serve has no direct-ingress receive proxy: request bodies unbounded")
        return False
    if getattr(replica.ASGIDIReceiveProxy, "max_messages", None) == max_messages:
        return True
    if not _is_as_expected(ASGIDIReceiveProxy):
        log.warning("Ray Serve's receive proxy changed: request bodies unbounded")
        return False
    replica.ASGIDIReceiveProxy = _bounded(ASGIDIReceiveProxy, max_messages)  # type: ignore[misc]
    return True


def _is_as_expected(proxy: Any) -> bool:
    """Whether Serve's proxy keeps what the subclass relies on (Ray 2.60's layout)."""
    if not callable(getattr(proxy, "_fetch_until_disconnect", None)):
        return False
    try:
        made = proxy({"type": "http"}, None, None)
    except TypeError:
        return False
    return {"_queue", "_receive", "_user_event_loop", "_disconnect_message"} <= set(vars(made))


def _bounded(base: Any, max_messages: int) -> Any:
    class BoundedReceiveProxy(base):
        """Serve's direct-ingress receive proxy with a bounded queue (see the module)."""

        _queue: asyncio.Queue[Any] | None
        max_messages: int

        @property
        def queue(self) -> asyncio.Queue[Any]:
            if self._queue is None:
                self._queue = asyncio.Queue(max_messages)
            return self._queue

        async def _fetch_until_disconnect(self) -> Any:
            while True:
                msg = await self._receive()
                if asyncio.get_running_loop() is self._user_event_loop:
                    await self.queue.put(msg)  # waits while the app is behind
                else:  # the app runs on a loop of its own, in another thread
                    put = asyncio.run_coroutine_threadsafe(
                        self.queue.put(msg), self._user_event_loop
                    )
                    await asyncio.wrap_future(put)
                if msg["type"] == "http.disconnect":
                    self._disconnect_message = msg
                    return None
                if msg["type"] == "websocket.disconnect":
                    self._disconnect_message = msg
                    return msg["code"]

    BoundedReceiveProxy.max_messages = max_messages
    return BoundedReceiveProxy
