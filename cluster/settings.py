"""Service settings: constructor arguments first, then ``RAYFARM_*`` environment.

Read once, when the service starts (never at import time), and passed to the
Serve replicas and the dispatcher as a plain dict.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rayfarm.blendfile import MAX_EXPANDED_BYTES, MAX_EXPANSION_RATIO, MAX_READ_S, BlendLimits
from rayfarm.paths import default_data_dir
from rayfarm.render.environments import DEFAULT_VERSIONS, parse_versions

__all__ = ["Settings", "default_data_dir"]

#: Deepest a JSON body's arrays and objects may nest, by default (a job listing: 3).
MAX_JSON_DEPTH = 32
DISPATCHER_NAME = "dispatcher"
NAMESPACE = "rayfarm"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_seconds(name: str, default: float) -> float:
    value = (os.environ.get(name) or "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, not {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return seconds


def _env_switch(name: str, default: bool) -> bool:
    value = (os.environ.get(name) or "").strip().lower()
    if not value:
        return default
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{name} must be on or off, not {value!r}")


@dataclass(frozen=True)
class Settings:
    """Everything the service needs to run; see the README's configuration table."""

    redis_url: str = ""
    storage: str = ""
    data_dir: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    #: gRPC port of Serve's gRPC proxy (rayfarm.v1.RayfarmService); 0 serves no gRPC.
    #: Serve's gRPC proxy binds every interface: off (0) unless asked for.
    grpc_port: int = 0
    #: Render actors on a CPU-only farm (a GPU farm runs one per GPU).
    cpu_actors: int = 1
    #: Cycles threads per CPU actor; 0 splits the node's cores between its actors.
    actor_threads: int = 0
    #: API replicas; 0: two behind Serve's fast ingress (they use both cores of a small
    #: head; measured in bench/api.py), one behind Serve's proxy.
    api_replicas: int = 0
    #: GPUs per render actor: 1 (one actor per GPU), or a fraction to share a GPU.
    gpu_share: float = 1.0
    #: Failed tasks of one job after which the job avoids the node they failed on.
    node_failure_limit: int = 3
    #: Seconds a task may go without a sign of progress (a Cycles status line: scene sync,
    #: BVH, kernels, samples) before its render is taken as hung: its actor is killed and
    #: replaced, and the task retried like any failed one. Above the longest a scene of
    #: yours opens and syncs.
    hang_timeout_s: float = 900.0
    #: The render actor class, ``module:Class`` (the no-op one measures the farm itself).
    actor_class: str = "rayfarm.render.actor:RenderActor"
    max_upload_bytes: int = 2 * 1024**3
    max_job_bytes: int = 64 * 1024**3
    #: Tokens required (RAYFARM_AUTH=on); off only on loopback, when asked for.
    auth: bool = True
    #: Audit records kept (the oldest trimmed first, approximately).
    audit_maxlen: int = 1_000_000
    #: Most tasks (frames x tiles) one job may have: every task costs Redis ~1 KB.
    max_tasks: int = 100_000
    #: Events kept per job (its execution log), oldest trimmed first.
    events_maxlen: int = 100_000
    #: Most bytes a compressed .blend may expand to while it is checked (its blocks are
    #: walked to ENDB), and most per compressed byte (zstd "bombs"); past either, 413.
    max_blend_expanded_bytes: int = MAX_EXPANDED_BYTES
    max_blend_ratio: int = MAX_EXPANSION_RATIO
    #: Most seconds one compressed .blend's check may take (413 past it).
    max_blend_read_s: float = MAX_READ_S
    #: Deepest nesting of arrays and objects a JSON body may have (400 deeper).
    max_json_depth: int = MAX_JSON_DEPTH
    #: The Blender versions the farm offers, newest first (``RAYFARM_BLENDER=5.3,5.0``):
    #: each job renders with the one that saved its file, or the one it asks for, or the
    #: nearest newer one (``rayfarm.versions.route``).
    blender: tuple[str, ...] = DEFAULT_VERSIONS

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Build settings from ``overrides``, then ``RAYFARM_*`` / ``REDIS_URL``, then defaults."""
        data_dir = Path(
            overrides.pop("data_dir", None)
            or os.environ.get("RAYFARM_DATA_DIR")
            or default_data_dir()
        )
        values: dict[str, Any] = {
            "redis_url": os.environ.get("REDIS_URL", ""),
            "storage": os.environ.get("RAYFARM_STORAGE") or (data_dir / "storage").as_uri(),
            "data_dir": str(data_dir),
            "port": _env_int("RAYFARM_PORT", 8000),
            "grpc_port": _env_int("RAYFARM_GRPC_PORT", 0),
            "cpu_actors": _env_int("RAYFARM_CPU_ACTORS", 1),
            "actor_threads": _env_int("RAYFARM_ACTOR_THREADS", 0),
            "gpu_share": float(os.environ.get("RAYFARM_GPU_SHARE") or 1.0),
            "api_replicas": _env_int("RAYFARM_API_REPLICAS", 0),
            "node_failure_limit": _env_int("RAYFARM_NODE_FAILURE_LIMIT", 3),
            "hang_timeout_s": _env_seconds("RAYFARM_HANG_TIMEOUT_S", 900.0),
            "actor_class": os.environ.get("RAYFARM_ACTOR_CLASS")
            or "rayfarm.render.actor:RenderActor",
            "max_upload_bytes": _env_int("RAYFARM_MAX_UPLOAD_BYTES", 2 * 1024**3),
            "max_job_bytes": _env_int("RAYFARM_MAX_JOB_BYTES", 64 * 1024**3),
            "max_tasks": _env_int("RAYFARM_MAX_TASKS", 100_000),
            "auth": _env_switch("RAYFARM_AUTH", True),
            "audit_maxlen": _env_int("RAYFARM_AUDIT_MAXLEN", 1_000_000),
            "events_maxlen": _env_int("RAYFARM_EVENTS_MAXLEN", 100_000),
            "max_blend_expanded_bytes": _env_int(
                "RAYFARM_MAX_BLEND_EXPANDED_BYTES", MAX_EXPANDED_BYTES
            ),
            "max_blend_ratio": _env_int("RAYFARM_MAX_BLEND_RATIO", MAX_EXPANSION_RATIO),
            "max_blend_read_s": _env_seconds("RAYFARM_MAX_BLEND_READ_S", MAX_READ_S),
            "max_json_depth": _env_int("RAYFARM_MAX_JSON_DEPTH", MAX_JSON_DEPTH),
            "blender": parse_versions(os.environ.get("RAYFARM_BLENDER") or DEFAULT_VERSIONS),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["blender"] = parse_versions(values["blender"])
        return cls(**values)

    @property
    def blend_limits(self) -> BlendLimits:
        """How far the farm reads a compressed .blend while checking it."""
        return BlendLimits(
            self.max_blend_expanded_bytes, self.max_blend_ratio, self.max_blend_read_s
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if "blender" in values:
            values["blender"] = tuple(values["blender"])
        return cls(**values)
