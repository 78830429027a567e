"""The CLI's commands for sharing a farm: ``rayfarm admin share|quota|urgent`` (admins)
and ``rayfarm webhook`` (docs/scheduling.md). ``rayfarm.cli`` adds them to its parser."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rayfarm.client import Farm

__all__ = ["add_commands", "run"]

#: Exit codes, as ``rayfarm.cli`` says them.
OK, BAD_INPUT = 0, 2


def add_commands(sub: Any) -> None:
    """Add ``webhook`` and ``admin`` to the CLI's subcommands ``sub``."""
    wh = sub.add_parser("webhook", help="your jobs' webhook: a URL called when a job ends")
    wh_sub = wh.add_subparsers(dest="webhook_command", required=True, metavar="ACTION")
    wh_sub.add_parser("show", help="the URL and the secret that signs its calls")
    whs = wh_sub.add_parser("set", help="call URL whenever a job of yours ends")
    whs.add_argument("url")
    whs.add_argument("--rotate", action="store_true", help="make a new signing secret")
    wh_sub.add_parser("rm", help="no webhook for your jobs")

    ad = sub.add_parser("admin", help="the farm's scheduling policy (admins)")
    ad_sub = ad.add_subparsers(dest="admin_command", required=True, metavar="WHAT")
    sh = ad_sub.add_parser("share", help="projects' fair-share weights")
    sh_sub = sh.add_subparsers(dest="share_command", required=True, metavar="ACTION")
    shs = sh_sub.add_parser("set", help="weigh a project (default 1)")
    shs.add_argument("project")
    shs.add_argument("weight", type=float)
    sh_sub.add_parser("list", help="the weighted projects")
    shr = sh_sub.add_parser("rm", help="back to the default weight, 1")
    shr.add_argument("project")
    qu = ad_sub.add_parser("quota", help="the most slots a user's or project's jobs hold")
    qu_sub = qu.add_subparsers(dest="quota_command", required=True, metavar="ACTION")
    qus = qu_sub.add_parser("set", help="limit GPU and/or CPU slots")
    qus.add_argument("scope", choices=["user", "project"])
    qus.add_argument("name")
    qus.add_argument("--gpu", type=int, help="most GPU slots at once")
    qus.add_argument("--cpu", type=int, help="most CPU slots at once")
    qu_sub.add_parser("list", help="every quota")
    qur = qu_sub.add_parser("rm", help="remove a quota")
    qur.add_argument("scope", choices=["user", "project"])
    qur.add_argument("name")
    ur = ad_sub.add_parser("urgent", help="mark a job urgent: it renders before all else")
    ur.add_argument("job_id")
    ur.add_argument("--off", action="store_true", help="no longer urgent")


def run(farm: Farm, args: argparse.Namespace) -> int:
    """Run ``rayfarm webhook ...`` or ``rayfarm admin ...``; the exit code."""
    if args.command == "webhook":
        return _webhook(farm, args)
    return _admin(farm, args)


def _webhook(farm: Farm, args: argparse.Namespace) -> int:
    if args.webhook_command == "set":
        found = farm.set_webhook(args.url, rotate=args.rotate)
    elif args.webhook_command == "rm":
        found = farm.set_webhook(None)
    else:
        found = farm.webhook()
    print(f"url: {found['url'] or '-'}")
    print(f"secret: {found['secret'] or '-'}  (verify X-Rayfarm-Signature with it)")
    return OK


def _admin(farm: Farm, args: argparse.Namespace) -> int:
    """``rayfarm admin share|quota|urgent``."""
    if args.admin_command == "urgent":
        job = farm.mark_urgent(args.job_id, not args.off)
        print(f"{job.id}  {'urgent' if job.urgent else 'not urgent'}  {job.state}")
        return OK
    if args.admin_command == "share":
        if args.share_command == "set":
            farm.set_share(args.project, args.weight)
        elif args.share_command == "rm":
            farm.set_share(args.project, None)
        for project, weight in sorted(farm.shares().items()):
            print(f"{project}  {weight:g}")
        return OK
    if args.quota_command == "set":
        if args.gpu is None and args.cpu is None:
            print("rayfarm: give --gpu, --cpu or both", file=sys.stderr)
            return BAD_INPUT
        farm.set_quota(args.scope, args.name, gpu=args.gpu, cpu=args.cpu)
    elif args.quota_command == "rm":
        farm.set_quota(args.scope, args.name)
    for scope, quotas in sorted(farm.quotas().items()):
        for name, limits in sorted(quotas.items()):
            gpu, cpu = (limits[k] if limits[k] is not None else "-" for k in ("gpu", "cpu"))
            print(f"{scope} {name}  gpu {gpu}  cpu {cpu}")
    return OK
