"""What a failed request says to the actor (standard library only).

The actor turns ``kind`` back into the farm's own error class (``rayfarm.errors``:
``RenderError``, ``SceneOpenError``), with the message and detail as they are.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["FATAL", "RenderError", "SceneOpenError"]

#: Flag in an error's ``detail``: no retry can fix it (a scene bpy cannot open, a camera
#: the file lacks, ...); the dispatcher fails the job at once.
FATAL = "fatal"


class RenderError(Exception):
    """A task the worker could not do; ``detail`` is JSON-able."""

    kind: ClassVar[str] = "RenderError"

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message, detail)
        self.message = message
        self.detail = dict(detail or {})

    def __str__(self) -> str:
        return self.message


class SceneOpenError(RenderError):
    """bpy could not open the scene (or kept another file open)."""

    kind = "SceneOpenError"
