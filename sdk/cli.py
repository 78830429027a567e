"""The ``rayfarm`` command line.

Exit codes: 0 ok; 1 the job failed or was cancelled; 2 usage or bad input
(the farm refused the request); 3 the farm could not be reached or failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from rayfarm import sharing
from rayfarm.client import Farm
from rayfarm.errors import FarmError, FarmUnavailable, Forbidden, ServerError, Unauthorized
from rayfarm.events import format_event
from rayfarm.models import Job, JobState, JobStatus

__all__ = ["main"]

EXIT_OK, EXIT_JOB_FAILED, EXIT_BAD_INPUT, EXIT_UNAVAILABLE, EXIT_DENIED = 0, 1, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayfarm", description="A render farm for Blender on Ray.")
    p.add_argument("--url", help="farm URL (default $RAYFARM_URL or http://127.0.0.1:8000)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run a farm on this machine in the foreground")
    up.add_argument("--port", type=int, help="HTTP port (default 8000 or $RAYFARM_PORT)")
    up.add_argument(
        "--grpc-port", type=int, help="serve gRPC on this port ($RAYFARM_GRPC_PORT; default off)"
    )
    up.add_argument("--storage", help="fsspec URL for outputs (file://... or s3://...)")
    up.add_argument("--data-dir", help="where Redis, storage and logs live")
    up.add_argument("--address", help="attach to a running Ray cluster ('auto') instead")
    up.add_argument(
        "--no-auth",
        action="store_true",
        help="no accounts: every request acts as the admin (loopback only; $RAYFARM_AUTH=off)",
    )
    up.add_argument("--cpu-actors", type=int, help="render actors on a CPU-only farm")
    up.add_argument("--actor-threads", type=int, help="Cycles threads per CPU actor")
    up.add_argument(
        "--blender",
        help="Blender versions the farm offers, e.g. 5.3,5.0 ($RAYFARM_BLENDER; default 5.3,5.0)",
    )

    s = sub.add_parser("submit", help="upload a .blend and queue a job")
    s.add_argument("scene", help="the .blend file")
    s.add_argument("--frames", required=True, help="e.g. 1-8, 1,3,5-7, 1-20x5")
    s.add_argument("--tiles", default="1", help="1, NxM or auto (default 1)")
    s.add_argument(
        "--slices",
        help="split each frame's samples into N slices rendered apart and merged exactly, "
        "or auto (default 1)",
    )
    s.add_argument("--samples", type=int)
    s.add_argument("--resolution", type=int, dest="resolution_percentage", metavar="PERCENT")
    s.add_argument(
        "--denoise",
        action=argparse.BooleanOptionalAction,
        help="override the scene's Cycles denoising (default: as the scene says)",
    )
    s.add_argument("--format", choices=["png", "exr"], help="png, or exr: multi-layer OpenEXR")
    s.add_argument("--color-depth", type=int)
    s.add_argument("--scene-name", dest="scene_name", help="scene in the file (default: active)")
    s.add_argument("--camera")
    s.add_argument("--priority", type=int)
    s.add_argument(
        "--root", help="the folder whose layout the farm reproduces (default: the scene's)"
    )
    s.add_argument(
        "--allow-missing",
        action="store_true",
        default=None,
        help="submit even when files the scene uses are missing (they render pink)",
    )
    s.add_argument("--project", help="the farm project the job belongs to (its members see it)")
    s.add_argument(
        "--scripts",
        action="store_true",
        default=None,
        help="run the file's Python (drivers, registered scripts): admins only, audited",
    )
    s.add_argument("--max-retries", type=int)
    s.add_argument(
        "--blender",
        help="the Blender version to render with, one the farm offers (default: the one "
        "that saved the file, else the nearest newer one)",
    )
    s.add_argument(
        "--after",
        action="append",
        metavar="JOB",
        help="start only once job JOB has COMPLETED (repeat; fails if JOB fails)",
    )
    s.add_argument(
        "--order", choices=["frames", "preview"], help="preview: first, last, middle frames first"
    )
    s.add_argument("--webhook", metavar="URL", help="a URL the farm calls when the job ends")
    s.add_argument("--wait", action="store_true", help="wait for the job to finish")
    s.add_argument("--json", action="store_true", help="print the job as JSON")

    for name, text in [
        ("status", "show a job's status"),
        ("cancel", "cancel a job"),
        ("retry", "retry a failed job"),
        ("wait", "wait for a job to finish"),
    ]:
        c = sub.add_parser(name, help=text)
        c.add_argument("job_id")
        c.add_argument("--json", action="store_true")

    rm = sub.add_parser(
        "rm", help="delete finished jobs: record, log, frames, outputs, inputs no other job uses"
    )
    rm.add_argument("job_ids", nargs="+", metavar="job_id")
    rm.add_argument("--json", action="store_true", help="print what each deletion freed as JSON")

    ls = sub.add_parser("list", help="list recent jobs")
    ls.add_argument("--state", choices=[s.value for s in JobState])
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="what the farm finds in a scene (uploads it)")
    i.add_argument("scene", help="the .blend file")
    i.add_argument("--root", help="the folder whose layout the farm reproduces")
    i.add_argument("--json", action="store_true", help="print the catalogue as JSON")

    d = sub.add_parser("download", help="download a job's frames")
    d.add_argument("job_id")
    d.add_argument("directory")

    w = sub.add_parser("watch", help="a live progress bar until the job ends (exit: its outcome)")
    w.add_argument("job_id")
    w.add_argument("--json", action="store_true", help="print the final status as JSON")

    tk = sub.add_parser("token", help="API tokens (admins)")
    tk_sub = tk.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    tc = tk_sub.add_parser("create", help="a new token for a user (printed alone on the last line)")
    tc.add_argument("--user", required=True)
    tc.add_argument(
        "--role", choices=["viewer", "artist", "admin"], help="create or update the user"
    )
    tc.add_argument(
        "--project", action="append", dest="projects", help="a project of the user (repeat)"
    )
    tc.add_argument("--label", default="", help="what the token is for")
    sub.add_parser("whoami", help="the user the token belongs to")

    sharing.add_commands(sub)

    bl = sub.add_parser("blender", help="this machine's Blender environments (a render node's)")
    bl_sub = bl.add_subparsers(dest="blender_command", required=True, metavar="ACTION")
    bi = bl_sub.add_parser(
        "install", help="build the environment of each version (bpy from PyPI, ~400 MB each)"
    )
    bi.add_argument(
        "versions", nargs="*", help="e.g. 5.3 5.0 (default: $RAYFARM_BLENDER, else 5.3 5.0)"
    )
    bi.add_argument("--force", action="store_true", help="rebuild environments already there")
    bls = bl_sub.add_parser("list", help="the environments installed here, and where")
    bls.add_argument("--json", action="store_true")

    lg = sub.add_parser("logs", help="a job's execution log, or a task's Blender output")
    lg.add_argument("job_id")
    lg.add_argument("--task", help="a task id such as f0000012t003 (frame 12, tile 3)")
    lg.add_argument(
        "--follow", "-f", action="store_true", help="keep printing events until the job ends"
    )
    return p


def _print(item: Job | JobStatus, as_json: bool) -> None:
    """One line per job (id, state, progress, scene, error), or the model as JSON."""
    if as_json:
        print(item.model_dump_json(indent=2))
        return
    scene = f"  {item.scene_file}" if isinstance(item, Job) else ""
    blender = ""
    if isinstance(item, Job) and item.rendered_by:
        blender = f"  Blender {item.rendered_by} (saved by {item.saved_by or '?'})"
    urgent = "  URGENT" if isinstance(item, Job) and item.urgent else ""
    print(
        f"{item.id}  {item.state:<10}  frames {item.frames_done}/{item.frames_total}  "
        f"tasks {item.tasks_done}/{item.tasks_total}{scene}{blender}{urgent}"
        + (f"  waiting: {item.detail}" if item.detail else "")
        + (f"  error: {item.error}" if item.error else "")
    )


def _outcome(state: JobState) -> int:
    return EXIT_JOB_FAILED if state in (JobState.FAILED, JobState.CANCELLED) else EXIT_OK


def _run(args: argparse.Namespace) -> int:
    if args.command == "up":
        return _up(args)
    if args.command == "blender":
        return _blender(args)
    farm = Farm(args.url)
    try:
        return _farm_command(farm, args)
    except Unauthorized as exc:
        if farm.token:
            raise
        # Found neither in $RAYFARM_TOKEN nor beside a farm on this machine (rayfarm.paths).
        raise Unauthorized(
            f"{exc}. No token was found for {farm.url}: set RAYFARM_TOKEN (a farm started "
            "here by this user writes its first admin's token to <data dir>/admin-token)",
            exc.detail,
        ) from None


def _farm_command(farm: Farm, args: argparse.Namespace) -> int:
    """The commands that talk to a farm."""
    if args.command == "submit":
        overrides: dict[str, Any] = {
            k: v
            for k, v in {
                "samples": args.samples,
                "slices": args.slices,
                "resolution_percentage": args.resolution_percentage,
                "denoise": args.denoise,
                "format": args.format,
                "color_depth": args.color_depth,
                "scene": args.scene_name,
                "camera": args.camera,
                "priority": args.priority,
                "max_retries": args.max_retries,
                "allow_missing": args.allow_missing,
                "project": args.project,
                "scripts": args.scripts,
                "blender": args.blender,
                "depends_on": args.after,
                "order": args.order,
                "webhook": args.webhook,
            }.items()
            if v is not None
        }
        job = farm.submit(
            args.scene, frames=args.frames, tiles=args.tiles, root=args.root, **overrides
        )
        up = farm.last_upload
        if up is not None:
            print(
                f"packed {up.files} file(s), {up.bytes_total} bytes; sent {up.files_sent} "
                f"({up.bytes_sent} bytes), the farm had the rest",
                file=sys.stderr,
            )
            if up.missing:
                print(f"warning: missing here: {', '.join(up.missing)}", file=sys.stderr)
        if not args.wait:
            _print(job, args.json)
            return EXIT_OK
        print(f"submitted {job.id}; waiting", file=sys.stderr)
        job.wait()
        job.refresh()
        _print(job, args.json)
        return _outcome(job.state)
    if args.command == "token":
        token = farm.create_token(args.user, args.role, args.projects, args.label)
        print(f"token for {args.user} (shown once; the farm keeps only its hash):", file=sys.stderr)
        print(token)
        return EXIT_OK
    if args.command in ("webhook", "admin"):
        return sharing.run(farm, args)
    if args.command == "whoami":
        who = farm.whoami()
        print(f"{who['user']} ({who['role']}) projects: {', '.join(who['projects']) or '-'}")
        return EXIT_OK
    if args.command == "list":
        for job in farm.jobs(state=args.state, limit=args.limit):
            _print(job, args.json)
        return EXIT_OK
    if args.command == "inspect":
        info = farm.inspect(args.scene, root=args.root)
        if args.json:
            print(json.dumps(info, indent=2))
            return EXIT_OK
        print(f"scene {info['id']}  saved by Blender {info['saved_by']}  ({info['main']})")
        for sc in info["scenes"]:
            x, y, pct = sc["resolution"]
            mark = "*" if sc["name"] == info["active_scene"] else " "
            print(
                f"{mark} {sc['name']}: {sc['engine']}, {x}x{y} at {pct}%, frames "
                f"{sc['frame_start']}-{sc['frame_end']}, samples {sc['samples']}, camera "
                f"{sc['camera']} (cameras: {', '.join(sc['cameras']) or 'none'}), view layers: "
                f"{', '.join(v['name'] for v in sc['view_layers'])}"
            )
        print(f"{len(info['files'])} file(s)")
        for path in info["missing"]:
            print(f"missing: {path}")
        return EXIT_OK
    if args.command == "logs":
        return _logs(farm, args)
    if args.command == "rm":
        return _rm(farm, args)
    if args.command == "download":
        job = farm.job(args.job_id)
        for path in job.download(args.directory):
            print(path)
        return EXIT_OK
    job = farm.job(args.job_id)
    if args.command == "cancel":
        _print(job.cancel(), args.json)
        return EXIT_OK
    if args.command == "retry":
        _print(job.retry(), args.json)
        return EXIT_OK
    if args.command == "watch":
        status = job.wait(progress=True)
    elif args.command == "wait":
        status = job.wait()
    else:  # status: the job's line (with its Blender), or the compact status as JSON
        status = job.status()
        if not args.json:
            _print(job.refresh(), False)
            return _outcome(status.state)
    _print(status, args.json)
    return _outcome(status.state)


def _rm(farm: Farm, args: argparse.Namespace) -> int:
    """Delete each job; the first refusal (unknown, still running) stops there."""
    for job_id in args.job_ids:
        freed = farm.job(job_id).delete()
        if args.json:
            print(json.dumps(freed))
        else:
            print(
                f"{job_id}  deleted ({freed['state']}): {freed['objects']} file(s), "
                f"{freed['bytes']} bytes; {freed['blobs']} input blob(s) no other job used, "
                f"{freed['blob_bytes']} bytes"
            )
    return EXIT_OK


def _logs(farm: Farm, args: argparse.Namespace) -> int:
    job = farm.job(args.job_id)
    if args.follow and args.task:
        print(
            "rayfarm: --follow streams the job's log; a task's log is stored when it ends",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if not args.follow:
        sys.stdout.write(job.logs(args.task))
        return EXIT_OK
    for event in job.events():
        print(format_event(event), flush=True)
    return _outcome(job.status().state)


def _blender(args: argparse.Namespace) -> int:
    """``rayfarm blender install|list``: this machine's Blender environments (see
    ``rayfarm.render.environments``)."""
    import os

    from rayfarm.render import environments

    if args.blender_command == "install":
        wanted = environments.parse_versions(
            args.versions or os.environ.get("RAYFARM_BLENDER") or environments.DEFAULT_VERSIONS
        )
        for version in wanted:
            env = environments.install(version, say=lambda line: print(line, flush=True),
                                       force=args.force)  # fmt: skip
            print(f"Blender {version}: {env.python}")
        return EXIT_OK
    found = environments.installed()
    if args.json:
        rows = [{"version": e.version, "path": str(e.path), **e.info()} for e in found]
        print(json.dumps({"root": str(environments.root()), "environments": rows}, indent=2))
        return EXIT_OK
    print(f"Blender environments in {environments.root()}:")
    for env in found:
        info = env.info()
        print(f"  {env.version}  bpy {info.get('bpy', '?')}  Python {info.get('python', '?')}"
              f"  {env.path}")  # fmt: skip
    if not found:
        print("  none: `rayfarm blender install 5.3` builds one")
    return EXIT_OK


def _up(args: argparse.Namespace) -> int:
    try:
        from rayfarm.cluster.local import up
        from rayfarm.cluster.settings import Settings
    except ImportError as exc:
        print(
            f"rayfarm up needs the cluster side ({exc.name} is missing): "
            "pip install 'rayfarm[cluster,render]'",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    settings = Settings.from_env(
        port=args.port,
        grpc_port=args.grpc_port,
        storage=args.storage,
        data_dir=args.data_dir,
        cpu_actors=args.cpu_actors,
        actor_threads=args.actor_threads,
        blender=args.blender,
        **({"auth": False} if args.no_auth else {}),
    )
    up(settings, address=args.address, ready=lambda line: print(line, flush=True))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (FarmUnavailable, ServerError) as exc:
        print(f"rayfarm: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (Unauthorized, Forbidden) as exc:
        print(f"rayfarm: {exc}", file=sys.stderr)
        return EXIT_DENIED
    except FarmError as exc:
        print(f"rayfarm: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE if exc.status >= 500 else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
