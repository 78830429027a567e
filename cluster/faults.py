"""Unexpected errors, as the client sees them: a generic 500 that names a request id,
and nothing else. What went wrong (the exception, its traceback, server paths, a Ray
worker's pid and address) goes to the server's log under that id, never to the client.

The id is Ray Serve's own where the app runs under Serve (the ``x-request-id`` it puts
on every request and sends back on every response), so the farm's logs and Serve's
agree; else (the app served some other way, the tests' client) a new one, which the
response then carries itself.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping

from rayfarm.errors import FarmError, ServerError

__all__ = [
    "REQUEST_ID_HEADER",
    "internal_error",
    "log_unexpected",
    "request_id",
    "with_request_id",
]

log = logging.getLogger("rayfarm.api")

#: The header that carries a request's id (Ray Serve's name for it).
REQUEST_ID_HEADER = "x-request-id"
#: An id as Serve makes them (a UUID), or a caller's own of the same tame shape; any
#: other value is replaced, so no client text reaches the log or the body as an id.
_TAME_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id(headers: Mapping[str, str]) -> tuple[str, bool]:
    """This request's id, and whether it is new here: a new id is not on the response
    yet (Serve adds its own to every response), so the caller must add it."""
    given = headers.get(REQUEST_ID_HEADER)
    if given is not None and _TAME_ID.match(given):
        return given, False
    return uuid.uuid4().hex, True


def internal_error(request_id: str) -> ServerError:
    """The error a client gets for a failure it did not cause: the request id only."""
    return ServerError(
        f"internal error: the farm logged what went wrong as request {request_id}; "
        "quote that id to the farm's admin",
        {"request_id": request_id},
    )


def log_unexpected(what: str, request_id: str, exc: BaseException) -> None:
    """Log an unexpected failure of ``what`` (``POST /jobs``, ``gRPC SubmitJob``) in full,
    under its request id."""
    log.error("%s failed (request %s)", what, request_id, exc_info=exc)


def with_request_id(err: FarmError, request_id: str) -> FarmError:
    """``err`` (a server-side failure: 5xx) with the request id in its detail."""
    err.detail.setdefault("request_id", request_id)
    return err
