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
import os
import platform
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

import rayfarm
from rayfarm.client import UploadReport
from rayfarm.cluster.ports import free_port
from rayfarm.pack import pack_scene
from rayfarm.render import environments
from rayfarm.render.inputs import InputFile, Inputs

ROOT = Path(__file__).resolve().parent.parent
MAKE_SCENE = ROOT / "examples" / "make_scene.py"
RENDER_FRAMES = Path(__file__).resolve().parent / "render_frames.py"
PYTHON = sys.executable
#: The Blender the benches build scenes with, so the farm renders them with it too, and
#: the one ways (a) and (b) render with (``RAYFARM_BENCH_BLENDER``, default 5.0).
BLENDER = os.environ.get("RAYFARM_BENCH_BLENDER", "5.0")


def blender_python() -> str:
    """The interpreter of the bench's Blender environment (built if missing)."""
    return str(environments.install(BLENDER).python)


SCENES: dict[str, list[str]] = {"light": [], "heavy": ["--heavy"]}
TINY = ["--width", "32", "--height", "24", "--samples", "1"]
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
FARM_START_S = 300.0
FARM_STOP_S = 60.0
PROCESS_TIMEOUT_S = 3600.0
JOB_TIMEOUT_S = 3600.0
IDLE_SAMPLE_S = 5.0
#: The farm gets its own Redis, storage and Ray: none of these may leak in.
FARM_ENV_DROP = (
    "REDIS_URL",
    "RAYFARM_STORAGE",
    "RAYFARM_DATA_DIR",
    "RAYFARM_PORT",
    "RAYFARM_CPU_ACTORS",
    "RAYFARM_ACTOR_THREADS",
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The measurement could not be made."""


# -- processes -----------------------------------------------------------------------------


class Processes:
    """Every child process the bench starts, each in a session of its own, so that a
    Ctrl-C at the terminal reaches only the driver and ``kill_all`` can stop each one
    with everything it started."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, cmd: Sequence[object], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [str(c) for c in cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self.started.append(process)
        return process

    def run(self, cmd: Sequence[object], log: Path) -> float:
        """Run ``cmd`` to the end; return its wall-clock seconds, start to exit."""
        started = time.perf_counter()
        process = self.start(cmd, log)
        try:
            rc = process.wait(PROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{cmd[1]} ran over {PROCESS_TIMEOUT_S:.0f} s; see {log}") from None
        seconds = time.perf_counter() - started
        if rc != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{' '.join(map(str, cmd))} exited {rc}; see {log}:\n{tail}")
        return seconds

    def kill_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                _killpg(process.pid)
                process.wait()


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _proc_table() -> dict[int, tuple[int, int, str, float]]:
    """Every process: pid -> (ppid, start time in ticks, name, CPU seconds so far)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces
        ppid, start = int(fields[1]), int(fields[19])
        cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
        table[int(entry)] = (ppid, start, _name(argv), cpu)
    return table


def descendants(root: int) -> dict[int, tuple[int, str, float]]:
    """``root`` and every process under it now: pid -> (start ticks, name, CPU seconds)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            _, start, name, seconds = table[pid]
            found[pid] = (start, name, seconds)
        todo.extend(children.get(pid, []))
    return found


def _name(argv: list[str]) -> str:
    """A short name for a farm process: Ray's titles (``ray::RenderActor``), else the
    program, or the script or module a Python runs."""
    if not argv:
        return "?"
    words = " ".join(argv).split()
    if words[0].startswith("ray::"):
        return words[0].split(".")[0]
    program = os.path.basename(words[0])
    # argv, not words: the worker's -c code is one argument of many words.
    if program.startswith("python") and any(a.endswith("/worker") for a in argv[1:5]):
        return "blender worker"  # a render actor's Blender (supervisor.BOOT PACKAGE_DIR)
    if program.startswith("python"):
        for i, word in enumerate(words[1:], 1):
            if word == "-m" and i + 1 < len(words):
                return " ".join(words[i + 1 : i + 3])
            if word.endswith(".py"):
                return os.path.basename(word)
    return program


# -- the farm ---------------------------------------------------------------------------------


@dataclass
class CpuSnapshot:
    at: float
    processes: dict[int, tuple[int, str, float]]  # pid -> (start ticks, name, CPU s)
    driver: float


class LocalFarm:
    """``rayfarm up`` in a subprocess of its own session, with its data in ``data_dir``."""

    def __init__(self, procs: Processes, data_dir: Path, log: Path) -> None:
        self.procs, self.data_dir, self.log = procs, data_dir, log
        self.process: subprocess.Popen[bytes] | None = None
        self.client: rayfarm.Farm | None = None
        self.port = 0
        self.seen: dict[int, int] = {}  # every descendant ever seen: pid -> start ticks
        self.env: dict[str, str] = {}  # settings for this farm (RAYFARM_CPU_ACTORS, ...)
        self.token = "rf_" + secrets.token_urlsafe(32)  # the farm's first admin

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> rayfarm.Farm:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in FARM_ENV_DROP}
        env["RAY_ADDRESS"] = "local"  # a Ray of its own, never a cluster found on the machine
        env["RAYFARM_ADMIN_TOKEN"] = self.token  # its first admin: the bench
        env.update(self.env)
        cmd = [PYTHON, "-m", "rayfarm", "up", "--port", str(self.port)]
        self.process = self.procs.start([*cmd, "--data-dir", str(self.data_dir)], self.log, env)
        self.client = rayfarm.Farm(self.url, token=self.token)
        deadline = time.monotonic() + FARM_START_S
        while True:
            if self.process.poll() is not None:
                raise BenchError(f"the farm exited ({self.process.returncode}); see {self.log}")
            try:
                self.client.health()
                return self.client
            except rayfarm.FarmError:
                if time.monotonic() > deadline:
                    raise BenchError(f"the farm did not answer in time; see {self.log}") from None
                time.sleep(0.25)

    def catalogue_s(self, scene: Path) -> float | None:
        """How long the farm took to catalogue ``scene`` (once per scene: made beside
        its first job), from its entry (``GET /scenes/{id}``); None if it has none."""
        with pack_scene(scene) as packed:
            files = tuple(InputFile(f.path, f.sha256, f.size) for f in packed.files)
            digest = Inputs("", packed.main, files).digest
        r = httpx.get(
            f"{self.url}/scenes/{digest}", headers={"Authorization": f"Bearer {self.token}"}
        )
        return float(r.json().get("catalogue_s", 0.0)) if r.status_code == 200 else None

    def cpu(self) -> CpuSnapshot:
        """CPU seconds of every process under the farm, and of this driver."""
        assert self.process is not None
        found = descendants(self.process.pid)
        self.seen.update((pid, start) for pid, (start, _, _) in found.items())
        own = resource.getrusage(resource.RUSAGE_SELF)
        return CpuSnapshot(time.perf_counter(), found, own.ru_utime + own.ru_stime)

    def stop(self) -> None:
        """SIGINT (``rayfarm up`` then stops what it started); after FARM_STOP_S, kill
        its process group; then any process ever seen under it that is still there."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.cpu()  # note every process under it now: Ray's workers have sessions of their own
        process, self.process = self.process, None
        if self.client is not None:
            self.client.close()
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                process.wait(FARM_STOP_S)
        except subprocess.TimeoutExpired:
            print(f"the farm did not stop in {FARM_STOP_S:.0f} s: killing it", file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted again: killing the farm", file=sys.stderr)
        finally:
            _killpg(process.pid)  # what is left in its session: Redis, Ray's own daemons
            process.wait()
            table = _proc_table()
            for pid, start in self.seen.items():
                if pid in table and table[pid][1] == start:  # that process, not a reused pid
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def _cpu_delta(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, Any]:
    """CPU seconds each farm process used between two snapshots, by name."""
    by_name: dict[str, float] = {}
    for pid, (start, name, seconds) in after.processes.items():
        old = before.processes.get(pid)
        used = seconds - (old[2] if old is not None and old[0] == start else 0.0)
        by_name[name] = by_name.get(name, 0.0) + used
    renders = ("ray::RenderActor", "blender worker")  # the actor and its Blender workers
    actor = sum(s for n, s in by_name.items() if n.startswith(renders))
    others = {n: round(s, 2) for n, s in sorted(by_name.items(), key=lambda kv: -kv[1]) if s}
    others = {n: s for n, s in others.items() if not n.startswith(renders)}
    return {
        "seconds": round(after.at - before.at, 3),
        "actor_cpu_s": round(actor, 2),
        "farm_cpu_s": round(sum(others.values()), 2),
        "farm_by_process": others,
        "driver_cpu_s": round(after.driver - before.driver, 2),
    }


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
        return {"quiet": _cpu_delta(before, self.farm.cpu())}

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
            "cpu": _cpu_delta(before, after),
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


def make_scene(procs: Processes, path: Path, extra: list[str]) -> Path:
    procs.run([blender_python(), MAKE_SCENE, path, *extra], path.with_suffix(".log"))
    return path


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


def machine() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "bpy": environments.environment(BLENDER).info().get("bpy", "not installed"),
        "ray": version("ray"),
        "rayfarm": rayfarm.__version__,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


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
    print(f"  {'way':<30} {'total s':>9} {'s/frame':>9}")
    for way, label in WAYS.items():
        print(f"  {label:<30} {result['median_s'][way]:>9.2f} {result['per_frame_s'][way]:>9.3f}")
    print(f"  {'ratio':<30} {'value':>9} {'target':>9}  result")
    for ratio, value in result["ratios"].items():
        verdict = "PASS" if result["pass"][ratio] else "FAIL"
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
            f"{'PASS' if result['pass']['c/a'] else 'FAIL'}   (c) runs {runs} s, (a) "
            + ", ".join(f"{x:.2f}" for x in result["runs_s"]["a"])
            + " s"
        )


# -- main -----------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=8, help="frames 1..N of each scene (8)")
    p.add_argument("--repeat", type=int, default=1, help="times to measure each way (1)")
    p.add_argument("--scenes", default="light,heavy", help="comma-separated: light,heavy")
    p.add_argument("--out", type=Path, help="scenes, renders, logs, farm data (a temp dir)")
    p.add_argument("--json", type=Path, help="also write the results here as JSON")
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
    print(f"\noverall: {'PASS' if all(verdicts) else 'FAIL'}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    out = (args.out or Path(tempfile.mkdtemp(prefix="rayfarm-bench-"))).resolve()
    if args.out is not None and (out / "farm").exists():
        shutil.rmtree(out / "farm")  # a farm's old jobs would be resumed on start
    out.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C (KeyboardInterrupt), through the finally below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    bench = Bench(Processes(), out, args.frames)
    try:
        results = measure(args, bench)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
            print(f"results: {args.json}")
        return 0
    except (BenchError, rayfarm.FarmError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        if bench.farm is not None:
            bench.farm.stop()
        bench.procs.kill_all()


def run_bench(
    out: Path | None,
    json_path: Path | None,
    prefix: str,
    work: Callable[[Processes, Path], dict[str, Any]],
) -> int:
    """A sibling bench's main: ``work(procs, out)`` measures and reports, into ``out``
    (a fresh temp dir when None); its result goes to ``json_path``. Exit 0 when it ran,
    1 when something broke, 130 on Ctrl-C or SIGTERM; every process stopped."""
    folder = (out or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    procs = Processes()
    try:
        result = work(procs, folder)
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
            print(f"results: {json_path}")
        return 0
    except (BenchError, rayfarm.FarmError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.kill_all()


if __name__ == "__main__":
    sys.exit(main())
