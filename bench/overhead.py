"""What does rayfarm cost over rendering with Blender directly? Three ways, one table.

The bench builds its scenes with ``examples/make_scene.py`` and renders the same
frames 1..N (``--frames``, default 8) of each three ways:

(a) the floor: ONE fresh Python process imports bpy, opens the scene, turns on
    ``render.use_persistent_data`` and renders frames 1..N in sequence, each
    with ``bpy.ops.render.render(write_still=True)`` to a PNG. Nothing can do the
    same work faster on this machine. Time: the whole process, start to exit.
(b) process per frame, as Flamenco and Deadline 10 run Blender per task: for each
    frame a fresh Python process imports bpy, opens the scene, renders that one
    frame and exits. Time: the N processes, one after another.
(c) rayfarm: a job through the HTTP API of a local farm (``rayfarm up``, one
    CPU render actor using every core), ``farm.submit(scene, frames="1-N")``
    until the job is COMPLETED. The farm is started once, before any (c)
    timing, and warmed up with a tiny unrelated job so its actor exists with bpy
    imported, as a farm's long-lived actors do. The same tiny job runs before
    every timed job, so the actor never starts a timed job holding its scene.

(a) and (b) run first, with no farm running; then the farm starts for (c). Ways
(a) and (b) run ``bench/render_frames.py``; every output is an 8-bit PNG with
the scene's own settings otherwise. The scenes:

- light: the example scene (320x240, 16 samples, Cycles);
- heavy: ``--heavy`` (about 2.5 million triangles after a render-time
  Subdivision Surface modifier, animated camera).

Targets: (c)/(a) <= 1.05 on both scenes; (c)/(b) <= 0.80 on the light scene and
<= 0.65 on the heavy one. Each measurement is repeated ``--repeat`` times and
the median reported. Run it on a quiet machine:

    make bench                                  # python bench/overhead.py --repeat 3
    python bench/overhead.py --frames 8 --repeat 3 --scenes light,heavy \\
        --out bench/results --json bench/results/overhead.json

Under each table, where the time went: for (a) and (b) from the milestones the
render process notes (launch, bpy import, open, each frame, exit); for (c) from
the job's server timestamps, the moments the client saw each frame land (it
waits with ``Job.wait``, which long-polls the status: one request per change),
and the CPU seconds every process of the farm used during the job (read from
/proc). Then (c) step by step, from the client's ``last_upload`` and the job's
events: the submit (pack: tracing the scene's files; hash; upload: asking what the
farm lacks and sending it; queue: ``POST /jobs``, the farm's checks), catalogue
(the farm opening a new scene to list its cameras and passes, beside the render),
dispatch (queued to the first task started), then summed over the tasks, inside the
render actor: load (a worker started, the job's files laid out, the scene opened),
render (Blender's render, its image written), write (the preview, the files read
back); store (frames into storage); and outside the tasks: what the farm spent
between the actor's tasks (Ray calls, dispatching, recording), per task. Before
timing (c) it also reports what the idle farm burns. Frames of all three ways are
checked to have the same pixels. Everything (scenes, frames, logs, ``farm.log``)
stays in ``--out``, the temp dir included, for a look afterwards. At the end, both
scenes' (c)/(a) with the runs they are the median of.

Exit status: 0 when the measurement ran (the table says PASS or FAIL), 1 when
something broke, 130 on Ctrl-C or SIGTERM. Every process the bench starts
(renders, the farm with its Ray and Redis) is stopped before it exits, whatever
happens.

The driver itself imports neither bpy nor ray: only the stdlib and the SDK.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rayfarm
from rayfarm.client import UploadReport

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # what the benches share
    RENDER_FRAMES,
    SCENES,
    TINY,
    BenchError,
    LocalFarm,
    Processes,
    add_output_options,
    blender_python,
    cpu_delta,
    machine,
    make_scene,
    run_bench,
)
from _report import pass_fail, print_columns

#: scene -> ratio -> the most it may be.
TARGETS: dict[str, dict[str, float]] = {
    "light": {"c/a": 1.05, "c/b": 0.80},
    "heavy": {"c/a": 1.05, "c/b": 0.65},
}
WAYS = {
    "a": "(a) one bpy process (floor)",
    "b": "(b) process per frame",
    "c": "(c) rayfarm job (HTTP API)",
}
JOB_TIMEOUT_S = 3600.0
IDLE_SAMPLE_S = 5.0
# -- the three ways -------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bench:
    procs: Processes
    out: Path
    frames: int
    farm: LocalFarm | None = None
    tiny: Path | None = None

    def render(self, scene: Path, frames: list[int], dest: Path, persistent: bool) -> Run:
        """One ``render_frames.py`` process; its time and where the time went."""
        marks = dest / f"marks-{frames[0]}.jsonl"
        marks.unlink(missing_ok=True)
        cmd = [blender_python(), RENDER_FRAMES, scene, dest, *frames, "--marks", marks]
        launched = time.time()
        seconds = self.procs.run([*cmd, "--persistent"] if persistent else cmd, dest / "log.txt")
        return Run(seconds, _process_detail(marks, launched, launched + seconds))

    def floor(self, scene: Path, dest: Path) -> Run:
        _fresh(dest)
        return self.render(scene, list(range(1, self.frames + 1)), dest, persistent=True)

    def per_frame(self, scene: Path, dest: Path) -> Run:
        _fresh(dest)
        runs = [self.render(scene, [f], dest, persistent=False) for f in range(1, self.frames + 1)]
        detail = {k: [r.detail.get(k) for r in runs] for k in runs[0].detail}
        return Run(sum(r.seconds for r in runs), detail)

    def tiny_job(self) -> rayfarm.Job:
        """Frame 1 of the tiny scene: warms the farm up, and leaves its actor holding
        a scene other than the one the next timed job renders."""
        assert self.farm is not None and self.farm.client is not None and self.tiny is not None
        job = self.farm.client.submit(self.tiny, frames="1")
        _finish(job, 1)
        return job

    def idle_cost(self) -> dict[str, Any]:
        """What the farm burns with no work (IDLE_SAMPLE_S of it)."""
        assert self.farm is not None
        before = self.farm.cpu()
        time.sleep(IDLE_SAMPLE_S)
        return {"quiet": cpu_delta(before, self.farm.cpu())}

    def rayfarm(self, scene: Path, dest: Path) -> Run:
        assert self.farm is not None and self.farm.client is not None
        self.tiny_job()
        before = self.farm.cpu()
        t0, wall0 = time.perf_counter(), time.time()
        job = self.farm.client.submit(scene, frames=f"1-{self.frames}")
        submitted = time.perf_counter()
        progress = _follow(job)
        seconds = time.perf_counter() - t0
        after = self.farm.cpu()
        _finish(job, self.frames)
        upload = self.farm.client.last_upload
        events = [e.model_dump(mode="json", by_alias=True) for e in job.events()]
        catalogue_s = self.farm.catalogue_s(scene)

        def since(stamp: Any) -> float | None:
            return None if stamp is None else round(stamp.timestamp() - wall0, 3)

        detail = {
            "submit_s": round(submitted - t0, 3),
            "created_s": since(job.created_at),
            "processing_s": since(job.started_at),
            "finished_s": since(job.finished_at),
            "seen_done_s": round(seconds, 3),
            "frames_seen_s": [[round(t - t0, 3), n] for t, n in progress],
            "cpu": cpu_delta(before, after),
            "steps": {
                **job_steps(events, job.created_at, upload, submitted - t0),
                "catalogue_s": catalogue_s,
            },
        }
        _fresh(dest)
        job.download(dest)
        return Run(seconds, detail)


def job_steps(
    events: list[dict[str, Any]],
    created_at: datetime.datetime | None,
    upload: UploadReport | None,
    submit_s: float,
) -> dict[str, Any]:
    """Where a rayfarm job's time went, step by step (see the module's docstring), from
    the client's upload report and the job's events (``task_done`` carries each
    task's steps, ``frame`` its ``store_s``)."""

    def total(kind: str, name: str) -> float:
        return round(sum(float(e.get(name) or 0) for e in events if e["kind"] == kind), 3)

    def at(event: dict[str, Any]) -> datetime.datetime:
        return datetime.datetime.fromisoformat(str(event["at"]))

    done = [e for e in events if e["kind"] == "task_done"]
    started = [at(e) for e in events if e["kind"] == "task_started"]
    pack_s, hash_s, upload_s = (
        (upload.pack_s, upload.hash_s, upload.upload_s) if upload else (0.0, 0.0, 0.0)
    )
    steps: dict[str, Any] = {
        "pack_s": round(pack_s, 3),
        "hash_s": round(hash_s, 3),
        "upload_s": round(upload_s, 3),
        "queue_s": round(submit_s - pack_s - hash_s - upload_s, 3),
        "tasks": len(done),
    }
    if started and created_at is not None:
        steps["dispatch_s"] = round((min(started) - created_at).total_seconds(), 3)
    for name in ("start_s", "inputs_s", "open_s", "render_s", "write_s"):
        steps[name] = total("task_done", name)
    steps["load_s"] = round(steps["start_s"] + steps["inputs_s"] + steps["open_s"], 3)
    steps["store_s"] = total("frame", "store_s")
    if started and done:
        span = (max(at(e) for e in done) - min(started)).total_seconds()
        steps["outside_tasks_s"] = round(span - total("task_done", "seconds"), 3)
    return steps


def _fresh(dest: Path) -> None:
    """An empty ``dest``: no frame from an earlier run in the same --out may pass for new."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)


def _follow(job: rayfarm.Job) -> list[tuple[float, int]]:
    """``job.wait()`` (a long-poll: the farm answers on each change), noting when each
    frame shows up: [(perf_counter, frames_done)] at every change."""
    progress: list[tuple[float, int]] = []

    def seen(status: rayfarm.JobStatus) -> None:
        if status.frames_done != (progress[-1][1] if progress else 0):
            progress.append((time.perf_counter(), status.frames_done))

    try:
        job.wait(timeout=JOB_TIMEOUT_S, on_change=seen)
    except TimeoutError as exc:
        raise BenchError(str(exc)) from None
    return progress


def _finish(job: rayfarm.Job, frames: int) -> None:
    """Wait for ``job``; fail loudly unless it COMPLETED with every frame."""
    try:
        job.wait(timeout=JOB_TIMEOUT_S)
    except TimeoutError as exc:
        raise BenchError(str(exc)) from None
    job.refresh()
    if job.state is not rayfarm.JobState.COMPLETED or job.frames_done != frames:
        raise BenchError(
            f"rayfarm job {job.id} ended {job.state} with {job.frames_done}/{frames} frames: "
            f"{job.error}"
        )


def _process_detail(marks: Path, launched: float, ended: float) -> dict[str, Any]:
    """Where a render process's time went, from its milestones (see render_frames.py)."""
    events = [json.loads(line) for line in marks.read_text().splitlines() if line.strip()]
    at = {e["event"]: e["t"] for e in events if e["event"] != "frame"}
    frame_times = [e["t"] for e in events if e["event"] == "frame"]
    if not {"start", "imported", "opened"} <= at.keys() or not frame_times:
        return {}
    ends = [at["opened"], *frame_times]
    return {
        "launch_s": round(at["start"] - launched, 3),
        "import_bpy_s": round(at["imported"] - at["start"], 3),
        "open_s": round(at["opened"] - at["imported"], 3),
        "frame_s": [round(b - a, 3) for a, b in itertools.pairwise(ends)],
        "first_frame_at_s": round(frame_times[0] - launched, 3),
        "exit_s": round(ended - frame_times[-1], 3),
    }


# -- scenes, outputs, machine ------------------------------------------------------------------


def _pixels(path: Path) -> tuple[bytes, bytes]:
    """A PNG's header and decompressed image data: equal for equal pixels, whatever
    metadata (a render date) the files carry."""
    data = path.read_bytes()
    pos, header, idat = 8, b"", []
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    return header, zlib.decompress(b"".join(idat))


def same_images(a: Path, b: Path, frames: int) -> list[int]:
    """The frames whose pixels differ between two output folders (or are missing)."""
    differ = []
    for frame in range(1, frames + 1):
        name = f"{frame:04d}.png"
        missing = not (a / name).is_file() or not (b / name).is_file()
        if missing or _pixels(a / name) != _pixels(b / name):
            differ.append(frame)
    return differ


# -- report -------------------------------------------------------------------------------------


def _median_run(runs: list[Run]) -> Run:
    """The run whose time is the (lower) median: its breakdown is the one shown."""
    target = statistics.median_low([r.seconds for r in runs])
    return next(r for r in runs if r.seconds == target)


def summarize(name: str, runs: dict[str, list[Run]], frames: int) -> dict[str, Any]:
    medians = {way: statistics.median(r.seconds for r in rs) for way, rs in runs.items()}
    ratios = {"c/a": medians["c"] / medians["a"], "c/b": medians["c"] / medians["b"]}
    return {
        "frames": frames,
        "median_s": {k: round(v, 3) for k, v in medians.items()},
        "per_frame_s": {k: round(v / frames, 3) for k, v in medians.items()},
        "runs_s": {way: [round(r.seconds, 3) for r in rs] for way, rs in runs.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS[name],
        "pass": {k: ratios[k] <= TARGETS[name][k] for k in ratios},
        "breakdown": {way: _median_run(rs).detail for way, rs in runs.items()},
    }


def _fmt(values: list[float] | None) -> str:
    if not values:
        return "-"
    if len(values) <= 3:
        return ", ".join(f"{v:.2f}" for v in values)
    return f"{values[0]:.2f} then median {statistics.median(values[1:]):.2f}"


def print_table(
    name: str, result: dict[str, Any], repeat: int, differ: dict[str, list[int]]
) -> None:
    n = result["frames"]
    print(f"\n{name} scene: frames 1-{n}, median of {repeat}")
    print_columns(
        (("way", "<30"), ("total s", ">9.2f"), ("s/frame", ">9.3f")),
        [
            (label, result["median_s"][way], result["per_frame_s"][way])
            for way, label in WAYS.items()
        ],
    )
    print(f"  {'ratio':<30} {'value':>9} {'target':>9}  result")
    for ratio, value in result["ratios"].items():
        verdict = pass_fail(result["pass"][ratio])
        target = f"<= {result['targets'][ratio]:.2f}"
        print(f"  {ratio:<30} {value:>9.3f} {target:>9}  {verdict}")
    a, b, c = (result["breakdown"][w] for w in "abc")
    if a:
        print(
            f"  (a) launch {a['launch_s']:.2f} s, import bpy {a['import_bpy_s']:.2f} s, open "
            f"{a['open_s']:.2f} s, frames {_fmt(a['frame_s'])} s, exit {a['exit_s']:.2f} s"
        )
    if b and b.get("import_bpy_s"):

        def mean(key: str) -> float:
            return statistics.fmean(x for x in b[key] if x is not None)

        renders = [x[0] for x in b["frame_s"] if x]
        print(
            f"  (b) per process: launch {mean('launch_s'):.2f} s, import bpy "
            f"{mean('import_bpy_s'):.2f} s, open {mean('open_s'):.2f} s, render "
            f"{statistics.fmean(renders):.2f} s, exit {mean('exit_s'):.2f} s"
        )
    if c:
        seen = c["frames_seen_s"]
        # per frame between sightings (one poll may see two frames land)
        gaps = [(t - s) / (m - n) for (s, n), (t, m) in itertools.pairwise(seen)]
        first = f"{seen[0][0]:.2f} s" if seen else "-"
        print(
            f"  (c) submit {c['submit_s']:.2f} s, PROCESSING at {c['processing_s']:.2f} s, "
            f"first frame seen at {first} (a: {a.get('first_frame_at_s', 0):.2f} s), "
            f"then {_fmt(gaps)} s/frame, done seen at {c['seen_done_s']:.2f} s"
        )
        cpu = c["cpu"]
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(cpu["farm_by_process"].items())[:5])
        print(
            f"      CPU s during the job: render actor and its Blender {cpu['actor_cpu_s']:.2f}, "
            f"rest of the farm {cpu['farm_cpu_s']:.2f} ({top}), this driver "
            f"{cpu['driver_cpu_s']:.2f}"
        )
        print_steps(c.get("steps"))
    for way, frames in differ.items():
        if frames:
            print(f"  note: {way} frames {frames} differ in pixels from (a)'s")


def print_steps(steps: dict[str, Any] | None) -> None:
    """(c) step by step: the submit, then the job's tasks summed (see ``job_steps``)."""
    if not steps:
        return
    n = max(1, steps["tasks"])
    print(
        f"      steps: submit = pack {steps['pack_s']:.2f} + hash {steps['hash_s']:.2f} + "
        f"upload {steps['upload_s']:.2f} + queue {steps['queue_s']:.2f} s; dispatch "
        f"{steps.get('dispatch_s', 0):.2f} s; the scene's catalogue "
        + (f"{steps['catalogue_s']:.2f} s" if steps.get("catalogue_s") is not None else "-")
        + " (once per scene, beside its first job)"
    )
    print(
        f"      in the actor, {steps['tasks']} tasks: load {steps['load_s']:.2f} s (worker "
        f"{steps['start_s']:.2f}, inputs {steps['inputs_s']:.2f}, open {steps['open_s']:.2f}), "
        f"render {steps['render_s']:.2f} s, write {steps['write_s']:.2f} s; store "
        f"{steps['store_s']:.2f} s; outside the tasks {steps.get('outside_tasks_s', 0):.2f} s "
        f"({steps.get('outside_tasks_s', 0) / n:.3f} s a task)"
    )


def print_summary(results: dict[str, Any], repeat: int) -> None:
    """Both scenes' (c)/(a) on one line each, with their runs: the figure the targets
    are about."""
    print(f"\n(c)/(a), median of {repeat}:")
    for name, result in results["scenes"].items():
        value, target = result["ratios"]["c/a"], result["targets"]["c/a"]
        runs = ", ".join(f"{x:.2f}" for x in result["runs_s"]["c"])
        print(
            f"  {name:<6} {value:.3f} (target <= {target:.2f}) "
            f"{pass_fail(result['pass']['c/a'])}   (c) runs {runs} s, (a) "
            + ", ".join(f"{x:.2f}" for x in result["runs_s"]["a"])
            + " s"
        )


# -- main -----------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=8, help="frames 1..N of each scene (8)")
    p.add_argument("--repeat", type=int, default=1, help="times to measure each way (1)")
    p.add_argument("--scenes", default="light,heavy", help="comma-separated: light,heavy")
    add_output_options(p, "scenes, renders, logs, farm data (a temp dir)")
    args = p.parse_args(argv)
    args.scene_list = [s.strip() for s in args.scenes.split(",") if s.strip()]
    unknown = sorted(set(args.scene_list) - SCENES.keys())
    if unknown or not args.scene_list:
        p.error(f"--scenes: unknown {unknown}; choose from {', '.join(SCENES)}")
    if args.frames < 1 or args.repeat < 1:
        p.error("--frames and --repeat must be at least 1")
    return args


def measure(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    procs, out = bench.procs, bench.out
    info = machine()
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu_model']}), {info['memory_gib']} GiB, "
        f"bpy {info['bpy']}, ray {info['ray']}, rayfarm {info['rayfarm']}, "
        f"load {info['load_average']}"
    )
    print(f"frames 1-{args.frames}, repeat {args.repeat}, scenes {args.scenes}; files in {out}")
    scene_frames = ["--frames", str(max(8, args.frames))]
    scenes = {
        name: make_scene(procs, out / f"{name}.blend", [*SCENES[name], *scene_frames])
        for name in args.scene_list
    }
    bench.tiny = make_scene(procs, out / "tiny.blend", TINY)
    # Untimed: the first bpy process pays for a cold page cache; the farm's warm-up job
    # pays for the same on its side.
    bench.render(bench.tiny, [1], out / "warmup", persistent=False)

    runs: dict[str, dict[str, list[Run]]] = {n: {"a": [], "b": [], "c": []} for n in scenes}
    for name, scene in scenes.items():
        for r in range(args.repeat):
            print(f"{name} #{r + 1}: (a) ...", end=" ", flush=True)
            runs[name]["a"].append(bench.floor(scene, out / name / f"a{r + 1}"))
            print(f"{runs[name]['a'][-1].seconds:.2f} s; (b) ...", end=" ", flush=True)
            runs[name]["b"].append(bench.per_frame(scene, out / name / f"b{r + 1}"))
            print(f"{runs[name]['b'][-1].seconds:.2f} s", flush=True)

    print("starting the farm ...", end=" ", flush=True)
    started = time.perf_counter()
    bench.farm = LocalFarm(procs, out / "farm", out / "farm.log")
    bench.farm.start()
    print(f"up in {time.perf_counter() - started:.1f} s at {bench.farm.url}; warm-up job ...")
    started = time.perf_counter()
    bench.tiny_job()
    warm = time.perf_counter() - started
    idle = bench.idle_cost()
    quiet = idle["quiet"]
    print(
        f"warm-up job {warm:.1f} s; the idle farm uses "
        f"{quiet['farm_cpu_s'] / quiet['seconds']:.0%} of a core"
    )
    for name, scene in scenes.items():
        for r in range(args.repeat):
            print(f"{name} #{r + 1}: (c) ...", end=" ", flush=True)
            runs[name]["c"].append(bench.rayfarm(scene, out / name / f"c{r + 1}"))
            print(f"{runs[name]['c'][-1].seconds:.2f} s", flush=True)
    bench.farm.stop()

    results: dict[str, Any] = {
        "machine": info,
        "config": {"frames": args.frames, "repeat": args.repeat},
        "farm": {"warmup_job_s": round(warm, 3), "idle": idle},
        "scenes": {},
    }
    for name in scenes:
        result = summarize(name, runs[name], args.frames)
        differ = {
            f"({w})": same_images(out / name / "a1", out / name / f"{w}1", args.frames)
            for w in "bc"
        }
        result["pixels_differ_from_a"] = differ
        results["scenes"][name] = result
        print_table(name, result, args.repeat, differ)
    print_summary(results, args.repeat)
    verdicts = [ok for r in results["scenes"].values() for ok in r["pass"].values()]
    print(f"\noverall: {pass_fail(all(verdicts))}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    out = (args.out or Path(tempfile.mkdtemp(prefix="rayfarm-bench-"))).resolve()
    if args.out is not None and (out / "farm").exists():
        shutil.rmtree(out / "farm")  # a farm's old jobs would be resumed on start
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(Processes(), out, args.frames)

    def work(procs: Processes, _out: Path) -> dict[str, Any]:
        bench.procs = procs
        return measure(args, bench)

    def stop_farm() -> None:
        if bench.farm is not None:
            bench.farm.stop()

    return run_bench(out, args.json, "rayfarm-bench-", work, stop_farm)


if __name__ == "__main__":
    sys.exit(main())
