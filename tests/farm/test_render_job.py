"""`python -m rayfarm.cluster.render_job`: a scene rendered as a plain Ray job, run
directly and through `ray job submit` (JobSubmissionClient) against a real local
Ray cluster with its job server, writing the same outputs and manifest as the
service and exiting non-zero on failure."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rayfarm.cluster.ports import free_port

from helpers import PYTHON
from helpers.blender import pixels, render_reference
from helpers.farms import WAIT_S

pytestmark = pytest.mark.slow

MODULE = [PYTHON, "-m", "rayfarm.cluster.render_job"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYFARM_", "REDIS_URL"))}
    # A Ray of the test's own: no token from ~/.ray, no usage report, a private temp dir.
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAYFARM_CPU_ACTORS="2")
    return env


def _manifest(out: Path) -> dict:
    (path,) = out.glob("jobs/*/manifest.json")
    return json.loads(path.read_text())


def test_render_job_renders_the_same_frames_without_a_service(small_scene, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [*MODULE, str(small_scene), "--frames", "1-3", "--tiles", "1x2", "--samples", "4",
         "--output", out.as_uri(), "--address", "local"],
        capture_output=True, text=True, timeout=WAIT_S, env=_env(tmp_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "started a dispatcher for this job" in run.stdout
    assert "task_done" in run.stdout and "COMPLETED" in run.stdout
    manifest = _manifest(out)
    assert sorted(manifest["frames"]) == ["1", "2", "3"]
    refs = render_reference(small_scene, tmp_path / "ref", [1, 2, 3])
    for frame, key in manifest["frames"].items():
        assert np.array_equal(pixels(out / key), pixels(refs[int(frame)]))


def test_bad_input_exits_2_before_anything_starts(small_scene, tmp_path):
    bad = subprocess.run([*MODULE, str(small_scene), "--frames", "9-1"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "frames" in bad.stderr
    missing = subprocess.run([*MODULE, str(tmp_path / "nope.blend"), "--frames", "1",
                              "--address", "local"], capture_output=True, text=True,
                             timeout=120, env=_env(tmp_path))  # fmt: skip
    assert missing.returncode == 2 and "not found" in missing.stderr


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` with the job server, in a temp dir of its own (so its
    processes are told apart from any other Ray on this machine), stopped after."""
    temp = Path("/tmp") / f"rfj{os.getpid()}{free_port()}"  # Ray's socket paths are short
    dashboard = free_port()
    log = open(tmp_path / "ray-start.log", "wb")  # noqa: SIM115 - closed below
    head = subprocess.Popen(
        [str(Path(PYTHON).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2",
         "--port", str(free_port()), "--include-dashboard", "true", "--dashboard-host",
         "127.0.0.1", "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port",
         str(free_port()), "--temp-dir", str(temp)],
        stdout=log, stderr=subprocess.STDOUT, env=_env(tmp_path), start_new_session=True,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        left = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True)
        for pid in left.stdout.split():
            os.kill(int(pid), signal.SIGKILL)


def _client(url: str):
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:  # the dashboard comes up a little after `ray start` returns
        try:
            return JobSubmissionClient(url)
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _submit(client, entrypoint: str, env: dict[str, str]) -> str:
    deadline = time.monotonic() + 120
    while True:  # and the job agent after the dashboard
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env})
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _finished(client, job_id: str):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + WAIT_S
    while (status := client.get_job_status(job_id)) not in (
        JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED,
    ):  # fmt: skip
        assert time.monotonic() < deadline, "the Ray job did not finish"
        time.sleep(0.5)
    return status


def test_ray_job_submit_renders_and_fails_loudly(ray_head, small_scene, tmp_path):
    from ray.job_submission import JobStatus

    client = _client(ray_head)
    out = tmp_path / "out"
    env = {"RAYFARM_CPU_ACTORS": "2", "RAY_AUTH_MODE": "disabled"}
    job = _submit(client, f"{sys.executable} -m rayfarm.cluster.render_job {small_scene} "
                  f"--frames 1-2 --samples 4 --output {out.as_uri()}", env)  # fmt: skip
    assert _finished(client, job) is JobStatus.SUCCEEDED, client.get_job_logs(job)
    logs = client.get_job_logs(job)
    assert "COMPLETED: 2/2 frames" in logs and "manifest" in logs
    assert sorted(_manifest(out)["frames"]) == ["1", "2"]

    bad = _submit(client, f"{sys.executable} -m rayfarm.cluster.render_job {small_scene} "
                  f"--frames 1 --camera Nope --output {out.as_uri()}", env)  # fmt: skip
    assert _finished(client, bad) is JobStatus.FAILED
    assert "no camera 'Nope'" in client.get_job_logs(bad)
