"""Service settings: constructor arguments first, then ``RAYFARM_*`` environment.

Read once, when the service starts (never at import time), and passed to the
Serve replicas and the dispatcher as a plain dict.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from rayfarm.blendfile import MAX_EXPANDED_BYTES, MAX_EXPANSION_RATIO, MAX_READ_S, BlendLimits
from rayfarm.errors import FarmError
from rayfarm.paths import default_data_dir
from rayfarm.render.environments import DEFAULT_VERSIONS, parse_versions

__all__ = ["EdgeLimits", "Settings", "default_data_dir"]

#: Deepest a JSON body's arrays and objects may nest, by default (a job listing: 3).
MAX_JSON_DEPTH = 32
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


def _env_rate(name: str, default: float) -> float:
    """A positive rate (per minute)."""
    number = _env_number(name, default)
    if number <= 0:
        raise ValueError(f"{name} must be a positive number per minute, not {number}")
    return number


def _env_number(name: str, default: float) -> float:
    """A number that may be 0 (0 turns a limit off, or keeps things forever)."""
    value = (os.environ.get(name) or "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"{name} must be a number of at least 0, not {value!r}")
    return number


def _env_list(name: str) -> tuple[str, ...]:
    """A comma-separated list (empty when unset)."""
    return tuple(item.strip() for item in (os.environ.get(name) or "").split(",") if item.strip())


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
    """Everything the service needs to run; see the configuration table in docs/operations.md."""

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
    #: Seconds ``slices="auto"`` aims to keep every task of a sliced frame under: the farm
    #: measures the scene and splits each frame's samples into enough slices (never more
    #: than its free slots can run at once).
    slice_target_s: float = 300.0
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
    # -- retention and quotas (docs/security.md) --
    #: Days a finished job (COMPLETED, FAILED, CANCELLED) is kept after it finished, with
    #: its frames, outputs, logs and the blobs no other job uses; 0 keeps jobs forever.
    retention_days: float = 30.0
    #: Seconds between the farm's housekeeping sweeps (retention, unused uploads,
    #: storage measurement); one API replica sweeps at a time.
    sweep_interval_s: float = 600.0
    #: Bytes of blobs one user may have uploaded that no job of theirs uses yet
    #: (``PUT /blobs``; 413 past it); 0: no quota. Admins are not limited.
    upload_quota_bytes: int = 64 * 1024**3
    #: Seconds an uploaded blob no job uses is kept (and counted in its uploader's quota).
    upload_grace_s: float = 86_400.0
    # -- rate limits (docs/security.md) --
    #: Failed sign-ins one client address may make at once, then ``auth_failures_per_min``.
    auth_failure_burst: int = 20
    auth_failures_per_min: float = 10.0
    #: Audit records of refused anonymous requests per minute, farm-wide (the rest are
    #: counted into the next record and ``/metrics``).
    auth_audit_per_min: float = 60.0
    #: Jobs one user (not an admin) may submit at once, then ``submit_per_min``.
    submit_burst: int = 30
    submit_per_min: float = 60.0
    #: Highest priority an artist may give a job (admins: up to 100); at least 50, the
    #: priority every job gets by default.
    artist_max_priority: int = 50

    # -- notifications (docs/scheduling.md) --
    #: Hosts (names, addresses or networks such as 10.0.0.0/8) webhooks may call although
    #: they are not public: by default the farm calls public addresses only.
    webhook_allow_hosts: tuple[str, ...] = ()
    #: Tries of one webhook call before the farm gives up on it.
    webhook_attempts: int = 8
    #: Seconds before the first retry of a failed webhook call; each next one waits twice
    #: as long (at most an hour).
    webhook_backoff_s: float = 5.0
    #: Seconds one webhook call may take.
    webhook_timeout_s: float = 10.0

    # -- an elastic farm (docs/deploy.md#an-elastic-farm) --
    #: Most render nodes the farm asks the cluster's autoscaler for, as its queue grows;
    #: 0 asks for none: the farm renders on the nodes the cluster has (a fixed cluster,
    #: ``rayfarm up`` on one machine), as it always did.
    max_render_nodes: int = 0
    #: Render nodes asked for even when nothing waits (warm nodes); at most max_render_nodes.
    min_render_nodes: int = 0
    #: Most render nodes the work of one Blender version may ask for, ``VERSION=NODES``
    #: each (``RAYFARM_MAX_POOL_NODES=4.5=2``); a version not listed: max_render_nodes.
    max_pool_nodes: tuple[str, ...] = ()
    #: GPUs on one render node (the cluster's GPU worker type): how slots become nodes.
    render_node_gpus: int = 1
    #: Seconds an idle render actor of an autoscaled farm is kept before it is released
    #: (its GPU freed, so that its node can go idle and be removed).
    actor_idle_s: float = 30.0
    #: Seconds the scene inspector (the actor that catalogues new scenes with bpy) stays
    #: up with nothing to catalogue: an idle Ray actor still costs CPU (about 0.009 CPU-s
    #: a second), the renders' on a one-machine farm, and starting it again for the next
    #: new scene costs about 2 CPU-s beside that job's first task: 300 s is about where
    #: the two are even (bench/cpu.py, BENCHMARKS.md).
    inspector_idle_s: float = 300.0

    #: Event streams (SSE and gRPC) one user may hold open at once, farm-wide; 429 past it.
    max_streams_per_user: int = MAX_STREAMS_PER_USER
    #: The front door's connection limits (``EdgeLimits``, docs/security.md).
    max_connections: int = MAX_CONNECTIONS
    max_client_connections: int = MAX_CLIENT_CONNECTIONS
    header_timeout_s: float = HEADER_TIMEOUT_S
    client_timeout_s: float = CLIENT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 50 <= self.artist_max_priority <= 100:
            raise ValueError(
                "RAYFARM_ARTIST_MAX_PRIORITY must be between 50 (the priority every job gets "
                f"by default) and 100, not {self.artist_max_priority}"
            )
        for name in ("auth_failure_burst", "submit_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"RAYFARM_{name.upper()} must be at least 1")
        _ = self.edge  # checks the limits: a bad one fails here, not later in the proxy
        if self.max_streams_per_user < 1:
            raise ValueError("max_streams_per_user must be at least 1")
        if self.webhook_attempts < 1:
            raise ValueError("RAYFARM_WEBHOOK_ATTEMPTS must be at least 1")
        self._check_scaling()

    def _check_scaling(self) -> None:
        if self.max_render_nodes < 0 or self.min_render_nodes < 0:
            raise ValueError("RAYFARM_MAX_RENDER_NODES and RAYFARM_MIN_RENDER_NODES must be "
                             "at least 0")  # fmt: skip
        if self.min_render_nodes > self.max_render_nodes:
            raise ValueError(
                f"RAYFARM_MIN_RENDER_NODES ({self.min_render_nodes}) must be at most "
                f"RAYFARM_MAX_RENDER_NODES ({self.max_render_nodes}), which turns "
                "autoscaling on"
            )
        if self.render_node_gpus < 1:
            raise ValueError("RAYFARM_RENDER_NODE_GPUS must be at least 1")
        if not self.actor_idle_s > 0:
            raise ValueError("RAYFARM_ACTOR_IDLE_S must be a positive number of seconds")
        _ = self.pool_max_nodes  # a malformed entry fails here

    @property
    def autoscaling(self) -> bool:
        """Whether the farm asks the cluster for render nodes (``max_render_nodes``)."""
        return self.max_render_nodes > 0

    @property
    def slots_per_node(self) -> int:
        """Render actors one render node holds: its GPUs over ``gpu_share``."""
        return max(1, int(self.render_node_gpus / self.gpu_share + 1e-9))

    @property
    def pool_max_nodes(self) -> dict[str, int]:
        """``max_pool_nodes`` by Blender version (each one the farm offers)."""
        caps: dict[str, int] = {}
        for entry in self.max_pool_nodes:
            version, sep, count = entry.partition("=")
            if not sep or not count.strip().isdigit():
                raise ValueError(
                    f"RAYFARM_MAX_POOL_NODES: {entry!r} is not VERSION=NODES (such as 4.5=2)"
                )
            try:
                (name,) = parse_versions(version)
            except FarmError as exc:
                raise ValueError(f"RAYFARM_MAX_POOL_NODES: {exc}") from None
            if name not in self.blender:
                raise ValueError(
                    f"RAYFARM_MAX_POOL_NODES names Blender {name}, which the farm does not "
                    f"offer (it offers {', '.join(self.blender)})"
                )
            caps[name] = int(count)
        return caps

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
            "slice_target_s": _env_seconds("RAYFARM_SLICE_TARGET_S", 300.0),
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
            "retention_days": _env_number("RAYFARM_RETENTION_DAYS", 30.0),
            "sweep_interval_s": _env_seconds("RAYFARM_SWEEP_INTERVAL_S", 600.0),
            "upload_quota_bytes": _env_int("RAYFARM_UPLOAD_QUOTA_BYTES", 64 * 1024**3),
            "upload_grace_s": _env_seconds("RAYFARM_UPLOAD_GRACE_S", 86_400.0),
            "auth_failure_burst": _env_int("RAYFARM_AUTH_FAILURE_BURST", 20),
            "auth_failures_per_min": _env_rate("RAYFARM_AUTH_FAILURES_PER_MIN", 10.0),
            "auth_audit_per_min": _env_rate("RAYFARM_AUTH_AUDIT_PER_MIN", 60.0),
            "submit_burst": _env_int("RAYFARM_SUBMIT_BURST", 30),
            "submit_per_min": _env_rate("RAYFARM_SUBMIT_PER_MIN", 60.0),
            "artist_max_priority": _env_int("RAYFARM_ARTIST_MAX_PRIORITY", 50),
            "max_streams_per_user": _env_int("RAYFARM_MAX_STREAMS_PER_USER", MAX_STREAMS_PER_USER),
            "webhook_allow_hosts": _env_list("RAYFARM_WEBHOOK_ALLOW_HOSTS"),
            "webhook_attempts": _env_int("RAYFARM_WEBHOOK_ATTEMPTS", 8),
            "webhook_backoff_s": _env_seconds("RAYFARM_WEBHOOK_BACKOFF_S", 5.0),
            "webhook_timeout_s": _env_seconds("RAYFARM_WEBHOOK_TIMEOUT_S", 10.0),
            "max_render_nodes": _env_int("RAYFARM_MAX_RENDER_NODES", 0),
            "min_render_nodes": _env_int("RAYFARM_MIN_RENDER_NODES", 0),
            "max_pool_nodes": _env_list("RAYFARM_MAX_POOL_NODES"),
            "render_node_gpus": _env_int("RAYFARM_RENDER_NODE_GPUS", 1),
            "actor_idle_s": _env_seconds("RAYFARM_ACTOR_IDLE_S", 30.0),
            "inspector_idle_s": _env_seconds("RAYFARM_INSPECTOR_IDLE_S", 300.0),
            **asdict(EdgeLimits.from_env()),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["blender"] = parse_versions(values["blender"])
        for name in ("webhook_allow_hosts", "max_pool_nodes"):
            values[name] = tuple(values[name])
        return cls(**values)

    @property
    def blend_limits(self) -> BlendLimits:
        """How far the farm reads a compressed .blend while checking it."""
        return BlendLimits(
            self.max_blend_expanded_bytes, self.max_blend_ratio, self.max_blend_read_s
        )

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
        for name in ("blender", "webhook_allow_hosts", "max_pool_nodes"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)
