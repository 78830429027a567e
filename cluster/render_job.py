"""Render a scene as a plain Ray job, through the farm's own dispatcher:

    ray job submit --working-dir . -- \\
        python -m rayfarm.cluster.render_job shot.blend --frames 1-8 --tiles 2x2 \\
        --output s3://studio-renders/rayfarm

It packs the scene (as ``rayfarm submit`` does), puts its files in object storage,
queues the job with the same checks as ``POST /jobs``, prints its events as they
come, and exits 0 when the job COMPLETED, 1 when it FAILED or was CANCELLED, 2 for
bad input, 3 when the farm cannot run it. The outputs and the manifest land where
the service would put them (``{output}/jobs/{id}/...``).

With the farm's service running on the cluster (``rayfarm up --address auto`` or
``serve deploy``), the job goes to its dispatcher, so it shows in the API and the
web page like any other; ``--output`` must then be the farm's storage (or left
out). Without it, the job starts a dispatcher of its own for its lifetime, with
``REDIS_URL`` or a Redis of its own on the driver's node.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rayfarm.errors import FarmError, InvalidRequest

__all__ = ["main"]

EXIT_OK, EXIT_JOB_FAILED, EXIT_BAD_INPUT, EXIT_UNAVAILABLE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rayfarm.cluster.render_job",
        description="Render a .blend on the Ray cluster this runs on (for `ray job submit`).",
    )
    p.add_argument("scene", help="the .blend file (its textures and libraries are packed)")
    p.add_argument("--frames", required=True, help="e.g. 1-250, 1,3,5-7, 1-20x5")
    p.add_argument("--tiles", default="1", help="1, NxM or auto (default 1)")
    p.add_argument("--slices", default="1", help="sample slices per frame: 1, N or auto")
    p.add_argument("--output", help="storage URL (s3://bucket/prefix or file://...)")
    p.add_argument("--samples", type=int)
    p.add_argument("--resolution", type=int, dest="resolution_percentage", metavar="PERCENT")
    p.add_argument("--format", choices=["png", "exr"])
    p.add_argument("--scene-name", dest="scene_name")
    p.add_argument("--camera")
    p.add_argument("--priority", type=int)
    p.add_argument("--max-retries", type=int)
    p.add_argument("--allow-missing", action="store_true", default=None)
    p.add_argument(
        "--blender",
        help="the Blender version to render with (default: the "
        "one that saved the file, else the nearest newer one offered)",
    )
    p.add_argument("--project", help="the folder whose layout the farm reproduces")
    p.add_argument(
        "--address",
        default=None,
        help="Ray address (default: the cluster `ray job submit` runs this on; 'local' "
        "starts a Ray of its own on this machine)",
    )
    p.add_argument("--quiet", action="store_true", help="print no events, only the outcome")
    return p


def _owner() -> Any:
    """Who a job queued from a Ray job belongs to: ``RAYFARM_OWNER``, else the user the
    driver runs as. A Ray job already holds the cluster, so it acts as an admin."""
    import getpass

    from rayfarm.cluster.auth import Principal, Role, check_name

    name = os.environ.get("RAYFARM_OWNER") or getpass.getuser()
    return Principal(check_name(name), Role.ADMIN)


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    values = {
        "frames": args.frames,
        "tiles": args.tiles,
        "slices": args.slices,
        "samples": args.samples,
        "resolution_percentage": args.resolution_percentage,
        "format": args.format,
        "scene": args.scene_name,
        "camera": args.camera,
        "priority": args.priority,
        "max_retries": args.max_retries,
        "allow_missing": args.allow_missing,
        "blender": args.blender,
    }
    return {k: v for k, v in values.items() if v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except FarmError as exc:
        print(f"render_job: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE if exc.status >= 500 else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    import ray

    from rayfarm.cluster.dispatcher import get_dispatcher, start_dispatcher
    from rayfarm.cluster.redis_server import RedisServer
    from rayfarm.cluster.settings import NAMESPACE, Settings
    from rayfarm.models import parse_spec
    from rayfarm.pack import pack_scene

    spec = parse_spec(_spec(args))  # bad input fails before anything starts
    with ExitStack() as stack:
        ray.init(address=args.address, namespace=NAMESPACE, logging_level=logging.WARNING)
        stack.callback(ray.shutdown)
        try:
            dispatcher = get_dispatcher()
        except ValueError:
            dispatcher = None
        if dispatcher is not None:
            settings = Settings.from_dict(ray.get(dispatcher.describe.remote()))
            if args.output and args.output.rstrip("/") != settings.storage.rstrip("/"):
                raise InvalidRequest(
                    f"the farm on this cluster writes to {settings.storage}; leave --output "
                    "out or pass that"
                )
            print(f"render_job: using the farm's dispatcher (storage {settings.storage})")
        else:
            data_dir = Path(tempfile.mkdtemp(prefix="rayfarm-job-"))
            settings = Settings.from_env(storage=args.output, data_dir=str(data_dir))
            if not settings.redis_url:
                redis = stack.enter_context(RedisServer(data_dir / "redis"))
                settings = Settings.from_dict({**settings.to_dict(), "redis_url": redis.url})
            dispatcher = start_dispatcher(settings, private=True)
            stack.callback(ray.kill, dispatcher)
            print(f"render_job: started a dispatcher for this job (storage {settings.storage})")
        with pack_scene(args.scene, args.project, spec.allow_missing) as packed:
            listing = {
                "spec": spec.model_dump(mode="json", exclude_none=True),
                "main": packed.main,
                "files": [{"path": f.path, "sha256": f.sha256, "size": f.size}
                          for f in packed.files],
            }  # fmt: skip
            return asyncio.run(_submit_and_follow(settings, dispatcher, packed, listing, args))


async def _submit_and_follow(
    settings: Any, dispatcher: Any, packed: Any, listing: dict[str, Any],
    args: argparse.Namespace,
) -> int:  # fmt: skip
    from rayfarm.cluster import storage as layout
    from rayfarm.cluster.context import AppContext
    from rayfarm.cluster.events import follow
    from rayfarm.cluster.submit import submit_listing
    from rayfarm.events import format_event
    from rayfarm.models import JobState
    from rayfarm.render.inputs import blob_key

    async def inspect(inputs: Any, blender: str) -> dict[str, Any]:
        result: dict[str, Any] = await dispatcher.inspect.remote(inputs, blender)
        return result

    ctx = AppContext.build(settings, notify=lambda: dispatcher.notify.remote(), inspect=inspect)
    try:
        sent = 0
        for f in {f.sha256: f for f in packed.files}.values():
            key = blob_key(f.sha256)
            if not await asyncio.to_thread(ctx.storage.exists, key):
                with open(f.source, "rb") as src:
                    await asyncio.to_thread(ctx.storage.put_stream, key, src)
                sent += f.size
        print(f"render_job: {len(packed.files)} file(s), {sent} bytes stored")
        job = await submit_listing(ctx, listing, _owner())
        print(f"render_job: job {job.id} queued: frames {job.spec.frames}, tiles {job.tiles}")
        async for event in follow(ctx.store, ctx.hub, job.id):
            if event is not None and not args.quiet and event["kind"] != "progress":
                print(format_event(event), flush=True)
        status = await ctx.store.status(job.id)
        where = ctx.storage.url(layout.manifest_key(job.id))
        print(f"render_job: job {job.id} {status.state}: {status.frames_done}/"
              f"{status.frames_total} frames" + (f"; {status.error}" if status.error else "")
              + (f"; manifest {where}" if status.state is JobState.COMPLETED else ""))  # fmt: skip
        return EXIT_OK if status.state is JobState.COMPLETED else EXIT_JOB_FAILED
    finally:
        await ctx.close()


if __name__ == "__main__":
    sys.exit(main())
