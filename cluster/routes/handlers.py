"""How the app answers an error: every ``FarmError`` as its one status and stable
``code`` (the SDK turns that body back into the same class), a request FastAPI could
not validate as 400 ``invalid_request``, Starlette's own 404/405 in the same shape, and
anything unexpected as 500 with a request id alone (503 when Redis is away): the detail
goes to the log under that id."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayfarm.cluster import faults
from rayfarm.errors import FarmError, FarmUnavailable, InvalidRequest, TooManyRequests

__all__ = ["install_handlers"]

log = logging.getLogger("rayfarm.api")


def install_handlers(app: FastAPI) -> None:
    """Answer errors as the module's docstring says."""

    @app.exception_handler(FarmError)
    async def farm_error(request: Request, exc: FarmError) -> JSONResponse:
        if exc.status >= 500:
            rid, new = faults.request_id(request.headers)
            cause = f" ({exc.__cause__!r})" if exc.__cause__ is not None else ""
            log.error("%s %s (request %s): %s%s", request.method, request.url.path, rid, exc,
                      cause)  # fmt: skip
            faults.with_request_id(exc, rid)
            headers = {faults.REQUEST_ID_HEADER: rid} if new else None
            return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)
        headers = None
        if isinstance(exc, TooManyRequests) and exc.retry_after_s is not None:
            headers = {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        err = InvalidRequest("invalid request: " + "; ".join(problems), {"errors": problems})
        return JSONResponse(err.to_body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = {"error": {"code": code, "message": str(exc.detail), "detail": {}}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The detail (exception, traceback, server paths) is for the log, under the
        # request's id; the client gets the id alone.
        rid, new = faults.request_id(request.headers)
        faults.log_unexpected(f"{request.method} {request.url.path}", rid, exc)
        if _is_redis_down(exc):
            err: FarmError = FarmUnavailable("the job store is unreachable", {"request_id": rid})
        else:
            err = faults.internal_error(rid)
        headers = {faults.REQUEST_ID_HEADER: rid} if new else None
        return JSONResponse(err.to_body(), status_code=err.status, headers=headers)


def _is_redis_down(exc: Exception) -> bool:
    import redis.exceptions

    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)
