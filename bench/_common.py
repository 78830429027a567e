"""What the benches share: their processes, the servers they start and a local farm,
scenes, the machine's facts, and a bench's main (how they report: ``_report``).

Every bench starts what it measures as child processes (``Processes``: each in a session
of its own, all stopped at the end), a server as a ``Service`` (waited for until it
answers, stopped with every process ever seen under it), a farm as ``rayfarm up``
(``LocalFarm``, a Service with its own Redis, storage and Ray), scenes with
``examples/make_scene.py`` in the bench's Blender environment (``make_scene``), and
reports through ``run_bench`` (a temp folder, JSON results, exit 0 / 1 / 2 / 130). A bench
imports ``_common`` and ``_report``, never another bench (``_api_servers`` and
``_api_clients`` are parts of ``api.py``).

The driver imports neither bpy nor ray: only the stdlib and the SDK.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

import rayfarm
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

FARM_START_S = 300.0
FARM_STOP_S = 60.0
PROCESS_TIMEOUT_S = 3600.0
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

    def run(
        self,
        cmd: Sequence[object],
        log: Path,
        env: dict[str, str] | None = None,
        timeout_s: float = PROCESS_TIMEOUT_S,
    ) -> float:
        """Run ``cmd`` to the end; return its wall-clock seconds, start to exit."""
        started = time.perf_counter()
        process = self.start(cmd, log, env)
        try:
            rc = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{cmd[1]} ran over {timeout_s:.0f} s; see {log}") from None
        seconds = time.perf_counter() - started
        if rc != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{' '.join(map(str, cmd))} exited {rc}; see {log}:\n{tail}")
        return seconds

    def kill_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                killpg(process.pid)
                process.wait()


def killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def proc_table() -> dict[int, tuple[int, int, str, float]]:
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
        table[int(entry)] = (ppid, start, process_name(argv), cpu)
    return table


def kill_seen(seen: dict[int, int]) -> None:
    """SIGKILL each process of ``seen`` (pid -> start ticks) still running: those that
    left their parent's session (Ray's workers), never a later process given the pid."""
    table = proc_table()
    for pid, start in seen.items():
        if pid in table and table[pid][1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


#: A process tree at one moment: pid -> (start ticks, name, CPU seconds so far).
Tree = dict[int, tuple[int, str, float]]


def descendants(root: int, table: dict[int, tuple[int, int, str, float]] | None = None) -> Tree:
    """``root`` and every process under it now (in ``table``, a ``proc_table`` read by
    the caller, when given)."""
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: Tree = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            _, start, name, seconds = table[pid]
            found[pid] = (start, name, seconds)
        todo.extend(children.get(pid, []))
    return found


def process_name(argv: list[str]) -> str:
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


def cpu_by_name(before: Tree, after: Tree) -> dict[str, float]:
    """CPU seconds each process name used between two looks at a tree, most first (a pid
    given to a new process meanwhile counts from zero)."""
    used: dict[str, float] = {}
    for pid, (start, name, seconds) in after.items():
        old = before.get(pid)
        used[name] = used.get(name, 0.0) + seconds - (old[2] if old and old[0] == start else 0.0)
    return dict(sorted(used.items(), key=lambda kv: -kv[1]))


def bench_env() -> dict[str, str]:
    """The driver's environment less the farm settings and Ray address it may carry:
    what the bench starts gets its own Redis, storage and Ray."""
    return {k: v for k, v in os.environ.items() if k not in (*FARM_ENV_DROP, "RAY_ADDRESS")}


def answers(url: str, token: str) -> bool:
    """Whether ``GET url`` with ``token`` answers 200 now."""
    try:
        r = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=2.0)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


# -- servers and the farm ---------------------------------------------------------------------


class Service:
    """A server the bench starts: a child process in a session of its own, waited for
    until it answers, and stopped with every process ever seen under it (Ray's workers
    start sessions of their own, so its process group is not enough)."""

    def __init__(self, name: str, procs: Processes, log: Path) -> None:
        self.name, self.procs, self.log = name, procs, log
        self.process: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, int] = {}  # every descendant ever seen: pid -> start ticks

    def launch(self, cmd: Sequence[object], env: dict[str, str]) -> None:
        self.process = self.procs.start(cmd, self.log, env)

    def wait_for(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Until ``ready()``; BenchError when the process exits or ``timeout_s`` passes."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise BenchError(
                    f"{self.name} exited ({self.process.returncode}); see {self.log}:\n{tail}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not answer in {timeout_s:.0f} s; see {self.log}")
            time.sleep(0.2)

    def tree(self, table: dict[int, tuple[int, int, str, float]] | None = None) -> Tree:
        """Every process under the server now, or in ``table`` (each noted, to be stopped
        with it)."""
        if self.process is None:
            return {}
        found = descendants(self.process.pid, table)
        self.seen.update((pid, start) for pid, (start, _, _) in found.items())
        return found

    def shut_down(self, sig: signal.Signals, timeout_s: float) -> None:
        """``sig`` (the server then stops what it started); after ``timeout_s``, kill its
        process group; then any process ever seen under it that is still there."""
        process = self.process
        if process is None:
            return
        try:
            if process.poll() is None:
                self.tree()  # note every process under it now
                process.send_signal(sig)
                process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            print(f"{self.name} did not stop in {timeout_s:.0f} s: killing it", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"interrupted again: killing {self.name}", file=sys.stderr)
        finally:
            self.process = None
            killpg(process.pid)  # what is left in its session: Redis, Ray's own daemons
            process.wait()
            kill_seen(self.seen)


@dataclass
class CpuSnapshot:
    at: float
    processes: Tree
    driver: float


class LocalFarm(Service):
    """``rayfarm up`` in a subprocess of its own session, with its data in ``data_dir``."""

    def __init__(self, procs: Processes, data_dir: Path, log: Path) -> None:
        super().__init__("the farm", procs, log)
        self.data_dir = data_dir
        self.client: rayfarm.Farm | None = None
        self.port = 0
        self.env: dict[str, str] = {}  # settings for this farm (RAYFARM_CPU_ACTORS, ...)
        self.token = "rf_" + secrets.token_urlsafe(32)  # the farm's first admin

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        """The headers of a request as the farm's first admin."""
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> rayfarm.Farm:
        self.port = free_port()
        env = bench_env()
        env["RAY_ADDRESS"] = "local"  # a Ray of its own, never a cluster found on the machine
        env["RAYFARM_ADMIN_TOKEN"] = self.token  # its first admin: the bench
        env.update(self.env)
        cmd = [PYTHON, "-m", "rayfarm", "up", "--port", str(self.port)]
        self.launch([*cmd, "--data-dir", str(self.data_dir)], env)
        client = self.client = rayfarm.Farm(self.url, token=self.token)

        def healthy() -> bool:
            try:
                client.health()
                return True
            except rayfarm.FarmError:
                return False

        self.wait_for(healthy, FARM_START_S)
        return client

    def catalogue_s(self, scene: Path) -> float | None:
        """How long the farm took to catalogue ``scene`` (once per scene: made beside
        its first job), from its entry (``GET /scenes/{id}``); None if it has none."""
        with pack_scene(scene) as packed:
            files = tuple(InputFile(f.path, f.sha256, f.size) for f in packed.files)
            digest = Inputs("", packed.main, files).digest
        r = httpx.get(f"{self.url}/scenes/{digest}", headers=self.auth)
        return float(r.json().get("catalogue_s", 0.0)) if r.status_code == 200 else None

    def cpu(self) -> CpuSnapshot:
        """CPU seconds of every process under the farm, and of this driver."""
        found = self.tree()
        own = resource.getrusage(resource.RUSAGE_SELF)
        return CpuSnapshot(time.perf_counter(), found, own.ru_utime + own.ru_stime)

    def stop(self) -> None:
        """SIGINT (``rayfarm up`` then stops what it started), then as ``shut_down``."""
        if self.client is not None:
            self.client.close()
        self.shut_down(signal.SIGINT, FARM_STOP_S)


def cpu_delta(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, Any]:
    """CPU seconds each farm process used between two snapshots, by name."""
    by_name = cpu_by_name(before.processes, after.processes)
    renders = ("ray::RenderActor", "blender worker")  # the actor and its Blender workers
    actor = sum(s for n, s in by_name.items() if n.startswith(renders))
    others = {n: round(s, 2) for n, s in by_name.items() if round(s, 2)}
    others = {n: s for n, s in others.items() if not n.startswith(renders)}
    return {
        "seconds": round(after.at - before.at, 3),
        "actor_cpu_s": round(actor, 2),
        "farm_cpu_s": round(sum(others.values()), 2),
        "farm_by_process": others,
        "driver_cpu_s": round(after.driver - before.driver, 2),
    }


def make_scene(procs: Processes, path: Path, extra: list[str]) -> Path:
    procs.run([blender_python(), MAKE_SCENE, path, *extra], path.with_suffix(".log"))
    return path


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


def add_output_options(p: argparse.ArgumentParser, out_help: str = "") -> None:
    """Every bench's ``--out`` (its working folder) and ``--json`` (its results)."""
    p.add_argument("--out", type=Path, help=out_help or "working folder (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the results here as JSON")


def run_bench(
    out: Path | None,
    json_path: Path | None,
    prefix: str,
    work: Callable[[Processes, Path], dict[str, Any]],
    cleanup: Callable[[], None] | None = None,
    passed: Callable[[dict[str, Any]], bool] | None = None,
) -> int:
    """A bench's main: ``work(procs, out)`` measures and reports, into ``out``
    (a fresh temp dir when None); its result goes to ``json_path``. Exit 0 when it ran,
    1 when something broke, 2 when ``passed`` (a bench's ``--check``) says its result
    misses the target, 130 on Ctrl-C or SIGTERM; every process stopped."""
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
        return 2 if passed is not None and not passed(result) else 0
    except (BenchError, rayfarm.FarmError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        if cleanup is not None:
            cleanup()  # a farm the work left running, say (SIGINT, then its session killed)
        procs.kill_all()
