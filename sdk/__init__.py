"""rayfarm: a render farm for Blender built on Ray.

The SDK is this package's top level; ``pip install rayfarm`` brings it and the
``rayfarm`` CLI without Ray or bpy. The service lives in ``rayfarm.cluster``
(extra ``[cluster]``) and the render actors in ``rayfarm.render`` (extra
``[render]``).

>>> import rayfarm
>>> farm = rayfarm.Farm("http://127.0.0.1:8000")
>>> job = farm.submit("shot.blend", frames="1-8", tiles="2x2")  # doctest: +SKIP
>>> job.wait().state                                          # doctest: +SKIP
"""

from rayfarm.aio import AsyncFarm, AsyncJob
from rayfarm.client import Farm
from rayfarm.errors import (
    BlenderNotOffered,
    BlenderUnavailable,
    FarmError,
    FarmUnavailable,
    Forbidden,
    FrameNotFound,
    InvalidRequest,
    InvalidScene,
    InvalidSpec,
    InvalidTransition,
    JobNotFound,
    MissingDependencies,
    NotFound,
    PayloadTooLarge,
    RenderError,
    SceneOpenError,
    SceneTooLarge,
    SceneTooNew,
    ServerError,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
    WorkerLost,
)
from rayfarm.events import (
    Event,
    FramePreview,
    FrameStored,
    Progress,
    SceneWarning,
    StateChanged,
    TaskDone,
    TaskFailed,
    TaskQueued,
    TaskRetried,
    TaskStarted,
)
from rayfarm.frames import parse_frames
from rayfarm.job import Job
from rayfarm.models import TRANSITIONS, FrameInfo, JobRecord, JobSpec, JobState, JobStatus

__version__ = "0.1.0"

__all__ = [
    "TRANSITIONS",
    "AsyncFarm",
    "AsyncJob",
    "BlenderNotOffered",
    "BlenderUnavailable",
    "Event",
    "Farm",
    "FarmError",
    "FarmUnavailable",
    "Forbidden",
    "FrameInfo",
    "FrameNotFound",
    "FramePreview",
    "FrameStored",
    "InvalidRequest",
    "InvalidScene",
    "InvalidSpec",
    "InvalidTransition",
    "Job",
    "JobNotFound",
    "JobRecord",
    "JobSpec",
    "JobState",
    "JobStatus",
    "MissingDependencies",
    "NotFound",
    "PayloadTooLarge",
    "Progress",
    "RenderError",
    "SceneOpenError",
    "SceneTooLarge",
    "SceneTooNew",
    "SceneWarning",
    "ServerError",
    "StateChanged",
    "TaskDone",
    "TaskFailed",
    "TaskQueued",
    "TaskRetried",
    "TaskStarted",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedMediaType",
    "WorkerLost",
    "__version__",
    "parse_frames",
]
