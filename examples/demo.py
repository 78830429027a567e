"""The demo `make demo` runs: a local farm renders the example scene end to end.

1. builds the example scene with bpy (examples/make_scene.py: 320x240, 8 frames), in the
   Blender 5.3 environment `make setup` built (bpy never loads in this process);
2. starts a farm on this machine (`rayfarm up`: local Ray, Redis, the Serve app);
3. submits frames 1-8, and frame 1 again split into 2x2 tiles;
4. waits, downloads the frames, prints where they are, and stops the farm.

Everything lands under ./out/demo (the farm's data dir included).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import rayfarm
from rayfarm.cluster.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
#: The Blender the demo's scene is saved by (the current release; one the farm offers).
DEMO_BLENDER = "5.3"
OUT = ROOT / "out" / "demo"


#: The demo farm's first admin: this script (rayfarm up makes it the admin's token).
TOKEN = "rf_" + secrets.token_urlsafe(32)


def start_farm(port: int) -> subprocess.Popen[bytes]:
    log = open(OUT / "farm.log", "wb")  # noqa: SIM115 - the farm writes here until it stops
    farm = subprocess.Popen(
        [sys.executable, "-m", "rayfarm", "up", "--port", str(port), "--data-dir",
         str(OUT / "farm")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RAYFARM_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if farm.poll() is not None:
            sys.exit(f"the farm exited; see {OUT / 'farm.log'}")
        try:
            rayfarm.Farm(url).health()
            return farm
        except rayfarm.FarmError:
            time.sleep(0.5)
    farm.send_signal(signal.SIGINT)
    sys.exit(f"the farm did not start in time; see {OUT / 'farm.log'}")


def blender_python() -> str:
    """The interpreter of this machine's Blender 5.3 environment (`rayfarm blender install`):
    the farm renders the scene with the Blender that saved it."""
    listed = subprocess.run(
        [sys.executable, "-m", "rayfarm", "blender", "list", "--json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    for env in json.loads(listed.stdout)["environments"]:
        if env["version"] == DEMO_BLENDER:
            return str(Path(env["path"]) / "bin" / "python")
    sys.exit(
        f"no Blender {DEMO_BLENDER} environment here: run `rayfarm blender install "
        f"{DEMO_BLENDER}` (make setup does)"
    )


def watch(job: rayfarm.Job, label: str) -> rayfarm.Job:
    """Print each change as the farm reports it (a long-poll, not a busy loop)."""

    def show(status: rayfarm.JobStatus) -> None:
        print(
            f"  {label}: {status.state:<10} frames {status.frames_done}/"
            f"{status.frames_total}  tasks {status.tasks_done}/{status.tasks_total}"
        )

    job.wait(on_change=show)
    return job.refresh()


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    scene = OUT / "example.blend"
    print(f"building the example scene: {scene}")
    subprocess.run(
        [blender_python(), str(ROOT / "examples" / "make_scene.py"), str(scene)],
        check=True, capture_output=True,
    )  # fmt: skip
    port = int(os.environ.get("RAYFARM_PORT") or free_port())
    print(f"starting a local farm on port {port} (log: {OUT / 'farm.log'})")
    process = start_farm(port)
    try:
        with rayfarm.Farm(f"http://127.0.0.1:{port}", token=TOKEN) as farm:
            started = time.perf_counter()
            frames = farm.submit(scene, frames="1-8")
            tiled = farm.submit(scene, frames="1", tiles="2x2")
            print(f"submitted {frames.id} (frames 1-8) and {tiled.id} (frame 1 as 2x2 tiles)")
            results = [watch(frames, "frames 1-8"), watch(tiled, "2x2 tiles")]
            print(f"rendered in {time.perf_counter() - started:.1f} s on {results[0].device} "
                  f"with Blender {results[0].rendered_by}")  # fmt: skip
            failed = [j for j in results if j.state is not rayfarm.JobState.COMPLETED]
            for job in failed:
                print(f"job {job.id} {job.state}: {job.error}", file=sys.stderr)
            for job, name in zip(results, ["frames", "tiled"], strict=True):
                paths = job.download(OUT / name)
                print(f"{len(paths)} frame(s) of job {job.id} in {OUT / name}:")
                for path in paths:
                    print(f"  {path}")
            return 1 if failed else 0
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
        print("farm stopped")


if __name__ == "__main__":
    sys.exit(main())
