"""The messages between a render actor and its Blender worker (standard library only).

They travel over a Unix socket pair of their own, never the worker's stdout or stderr:
Blender's C code writes to file descriptors 1 and 2, which the actor points at the
task log. Each message is one JSON object, framed by its length (4 bytes, big-endian).
Pixels and files never travel here: they pass through local files whose paths the
messages name.

Worker to actor, once it has loaded bpy and chosen its device::

    {"kind": "hello", "protocol": 1, "blender": "5.3.0", "python": "3.13.0",
     "pid": 1234, "device": "CPU"}

Actor to worker, one request at a time::

    {"op": "render" | "tile" | "finish" | "probe" | "catalogue" | "quit", "args": {...}}

Worker to actor, for each request: any number of ``{"kind": "stats", "line": ...}``
(Cycles' status lines while it renders), then exactly one of
``{"kind": "done", "value": ...}`` or
``{"kind": "error", "type": "RenderError" | "SceneOpenError", "message": ..., "detail": {...}}``.

``PROTOCOL`` changes whenever a message changes shape; the actor refuses a worker that
speaks another.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

__all__ = ["MAX_MESSAGE_BYTES", "PROTOCOL", "ProtocolError", "receive", "send"]

PROTOCOL = 1
#: No message comes near this (pixels travel in files); a longer length is a broken peer.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_LENGTH = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer closed the socket, or sent something that is not a message."""


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _read(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ProtocolError("the peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def receive(sock: socket.socket) -> dict[str, Any]:
    (length,) = _LENGTH.unpack(_read(sock, _LENGTH.size))
    if length > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a message of {length} bytes (the most is {MAX_MESSAGE_BYTES})")
    try:
        message = json.loads(_read(sock, length))
    except ValueError as exc:
        raise ProtocolError(f"not a JSON message: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message
