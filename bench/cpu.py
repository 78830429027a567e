"""What do the farm's own processes burn, idle and while a job renders? CPU seconds by role.

On a machine where Cycles uses every core, each CPU second the farm's other processes
(Serve's controller, proxy and replicas, the dispatcher, Ray's daemons, Redis, the
render actor itself) burn while a job renders is taken from the render. This bench
counts those seconds, read from ``/proc/<pid>/stat`` (utime + stime of every process
under ``rayfarm up``), grouped by role:

1. a local farm starts (``rayfarm up``, one CPU render actor), a tiny job warms it up
   and it settles for ``--settle`` seconds;
2. **idle**: ``--idle`` seconds with no work;
3. **job**: ``--frames`` frames of a scene (``--scene``, made with
   ``examples/make_scene.py``), submitted and waited for as a client does
   (``Job.wait``'s long-poll).

CPU seconds are what a shared machine lets one measure honestly (a busy machine
stretches wall-clock times, not the work each process does), so the bench reports
them, and the job's wall time only as context. ``--variant NAME:VAR=VALUE,...``
(repeatable) runs the whole measurement again on a fresh farm with those variables in
its environment, so settings compare in one run: e.g. ``--variant
serve-defaults:RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.1`` against the farm as shipped
(always measured first, as ``shipped``).

    python bench/cpu.py                                   # light scene, 4 frames
    python bench/cpu.py --scene heavy --frames 4 --idle 60 --json /tmp/cpu.json

Exit status: 0 when it ran, 1 when something broke, 130 on Ctrl-C; every process it
started is stopped first. The driver imports neither bpy nor ray.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import rayfarm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # what the benches share
    SCENES,
    TINY,
    BenchError,
    LocalFarm,
    Processes,
    Tree,
    add_output_options,
    cpu_by_name,
    machine,
    make_scene,
    proc_table,
    run_bench,
)

JOB_TIMEOUT_S = 3600.0
#: Process names (``_common.process_name``) -> the role a table row shows. A Blender
#: worker is its parent's: the render actor's render, or the scene inspector's.
ROLES = {
    "ray::RenderActor": "render actor",
    "ray::SceneInspector": "scene inspector",
    "ray::Dispatcher": "dispatcher",
    "ray::TileAssembler": "tile assembler",
    "ray::ServeController": "serve controller",
    "ray::ProxyActor": "serve proxy",
    "ray::ServeReplica:rayfarm:api": "serve replicas",
    "ray::HAProxyManager": "serve haproxy manager",
    "haproxy": "haproxy",
    "rayfarm-haproxy": "haproxy",
    "raylet": "raylet",
    "gcs_server": "gcs_server",
    "log_monitor.py": "ray log monitor",
    "ray::DashboardAgent": "ray dashboard agent",
    "dashboard.py": "ray dashboard head",
    "monitor.py": "ray autoscaler monitor",
    "ray::RuntimeEnvAgent": "ray runtime env agent",
    "rayfarm up": "rayfarm up",
    "redis-server": "redis",
    "ray::IDLE": "ray idle workers",
}
#: The rows that are the render itself, not the farm's overhead.
RENDER_ROLES = ("render worker (Blender)",)


def role_of(pid: int, table: dict[int, tuple[int, int, str, float]]) -> str:
    """The role of process ``pid`` (see ``ROLES``; other names stand for themselves)."""
    ppid, _, name, _ = table[pid]
    if name == "blender worker":
        parent = table.get(ppid, (0, 0, "?", 0.0))[2]
        return "render worker (Blender)" if parent == "ray::RenderActor" else "scene inspector"
    if name.startswith("rayfarm.cluster.reaper"):
        return "reaper"
    return ROLES.get(name, name)


class Snapshot:
    """Every process under the farm now (noted, to be stopped with it), named by role:
    pid -> (start ticks, role, CPU seconds)."""

    def __init__(self, farm: LocalFarm) -> None:
        assert farm.process is not None
        table = proc_table()  # one read for the tree and the parents role_of looks at
        self.at = time.perf_counter()
        self.processes: Tree = {
            pid: (start, role_of(pid, table), seconds)
            for pid, (start, _, seconds) in farm.tree(table).items()
        }

    def since(self, before: Snapshot) -> dict[str, Any]:
        """CPU seconds by role between ``before`` and this snapshot."""
        by_role = cpu_by_name(before.processes, self.processes)  # most first
        farm = sum(s for r, s in by_role.items() if r not in RENDER_ROLES)
        return {
            "seconds": round(self.at - before.at, 2),
            "farm_cpu_s": round(farm, 2),
            "by_role": {r: round(s, 2) for r, s in by_role.items()},
        }


def _finish(job: rayfarm.Job, frames: int) -> float:
    """Wait for ``job`` as a client does; its seconds from now. Fails unless COMPLETED."""
    started = time.perf_counter()
    try:
        job.wait(timeout=JOB_TIMEOUT_S)
    except TimeoutError as exc:
        raise BenchError(str(exc)) from None
    seconds = time.perf_counter() - started
    job.refresh()
    if job.state is not rayfarm.JobState.COMPLETED or job.frames_done != frames:
        raise BenchError(f"job {job.id} ended {job.state} ({job.frames_done}/{frames} frames)")
    return seconds


def measure_variant(
    procs: Processes, out: Path, name: str, env: dict[str, str], args: argparse.Namespace,
    tiny: Path, scene: Path,
) -> dict[str, Any]:  # fmt: skip
    """One farm with ``env``: its idle window, then the job."""
    farm = LocalFarm(procs, out / f"farm-{name}", out / f"farm-{name}.log")
    farm.env = env
    try:
        client = farm.start()
        _finish(client.submit(tiny, frames="1"), 1)  # warm: the actor and its Blender up
        time.sleep(args.settle)
        before = Snapshot(farm)
        time.sleep(args.idle)
        idle = Snapshot(farm).since(before)
        before = Snapshot(farm)
        started = time.perf_counter()
        job = client.submit(scene, frames=f"1-{args.frames}")
        _finish(job, args.frames)
        job_s = time.perf_counter() - started
        during = Snapshot(farm).since(before)
        during["job_wall_s"] = round(job_s, 2)
        return {"env": env, "idle": idle, "job": during}
    finally:
        farm.stop()


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    names = list(results)
    roles: list[str] = []
    for window in ("idle", "job"):
        for r in results.values():
            roles += [role for role in r[window]["by_role"] if role not in roles]
    head = " | ".join(f"{n} idle | {n} job" for n in names)
    print(f"\nCPU seconds by role: idle {args.idle:.0f} s; job = {args.frames} frames of "
          f"the {args.scene} scene (its wall time below, context only)")  # fmt: skip
    print(f"| role | {head} |")
    print("|---|" + "---:|" * (2 * len(names)))

    def cell(r: dict[str, Any], window: str, role: str) -> str:
        return f"{r[window]['by_role'].get(role, 0.0):.2f}"

    for role in roles:
        cells = " | ".join(f"{cell(r, 'idle', role)} | {cell(r, 'job', role)}"
                           for r in results.values())  # fmt: skip
        print(f"| {role} | {cells} |")
    cells = " | ".join(f"**{r['idle']['farm_cpu_s']:.2f}** | **{r['job']['farm_cpu_s']:.2f}**"
                       for r in results.values())  # fmt: skip
    print(f"| farm, all but the render worker | {cells} |")
    cells = " | ".join(
        f"{r['idle']['farm_cpu_s'] / r['idle']['seconds']:.1%} of a core | "
        f"{r['job']['farm_cpu_s'] / r['job']['seconds']:.1%} of a core"
        for r in results.values()
    )
    print(f"| farm, per second | {cells} |")
    cells = " | ".join(f"{r['idle']['seconds']:.1f} s | {r['job']['job_wall_s']:.1f} s"
                       for r in results.values())  # fmt: skip
    print(f"| window | {cells} |")


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, pairs = text.partition(":")
    env = {}
    for pair in filter(None, pairs.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: want NAME:VAR=VALUE,...")
        env[key.strip()] = value
    if not name or name == "shipped":
        raise argparse.ArgumentTypeError(f"--variant {text!r}: name it (not 'shipped')")
    return name, env


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scene", default="light", choices=sorted(SCENES), help="(light)")
    p.add_argument("--frames", type=int, default=4, help="frames of the job (4)")
    p.add_argument("--idle", type=float, default=30.0, help="idle window, seconds (30)")
    p.add_argument("--settle", type=float, default=5.0, help="after the warm-up, s (5)")
    p.add_argument("--variant", type=_variant, action="append", default=[],
                   help="NAME:VAR=VALUE,... a farm with these too (repeatable)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="the job renders a tiny scene")
    add_output_options(p, "scenes, logs, farm data (a temp dir)")
    args = p.parse_args(argv)
    if args.frames < 1 or args.idle <= 0 or args.settle < 0:
        p.error("--frames must be at least 1, --idle above 0, --settle not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)

    def work(procs: Processes, out: Path) -> dict[str, Any]:
        info = machine()
        print(f"machine: {info['nproc']} CPUs ({info['cpu_model']}), ray {info['ray']}, "
              f"load {info['load_average']}; files in {out}")  # fmt: skip
        tiny = make_scene(procs, out / "tiny.blend", TINY)
        extra = TINY if args.tiny else SCENES[args.scene]
        scene = make_scene(procs, out / f"{args.scene}.blend",
                           [*extra, "--frames", str(args.frames)])  # fmt: skip
        results: dict[str, dict[str, Any]] = {}
        for name, env in [("shipped", {}), *args.variant]:
            print(f"{name}: farm up, warm-up, {args.idle:.0f} s idle, the job ...", flush=True)
            results[name] = measure_variant(procs, out, name, env, args, tiny, scene)
        print_table(results, args)
        return {"machine": info, "config": vars(args) | {"variant": args.variant},
                "variants": results}  # fmt: skip

    return run_bench(args.out, args.json, "rayfarm-cpu-", work)


if __name__ == "__main__":
    sys.exit(main())
