"""Reading a request's body within the farm's limits: streamed and refused (413) the
moment it passes its limit, and JSON nested no deeper than ``max_json_depth`` (400)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request

from rayfarm.cluster.context import AppContext, process_context
from rayfarm.cluster.settings import MAX_JSON_DEPTH
from rayfarm.errors import InvalidRequest, PayloadTooLarge

__all__ = ["MAX_MANIFEST_BYTES", "limited", "parse_json", "read_json"]

#: Largest JSON body a request (a job's spec and file listing) may have.
MAX_MANIFEST_BYTES = 8 * 1024**2


async def limited(request: Request, limit: int, what: str) -> AsyncGenerator[bytes, None]:
    """The request body's chunks, refused (413) by its Content-Length when that says it
    is too big, else the moment it passes ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(
            f"{what} of {int(length)} bytes is over the farm's limit of {limit} bytes",
            {"limit": limit},
        )
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"{what} is over the farm's limit of {limit} bytes", {"limit": limit}
            )
        yield chunk


async def read_json(request: Request, what: str) -> Any:
    """The body as JSON, at most MAX_MANIFEST_BYTES, nested at most the farm's
    ``max_json_depth`` (400 when it is not JSON, or nested deeper)."""
    body = b"".join([c async for c in limited(request, MAX_MANIFEST_BYTES, what)])
    ctx: AppContext | None = getattr(request.app.state, "ctx", None) or process_context()
    return parse_json(body, ctx.settings.max_json_depth if ctx else MAX_JSON_DEPTH)


def parse_json(text: bytes | str, max_depth: int) -> Any:
    """``text`` as JSON whose arrays and objects nest at most ``max_depth`` deep;
    ``InvalidRequest`` (400) naming the limit when deeper, or when it is not JSON.

    Python's parser recurses once per level and gives up near 1 000 with a
    RecursionError, and whatever walks the value afterwards would recurse as deep."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except ValueError as exc:
        raise InvalidRequest(f"the body is not JSON: {exc}") from None
    # Depth cannot pass the number of brackets: most bodies are done here, at C speed.
    if isinstance(text, str):
        text = text.encode()
    if text.count(b"[") + text.count(b"{") > max_depth and _is_deeper(data, max_depth):
        raise _too_deep(max_depth)
    return data


def _is_deeper(data: Any, max_depth: int) -> bool:
    """Whether arrays and objects nest deeper than ``max_depth`` in ``data`` (without
    recursion)."""
    stack = [(data, 1)] if isinstance(data, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _too_deep(max_depth: int) -> InvalidRequest:
    return InvalidRequest(
        f"the body nests arrays and objects deeper than the farm's limit of {max_depth} "
        "levels (RAYFARM_MAX_JSON_DEPTH)",
        {"limit": max_depth},
    )
