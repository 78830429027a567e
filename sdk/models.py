"""The job model: the single source of truth shared by the service and the SDK.

``JobState`` and ``TRANSITIONS`` define what may happen to a job; the Redis
store applies exactly this table atomically and the API answers anything else
with 409. ``JobSpec`` is what a user asks for; ``JobRecord`` is what the farm knows.
Nothing here talks to a farm: the SDK's ``Job`` (``rayfarm.job``) is a ``JobRecord``
with methods bound to the ``Farm`` that returned it (still importable from here).
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rayfarm.errors import InvalidSpec, InvalidTransition
from rayfarm.frames import parse_frames, preview_order

if TYPE_CHECKING:
    from rayfarm.job import Job as Job

__all__ = [
    "TRANSITIONS",
    "FrameInfo",
    "Job",
    "JobRecord",
    "JobSpec",
    "JobState",
    "JobStatus",
    "PostSpec",
    "VideoSpec",
    "check_transition",
    "grid_of",
    "parse_spec",
    "sources_of",
]


class JobState(StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        """No work will happen without a user's action (retry)."""
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


#: Every allowed state change. Anything else is refused (HTTP 409).
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # PENDING -> FAILED: a job whose dependency failed fails without running.
    JobState.PENDING: frozenset({JobState.PROCESSING, JobState.FAILED, JobState.CANCELLED}),
    JobState.PROCESSING: frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset({JobState.PENDING}),
    JobState.CANCELLED: frozenset(),
}


def sources_of(target: JobState) -> frozenset[JobState]:
    """The states from which ``target`` may be reached."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


def check_transition(job_id: str, current: JobState, target: JobState) -> None:
    """Raise ``InvalidTransition`` unless ``current -> target`` is in the table."""
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none"
        raise InvalidTransition(
            f"job {job_id} is {current}; it cannot become {target} (allowed from {current}: "
            f"{allowed})",
            {"job_id": job_id, "state": str(current), "target": str(target)},
        )


_TILES = re.compile(r"^(\d+)x(\d+)$")
MAX_TILES_PER_AXIS = 16
#: Most sample slices a frame may be split into.
MAX_SLICES = 64
#: A job id, as the farm makes them.
JOB_ID = re.compile(r"^[0-9a-f]{16}$")
#: Most jobs one job may wait for (``depends_on``).
MAX_DEPENDENCIES = 64
#: Longest webhook URL.
MAX_URL_CHARS = 2048


def check_webhook_url(url: Any) -> str | None:
    """``url`` if it can be a webhook (None stays None): http or https, a host, no user
    or password in it; ``ValueError`` saying why not."""
    if url is None:
        return None
    if not isinstance(url, str) or not url.strip():
        raise ValueError("a webhook is an http(s) URL")
    url = url.strip()
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"a webhook URL has at most {MAX_URL_CHARS} characters")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        raise ValueError(f"{url!r} has a port that is not a number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("a webhook URL may not hold a user name or password")
    return url


def grid_of(tiles: str) -> tuple[int, int]:
    """'NxM' (or '1') as (N, M)."""
    if tiles == "1":
        return (1, 1)
    nx, ny = tiles.split("x")
    return (int(nx), int(ny))


#: Validation context for what a farm sent back: fields of a newer farm's specs that
#: this SDK does not know are dropped there, not refused (``Job.model_validate(data,
#: context=FROM_FARM)``), so an older SDK keeps working against an upgraded farm.
FROM_FARM = {"from_farm": True}


class _Spec(BaseModel):
    """A spec the user writes: an unknown field is refused (a typo must not pass for a
    setting), except in what a farm sends back (validated with ``FROM_FARM``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and info.context and info.context.get("from_farm"):
            return {k: v for k, v in data.items() if k in cls.model_fields}
        return data


class VideoSpec(_Spec):
    """Encode the finished frames to an MP4 (``outputs/video.mp4``) with FFmpeg."""

    fps: float = Field(24, gt=0, le=240, description="Frames per second of the video.")
    codec: Literal["h264", "h265", "av1"] = Field("h264", description="Video codec.")
    trim: tuple[int, int] | None = Field(
        None, description="[first, last] frame numbers to include (both included)."
    )

    @field_validator("trim")
    @classmethod
    def _trim(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"trim [{v[0]}, {v[1]}] ends before it starts")
        return v


class PostSpec(_Spec):
    """What happens after the last frame is stored, as the job's final step."""

    video: VideoSpec | None = None


class JobSpec(_Spec):
    """What to render. Unknown fields are refused (but in what a farm sends back).

    >>> JobSpec(frames="1-8", tiles="2x2", samples=64).tile_grid
    (2, 2)
    >>> JobSpec(frames="1", slices=4, samples=1024).slice_count
    4
    """

    frames: str = Field(description="Frame spec: '1-8', '1,3,5-7', '1-20x5'.")
    scene: str | None = Field(None, description="Scene name; the file's active scene if unset.")
    camera: str | None = Field(None, description="Camera object; the scene's camera if unset.")
    tiles: int | str = Field(
        1,
        description="1 (whole frames), 'NxM' tiles per frame, or 'auto': the farm splits "
        "frames when a job has fewer frames than render actors, into tiles large enough "
        "to pay for themselves.",
    )
    slices: int | str = Field(
        1,
        description="1 (all of a frame's samples in one task), N: each frame's samples "
        "split into N subsets rendered as tasks of their own on any free render slot and "
        "merged exactly (denoised and composited once, as tiles are), or 'auto': the farm "
        "measures the scene and splits frames so that no task runs longer than its target "
        "(RAYFARM_SLICE_TARGET_S), never into more slices than its free slots can use. "
        "Combines with tiles (tiles x slices tasks per frame).",
    )
    samples: int | None = Field(None, ge=1, le=65536, description="Cycles samples override.")
    resolution_percentage: int | None = Field(None, ge=1, le=400)
    denoise: bool | None = Field(
        None,
        description="Override the scene's Cycles denoising (OpenImageDenoise). Tiled frames "
        "are denoised once, whole, so tiles leave no seams.",
    )
    format: Literal["png", "exr"] = Field(
        "png", description="png, or exr: multi-layer OpenEXR with every enabled pass."
    )
    color_depth: int | None = Field(
        None, description="png: 8 (default) or 16; exr: 16 (half) or 32 (float, default)."
    )
    allow_missing: bool = Field(
        False,
        description="Render even when files the scene uses are missing (they render as "
        "Blender's missing-texture pink); by default such a job is refused before upload "
        "and fails on the farm naming the files.",
    )
    priority: int = Field(50, ge=0, le=100, description="Higher renders first.")
    post: PostSpec | None = Field(
        None,
        description="Post-processing once every frame is stored, e.g. "
        "{'video': {'fps': 24, 'codec': 'h264', 'trim': [1, 100]}}.",
    )
    max_retries: int = Field(2, ge=0, le=10, description="Retries per task before the job fails.")
    scripts: bool = Field(
        False,
        description="Run the file's own Python (drivers with Python expressions, registered "
        "text blocks). Off for every job: a .blend is untrusted. Only an admin may turn it "
        "on, and that is audited; an actor that ran a job's scripts renders nothing else.",
    )
    blender: str | None = Field(
        None,
        pattern=r"^\d{1,2}\.\d{1,2}$",
        description="The Blender version to render with ('4.5'), one the farm offers. Unset: "
        "the version that saved the file, else the nearest newer one the farm offers.",
    )
    project: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$",
        description="The project the job belongs to: its members (viewers, artists) see it. "
        "An artist submits only to projects they are a member of.",
    )
    order: Literal["frames", "preview"] | None = Field(
        None,
        description="The order frames render in: 'frames' (the default: in frame order), or "
        "'preview': the first, last and middle frames first, then the middles of each half, "
        "halving the gaps, so the whole shot can be checked early.",
    )
    depends_on: tuple[str, ...] | None = Field(
        None,
        description="Ids of jobs this one waits for: it starts once every one of them is "
        "COMPLETED, and fails, naming it, if one fails or is cancelled.",
    )
    webhook: str | None = Field(
        None,
        description="An http(s) URL the farm calls (POST, signed JSON) when the job ends, "
        "besides the owner's own webhook. Kept apart from the job's spec on the farm: it is "
        "not shown back.",
    )

    @field_validator("frames", mode="before")
    @classmethod
    def _frames(cls, v: Any) -> str:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        try:
            parse_frames(v)
        except InvalidSpec as exc:
            raise ValueError(exc.message) from exc
        return str(v).replace(" ", "")

    @field_validator("depends_on")
    @classmethod
    def _depends_on(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if not v:
            return None
        for job_id in v:
            if not JOB_ID.match(job_id):
                raise ValueError(f"{job_id!r} is not a job id (16 lowercase hex digits)")
        if len(v) > MAX_DEPENDENCIES:
            raise ValueError(f"a job may wait for at most {MAX_DEPENDENCIES} jobs, not {len(v)}")
        return tuple(dict.fromkeys(v))  # each once, in the order given

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, v: str | None) -> str | None:
        return check_webhook_url(v)

    @field_validator("scene", "camera")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not (0 < len(v) <= 63):
            raise ValueError("must be 1 to 63 characters (Blender's name limit)")
        return v

    @field_validator("tiles", mode="before")
    @classmethod
    def _tiles(cls, v: Any) -> int | str:
        usage = "tiles must be 1, 'NxM' such as '2x2', or 'auto'"
        if isinstance(v, bool):
            raise ValueError(usage)
        if isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit()):
            if int(v) != 1:
                raise ValueError(usage)
            return 1
        if not isinstance(v, str):
            raise ValueError(usage)
        if v.strip().lower() == "auto":
            return "auto"
        m = _TILES.match(v.strip().lower())
        if m is None:
            raise ValueError(f"tiles {v!r}: {usage}")
        nx, ny = int(m[1]), int(m[2])
        if not (1 <= nx <= MAX_TILES_PER_AXIS and 1 <= ny <= MAX_TILES_PER_AXIS):
            raise ValueError(f"tiles per axis must be 1 to {MAX_TILES_PER_AXIS}")
        return 1 if (nx, ny) == (1, 1) else f"{nx}x{ny}"

    @field_validator("slices", mode="before")
    @classmethod
    def _slices(cls, v: Any) -> int | str:
        usage = f"slices must be a whole number from 1 to {MAX_SLICES}, or 'auto'"
        if isinstance(v, bool):
            raise ValueError(usage)
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if not isinstance(v, int) or not 1 <= v <= MAX_SLICES:
            raise ValueError(f"slices {v!r}: {usage}")
        return v

    @model_validator(mode="after")
    def _slices_and_samples(self) -> JobSpec:
        if isinstance(self.slices, int) and self.samples is not None and self.slices > self.samples:
            raise ValueError(
                f"slices {self.slices} is more than the {self.samples} samples of a frame "
                "(at most one slice per sample)"
            )
        return self

    @model_validator(mode="after")
    def _video(self) -> JobSpec:
        video = self.post.video if self.post else None
        if video is None:
            return self
        if self.format != "png":
            raise ValueError("post.video is encoded from PNG frames: use format 'png'")
        if video.trim is not None:
            first, last = video.trim
            if not any(first <= f <= last for f in parse_frames(self.frames)):
                raise ValueError(f"post.video.trim [{first}, {last}] holds none of the frames")
        return self

    @model_validator(mode="after")
    def _depth(self) -> JobSpec:
        allowed = {"png": (8, 16), "exr": (16, 32)}[self.format]
        if self.color_depth is not None and self.color_depth not in allowed:
            raise ValueError(
                f"color_depth {self.color_depth} is not valid for {self.format}: "
                f"use {' or '.join(map(str, allowed))}"
            )
        return self

    @property
    def frame_list(self) -> list[int]:
        return parse_frames(self.frames)

    @property
    def render_order(self) -> list[int]:
        """The frames in the order they render (``order``)."""
        frames = self.frame_list
        return preview_order(frames) if self.order == "preview" else frames

    @property
    def tile_grid(self) -> tuple[int, int] | None:
        """(columns, rows) of tiles per frame; None for 'auto' (the farm decides)."""
        if self.tiles == 1:
            return (1, 1)
        if self.tiles == "auto":
            return None
        return grid_of(str(self.tiles))

    @property
    def slice_count(self) -> int | None:
        """Sample slices per frame; None for 'auto' (the farm decides)."""
        return self.slices if isinstance(self.slices, int) else None

    @property
    def depth(self) -> int:
        """The color depth in effect (the format's default when unset)."""
        return self.color_depth or {"png": 8, "exr": 32}[self.format]

    @property
    def extension(self) -> str:
        return {"png": "png", "exr": "exr"}[self.format]


def parse_spec(data: Any) -> JobSpec:
    """Validate a spec (dict or JSON text); raise ``InvalidSpec`` naming each bad field."""
    try:
        if isinstance(data, str | bytes):
            return JobSpec.model_validate_json(data)
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "spec"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            problems.append(f"{where}: {msg}")
        raise InvalidSpec("invalid job spec: " + "; ".join(problems), {"errors": problems}) from exc


class JobStatus(BaseModel):
    """The compact view of a job that clients poll."""

    id: str
    state: JobState
    frames_done: int
    frames_total: int
    tasks_done: int
    tasks_total: int
    error: str | None = None
    detail: str | None = Field(None, description="Why the job waits now (as ``Job.detail``).")
    event: str | None = Field(
        None, description="Newest event id; pass it as `after` to long-poll for the next change."
    )


class FrameInfo(BaseModel):
    frame: int
    url: str
    size: int | None = None
    sha256: str | None = Field(None, description="Of the stored image; downloads check it.")


class JobRecord(BaseModel):
    """A job as the farm knows it: what the service stores and answers with, and the
    fields of the SDK's handles ``Job`` and ``AsyncJob`` (``rayfarm.job``)."""

    id: str
    state: JobState
    owner: str
    spec: JobSpec
    scene_file: str
    frames_total: int
    frames_done: int = 0
    tasks_total: int
    tasks_done: int = 0
    tiles: str | None = Field(
        None,
        description="The tiling in effect: '1' or 'NxM'; for tiles='auto', None until the "
        "farm has chosen.",
    )
    slices: int | None = Field(
        1,
        description="The sample slices per frame in effect; for slices='auto', None until "
        "the farm has chosen.",
    )
    error: str | None = None
    detail: str | None = Field(
        None,
        description="Why the job is waiting now, when something other than a free render "
        "slot holds it: a dependency ('blocked by ...') or a quota.",
    )
    urgent: bool = Field(False, description="Marked urgent by an admin: it renders first.")
    device: str | None = None
    saved_by: str | None = Field(None, description="The Blender version that saved the file.")
    rendered_by: str | None = Field(
        None, description="The Blender version the farm renders the job with."
    )
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


def __getattr__(name: str) -> Any:
    # ``Job`` lives with the client it talks through (rayfarm.job); it is still found
    # here, where it was defined before, without this module importing the client.
    if name == "Job":
        from rayfarm.job import Job

        return Job
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
