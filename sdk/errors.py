"""Typed errors shared by the farm service and the SDK.

One root, ``FarmError``. The service turns each class into one HTTP status and a
stable ``code`` in a single handler; the SDK turns the error body back into the
same class, so ``except rayfarm.JobNotFound`` works on both sides of the wire.

    FarmError
    ├── InvalidRequest        400  malformed request (missing part, bad JSON)
    │   └── UnsupportedMediaType   415  a body in a format the route does not take
    ├── InvalidSpec           422  the job spec breaks a rule (frames, tiles, ...)
    │   └── BlenderNotOffered      asks for a Blender version the farm does not offer
    ├── InvalidScene          422  the upload is not a readable .blend
    │   ├── SceneTooNew       422  saved by a newer Blender than every one the farm offers
    │   ├── SceneTooLarge     413  a compressed .blend expands past the farm's bounds
    │   └── MissingDependencies    files the scene uses are missing (before upload)
    ├── PayloadTooLarge       413  upload over the server's size limit
    ├── Unauthorized          401  no token, or not a valid one
    ├── Forbidden             403  the token's role may not do this
    ├── NotFound              404
    │   ├── JobNotFound
    │   ├── FrameNotFound
    │   └── SceneNotFound
    ├── InvalidTransition     409  a state change the job model refuses
    ├── TooManyRequests       429  over a limit: a rate (``detail["retry_after_s"]`` says when
    │                              to ask again) or what one may hold at once (open streams)
    ├── RenderError           ---  a task failed on a render actor
    │   ├── SceneOpenError    ---  bpy could not open the scene
    │   └── WorkerLost        ---  the Blender worker process died or was stopped
    ├── BlenderUnavailable    503  a Blender environment cannot be found or built here
    ├── FarmUnavailable       503  the farm (or its Redis) cannot be reached
    └── ServerError           500  anything else the server reports

Every constructor passes all of its arguments to ``super().__init__`` so the
errors pickle cleanly across Ray actor boundaries. Standard library only: the Blender
add-on carries this module with the packer (``rayfarm.pack``).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BlenderNotOffered",
    "BlenderUnavailable",
    "FarmError",
    "FarmUnavailable",
    "Forbidden",
    "FrameNotFound",
    "InvalidRequest",
    "InvalidScene",
    "InvalidSpec",
    "InvalidTransition",
    "JobNotFound",
    "MissingDependencies",
    "NotFound",
    "PayloadTooLarge",
    "RenderError",
    "SceneNotFound",
    "SceneOpenError",
    "SceneTooLarge",
    "SceneTooNew",
    "ServerError",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedMediaType",
    "WorkerLost",
    "error_from_body",
]


class FarmError(Exception):
    """Root of every rayfarm error.

    ``message`` is for people; ``detail`` is a JSON-able dict for programs
    (the offending field, the job id, the versions involved, ...).
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "farm_error"

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message, detail)
        self.message = message
        self.detail: dict[str, Any] = dict(detail or {})

    def __str__(self) -> str:
        return self.message

    def to_body(self) -> dict[str, Any]:
        """The JSON body the service answers with."""
        return {"error": {"code": self.code, "message": self.message, "detail": self.detail}}


class InvalidRequest(FarmError):
    status = 400
    code = "invalid_request"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class InvalidSpec(FarmError):
    status = 422
    code = "invalid_spec"


class BlenderNotOffered(InvalidSpec):
    """``JobSpec.blender`` names a version the farm does not offer (``detail["offered"]``)."""

    code = "blender_not_offered"


class InvalidScene(FarmError):
    status = 422
    code = "invalid_scene"


class SceneTooNew(InvalidScene):
    code = "scene_too_new"


class SceneTooLarge(InvalidScene):
    """A compressed .blend expands past what the farm reads (a zstd "bomb", or a scene
    beyond its ``RAYFARM_MAX_BLEND_*`` bounds); ``detail`` names the limit."""

    status = 413
    code = "scene_too_large"


class MissingDependencies(InvalidScene):
    """Files the scene uses are missing on the submitting machine (raised before upload)."""

    code = "missing_dependencies"


class PayloadTooLarge(FarmError):
    status = 413
    code = "payload_too_large"


class Unauthorized(FarmError):
    status = 401
    code = "unauthorized"


class Forbidden(FarmError):
    status = 403
    code = "forbidden"


class NotFound(FarmError):
    status = 404
    code = "not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class FrameNotFound(NotFound):
    code = "frame_not_found"


class SceneNotFound(NotFound):
    code = "scene_not_found"


class InvalidTransition(FarmError):
    status = 409
    code = "invalid_transition"


class TooManyRequests(FarmError):
    """Over one of the farm's limits: a rate limit (failed sign-ins from one address,
    submissions of one user), where ``detail["retry_after_s"]`` (also the
    ``Retry-After`` header) says how many seconds to wait before the next attempt can
    succeed; or a limit on what a user or an address may hold at once (open event
    streams, ...), where ``detail`` names the limit: close something, or wait."""

    status = 429
    code = "too_many_requests"

    @property
    def retry_after_s(self) -> int | None:
        value = self.detail.get("retry_after_s")
        return value if isinstance(value, int) else None


class RenderError(FarmError):
    code = "render_error"


class SceneOpenError(RenderError):
    code = "scene_open_error"


class WorkerLost(RenderError):
    """The Blender worker process running a task exited (a crash, or stopped by the farm:
    a cancel, a hang); its render actor lives on and starts a new one."""

    code = "worker_lost"


class BlenderUnavailable(FarmError):
    """A Blender environment is missing and cannot be built on this machine (no CPython
    for its bpy, or the package index has no such bpy); the message says what to do."""

    status = 503
    code = "blender_unavailable"


class FarmUnavailable(FarmError):
    status = 503
    code = "farm_unavailable"


class ServerError(FarmError):
    status = 500
    code = "server_error"


def _subclasses(cls: type[FarmError]) -> list[type[FarmError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


_BY_CODE: dict[str, type[FarmError]] = {c.code: c for c in _subclasses(FarmError)}


def error_from_body(status: int, body: Any) -> FarmError:
    """Rebuild the typed error from a service error body (``{"error": {...}}``)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return ServerError(f"HTTP {status}: {str(body)[:500]}", {"status": status})
    cls = _BY_CODE.get(str(err.get("code")), ServerError)
    detail = err.get("detail") if isinstance(err.get("detail"), dict) else {}
    return cls(str(err.get("message", f"HTTP {status}")), detail)
