"""The gRPC ingress: ``SubmitJob``, ``CancelJob`` and ``StreamProgress`` over the same
job store, checks and event streams as the HTTP API.

Ray Serve's gRPC proxy registers the service with ``add_servicer_to_server`` (named by
import path in ``gRPCOptions``) and routes each call to the method of the same name on
the ``RayfarmAPI`` deployment, which hands it to the functions here.

The stubs are built, not committed: ``proto/rayfarm.proto`` is compiled with
``grpc_tools.protoc`` the first time a process needs it, into the user cache directory
under a name made of the proto's hash and the grpcio-tools version, so an edited proto
or a new protoc gets fresh stubs and every later process (proxy, replicas, tests)
imports the stored ones. The generated modules are top-level ``rayfarm_pb2`` and
``rayfarm_pb2_grpc`` (protoc names them after the file); importing this module makes
those two names importable. It must be so before any of our code runs in a replica:
Serve's proxy pickles each request message, and the replica unpickles it by its
module's name before it calls the method.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from importlib import metadata, resources
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import platformdirs

from rayfarm.cluster import faults, lifecycle
from rayfarm.cluster.auth import Principal
from rayfarm.cluster.context import (
    AppContext,
    authenticate,
    check_submitter,
    process_context,
    visible_job,
)
from rayfarm.cluster.events import EVENT_ID, follow
from rayfarm.cluster.submit import submit_listing
from rayfarm.errors import FarmError, FarmUnavailable, InvalidRequest
from rayfarm.models import JobRecord

__all__ = [
    "ERROR_CODE_KEY",
    "SERVICE",
    "SERVICER_FUNCTION",
    "add_servicer_to_server",
    "cancel_job",
    "generated_dir",
    "job_event",
    "job_reply",
    "pb2",
    "pb2_grpc",
    "peer_address",
    "status_code",
    "stream_progress",
    "submit_job",
]

#: The service's full name, as gRPC method paths and reflection spell it.
SERVICE = "rayfarm.v1.RayfarmService"
#: What ``gRPCOptions(grpc_servicer_functions=[...])`` takes.
SERVICER_FUNCTION = "rayfarm.cluster.grpc_ingress.add_servicer_to_server"
#: Trailing metadata key carrying the farm's stable error code (``invalid_spec``, ...).
ERROR_CODE_KEY = "rayfarm-error-code"

_PROTO_NAME = "rayfarm.proto"
_PB2, _PB2_GRPC = "rayfarm_pb2", "rayfarm_pb2_grpc"
_EVENT_ID = re.compile(EVENT_ID)
_build_lock = threading.Lock()

#: A FarmError's HTTP status as a gRPC status; anything else is INTERNAL.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


# --- the generated stubs ------------------------------------------------------------


def _cache_root() -> Path:
    root = Path(platformdirs.user_cache_dir("rayfarm", appauthor=False)) / "grpc"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    # A home without a writable cache (a locked-down service account): per-user temp.
    root = Path(tempfile.gettempdir()) / f"rayfarm-grpc-{os.getuid()}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def generated_dir() -> Path:
    """The folder holding ``rayfarm_pb2.py`` and ``rayfarm_pb2_grpc.py`` for this proto
    and this grpcio-tools, generating them first if no process has yet."""
    source = resources.files("rayfarm.cluster").joinpath("proto", _PROTO_NAME).read_bytes()
    tools = metadata.version("grpcio-tools")
    name = f"{hashlib.sha256(source).hexdigest()[:16]}-grpcio-tools-{tools}"
    root = _cache_root()
    target = root / name
    with _build_lock:
        if (target / f"{_PB2_GRPC}.py").exists():
            return target
        # Built aside and renamed into place: a proxy and replicas starting together
        # may all build; the first rename wins and nobody imports a half-written file.
        build = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            (build / _PROTO_NAME).write_bytes(source)
            _protoc(build)
            try:
                build.rename(target)
            except OSError:
                if not (target / f"{_PB2_GRPC}.py").exists():
                    raise
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return target


def _protoc(folder: Path) -> None:
    from grpc_tools import protoc  # only where stubs are built: it loads protoc itself

    includes = str(resources.files("grpc_tools").joinpath("_proto"))
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={folder}",
            f"--proto_path={includes}",
            f"--python_out={folder}",
            f"--grpc_python_out={folder}",
            str(folder / _PROTO_NAME),
        ]
    )
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed ({rc}) on {_PROTO_NAME}; see stderr")


class _StubFinder(importlib.abc.MetaPathFinder):
    """Resolves ``import rayfarm_pb2`` / ``rayfarm_pb2_grpc`` to the generated files."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in (_PB2, _PB2_GRPC):
            return None
        return importlib.util.spec_from_file_location(fullname, generated_dir() / f"{fullname}.py")


# Installed on import (and only once): see the module docstring for why it cannot wait.
if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _StubFinder())


def pb2() -> Any:
    """The generated messages module (``rayfarm_pb2``)."""
    return importlib.import_module(_PB2)


def pb2_grpc() -> Any:
    """The generated service module (``rayfarm_pb2_grpc``: stub, servicer, registration)."""
    return importlib.import_module(_PB2_GRPC)


def add_servicer_to_server(servicer: Any, server: Any) -> None:
    """Register the service on a gRPC server; Serve's proxy calls it with its own."""
    pb2_grpc().add_RayfarmServiceServicer_to_server(servicer, server)


# --- messages -----------------------------------------------------------------------


def job_reply(job: JobRecord) -> Any:
    """A job as a ``JobReply``."""
    return pb2().JobReply(
        id=job.id,
        state=job.state.value,
        frames_total=job.frames_total,
        frames_done=job.frames_done,
        tasks_total=job.tasks_total,
        tasks_done=job.tasks_done,
        tiles=job.tiles or "",
        error=job.error or "",
        job_json=job.model_dump_json(),
    )


def job_event(event: dict[str, Any]) -> Any:
    """A decoded event (``rayfarm.cluster.events.decode``) as a ``JobEvent``."""
    fields = {
        k: v if isinstance(v, str) else json.dumps(v)
        for k, v in event.items()
        if k not in ("id", "kind", "at")
    }
    return pb2().JobEvent(
        id=event["id"],
        kind=event.get("kind", ""),
        at=event.get("at", ""),
        fields=fields,
        json=json.dumps(event),
    )


def status_code(exc: FarmError) -> grpc.StatusCode:
    """The gRPC status a FarmError answers with (its HTTP status, translated)."""
    return _CODES.get(exc.status, grpc.StatusCode.INTERNAL)


def _refuse(grpc_context: Any, exc: FarmError) -> None:
    """Put the error on the call's context (Serve's ``RayServegRPCContext``): the proxy
    answers with this status, the farm's message as details and (unary calls only: Serve
    drops a failed stream's metadata) its code as trailing metadata."""
    grpc_context.set_code(status_code(exc))
    grpc_context.set_details(exc.message)
    grpc_context.set_trailing_metadata([(ERROR_CODE_KEY, exc.code)])


def _unexpected(what: str, exc: Exception) -> FarmError:
    """An unexpected failure, logged in full under a new request id: the caller is
    told the id alone (``rayfarm.cluster.faults``)."""
    rid = uuid.uuid4().hex
    faults.log_unexpected(what, rid, exc)
    return faults.internal_error(rid)


def _context() -> AppContext:
    ctx = process_context()
    if ctx is None:
        raise FarmUnavailable("the service is still starting")
    return ctx


async def _who(ctx: AppContext, grpc_context: Any) -> Principal:
    """The caller, by its ``authorization: Bearer <token>`` metadata, as over HTTP."""
    metadata = {k.lower(): v for k, v in (grpc_context.invocation_metadata() or [])}
    peer = getattr(grpc_context, "peer", lambda: "")() or ""
    return await authenticate(ctx, metadata.get("authorization"), peer_address(peer))


def peer_address(peer: str) -> str:
    """The client's address in a gRPC peer (``ipv4:10.0.0.9:51234``,
    ``ipv6:[::1]:51234``) without its port, so per-address limits count the client,
    not each of its connections."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer


# --- the calls ----------------------------------------------------------------------


async def submit_job(request: Any, grpc_context: Any) -> Any:
    """``SubmitJob``: what ``POST /jobs`` does with a JSON listing."""
    try:
        ctx = _context()
        who = check_submitter(await _who(ctx, grpc_context))
        job = await submit_listing(
            ctx,
            {
                "spec": request.spec_json,
                "main": request.main,
                "files": [
                    {"path": f.path, "sha256": f.sha256, "size": f.size} for f in request.files
                ],
            },
            who,
        )
    except FarmError as exc:
        # A unary call answers an error by status alone: Serve sends the code set on
        # the context with this empty reply, and raises nothing into the logs.
        _refuse(grpc_context, exc)
        return pb2().JobReply()
    except Exception as exc:  # Serve would send its text (a Ray traceback) as the details
        _refuse(grpc_context, _unexpected("gRPC SubmitJob", exc))
        return pb2().JobReply()
    return job_reply(job)


async def cancel_job(request: Any, grpc_context: Any) -> Any:
    """``CancelJob``: what ``POST /jobs/{id}/cancel`` does."""
    try:
        ctx = _context()
        job = await lifecycle.cancel_job(ctx, await _who(ctx, grpc_context), request.job_id)
    except FarmError as exc:
        _refuse(grpc_context, exc)
        return pb2().JobReply()
    except Exception as exc:
        _refuse(grpc_context, _unexpected("gRPC CancelJob", exc))
        return pb2().JobReply()
    return job_reply(job)


async def stream_progress(request: Any, grpc_context: Any) -> AsyncIterator[Any]:
    """``StreamProgress``: what ``GET /jobs/{id}/events`` sends, one ``JobEvent`` each;
    ends after the job's terminal state. Heartbeats are not sent (gRPC keeps the
    connection alive itself). Counts as one of the caller's open streams, as over HTTP
    (``RESOURCE_EXHAUSTED`` past ``RAYFARM_MAX_STREAMS_PER_USER``)."""
    try:
        ctx = _context()
        job_id = request.job_id
        after = request.after or None
        if after is not None and not _EVENT_ID.match(after):
            raise InvalidRequest(f"after {after!r} is not an event id (such as 1-0)")
        who = await _who(ctx, grpc_context)
        await visible_job(ctx, who, job_id)
        lease = await ctx.streams.take(who.name, f"the events of job {job_id}")
        try:
            async for event in follow(ctx.store, ctx.hub, job_id, after):
                if event is not None:
                    yield job_event(event)
        finally:
            # Released here, not by a wrapped generator: a cancelled call closes this
            # generator at its yield, and a wrapped one would wait for the collector.
            await asyncio.shield(lease.release())
    except FarmError as exc:
        # A stream's status travels only with a raised error (Serve sends the context of
        # each message, and there may be none): the code set here is the one it answers.
        _refuse(grpc_context, exc)
        raise
