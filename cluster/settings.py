"""Service settings: constructor arguments first, then ``RAYFARM_*`` environment.

Read once, when the service starts (never at import time), and passed to the
Serve replicas and the dispatcher as a plain dict.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from rayfarm.paths import default_data_dir

__all__ = ["EdgeLimits", "Settings", "default_data_dir", "farm_blender_version"]

DISPATCHER_NAME = "dispatcher"
NAMESPACE = "rayfarm"
#: Connections the farm's front door holds at once, from everyone (HAProxy's maxconn).
MAX_CONNECTIONS = 4096
#: Connections one client address (an IPv6 /64) may hold at once: well below
#: MAX_CONNECTIONS, well above a busy client (bench/load.py's storm opens 210).
MAX_CLIENT_CONNECTIONS = 256
#: Longest a client may take to send a request's line and headers (slowloris).
HEADER_TIMEOUT_S = 10.0
#: Longest a client may stay silent while it sends a request body, or not read while the
#: farm answers (event streams send a comment every 15 s, so they never idle this long).
CLIENT_TIMEOUT_S = 60.0
#: Event streams one user may hold open at once, farm-wide: a few per browser tab.
MAX_STREAMS_PER_USER = 64


def farm_blender_version() -> tuple[int, int]:
    """The Blender version the render actors run, read from bpy's package metadata.

    Reading metadata does not import bpy, so the service can check uploads
    against the workers' version without loading Blender.
    """
    override = os.environ.get("RAYFARM_BLENDER_VERSION")
    text = override or metadata.version("bpy")
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


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
class EdgeLimits:
    """What the farm's front door enforces on connections, before a request reaches the
    app: HAProxy (``rayfarm.cluster.haproxy``) or Serve's own proxy
    (``rayfarm.cluster.connections``). Those run in processes of their own, started by
    Ray: ``rayfarm up`` hands them the farm's values through the environment
    (``to_env``), and they read them back with ``from_env``."""

    max_connections: int = MAX_CONNECTIONS
    max_client_connections: int = MAX_CLIENT_CONNECTIONS
    header_timeout_s: float = HEADER_TIMEOUT_S
    client_timeout_s: float = CLIENT_TIMEOUT_S

    #: Field -> the environment variable it is read from.
    ENV: ClassVar[dict[str, str]] = {
        "max_connections": "RAYFARM_MAX_CONNECTIONS",
        "max_client_connections": "RAYFARM_MAX_CLIENT_CONNECTIONS",
        "header_timeout_s": "RAYFARM_HEADER_TIMEOUT_S",
        "client_timeout_s": "RAYFARM_CLIENT_TIMEOUT_S",
    }

    def __post_init__(self) -> None:
        if not 0 < self.max_client_connections <= self.max_connections:
            raise ValueError(
                f"max_client_connections ({self.max_client_connections}) must be at least 1 "
                f"and at most max_connections ({self.max_connections})"
            )
        if not (self.header_timeout_s > 0 and self.client_timeout_s > 0):
            raise ValueError("header_timeout_s and client_timeout_s must be positive")

    @classmethod
    def from_env(cls) -> EdgeLimits:
        """The limits ``RAYFARM_*`` set, each else its default."""
        return cls(
            max_connections=_env_int(cls.ENV["max_connections"], MAX_CONNECTIONS),
            max_client_connections=_env_int(
                cls.ENV["max_client_connections"], MAX_CLIENT_CONNECTIONS
            ),
            header_timeout_s=_env_seconds(cls.ENV["header_timeout_s"], HEADER_TIMEOUT_S),
            client_timeout_s=_env_seconds(cls.ENV["client_timeout_s"], CLIENT_TIMEOUT_S),
        )

    def to_env(self) -> dict[str, str]:
        """The environment that makes ``from_env`` give these limits."""
        return {name: str(getattr(self, field)) for field, name in self.ENV.items()}


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
    #: Event streams (SSE and gRPC) one user may hold open at once, farm-wide; 429 past it.
    max_streams_per_user: int = MAX_STREAMS_PER_USER
    #: The front door's connection limits (``EdgeLimits``, docs/security.md).
    max_connections: int = MAX_CONNECTIONS
    max_client_connections: int = MAX_CLIENT_CONNECTIONS
    header_timeout_s: float = HEADER_TIMEOUT_S
    client_timeout_s: float = CLIENT_TIMEOUT_S
    blender_version: tuple[int, int] = field(default_factory=farm_blender_version)

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
            "max_streams_per_user": _env_int("RAYFARM_MAX_STREAMS_PER_USER", MAX_STREAMS_PER_USER),
            **asdict(EdgeLimits.from_env()),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        _ = self.edge  # checks the limits: a bad one fails here, not later in the proxy
        if self.max_streams_per_user < 1:
            raise ValueError("max_streams_per_user must be at least 1")

    @property
    def edge(self) -> EdgeLimits:
        """The front door's limits among these settings."""
        return EdgeLimits(
            max_connections=self.max_connections,
            max_client_connections=self.max_client_connections,
            header_timeout_s=self.header_timeout_s,
            client_timeout_s=self.client_timeout_s,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if "blender_version" in values:
            values["blender_version"] = tuple(values["blender_version"])
        return cls(**values)
