"""The `rayfarm` CLI against the real local farm: output, exit codes, bad input."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess

import pytest

from rayfarm.cluster.ports import free_port

from helpers import PYTHON

pytestmark = pytest.mark.slow


def cli(*args: str, url: str | None = None, timeout: int = 300, token: str | None = None):
    env_url = ["--url", url] if url else []
    env = {**os.environ, **({"RAYFARM_TOKEN": token} if token is not None else {})}
    return subprocess.run(
        [PYTHON, "-m", "rayfarm", *env_url, *args], capture_output=True, text=True,
        timeout=timeout, env=env,
    )  # fmt: skip


def test_submit_wait_json_status_list_download(local_farm, small_scene, tmp_path):
    r = cli("submit", str(small_scene), "--frames", "2-3", "--tiles", "2x2", "--samples", "2",
            "--denoise", "--wait", "--json", url=local_farm.url)  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["state"] == "COMPLETED" and job["frames_done"] == 2 and job["tasks_done"] == 8
    assert (job["spec"]["samples"], job["spec"]["denoise"], job["tiles"]) == (2, True, "2x2")

    r = cli("status", job["id"], url=local_farm.url)
    assert r.returncode == 0 and "COMPLETED" in r.stdout and "frames 2/2" in r.stdout
    r = cli("list", "--state", "COMPLETED", url=local_farm.url)
    assert r.returncode == 0 and job["id"] in r.stdout
    r = cli("download", job["id"], str(tmp_path / "out"), url=local_farm.url)
    assert r.returncode == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0002.png", "0003.png"]
    assert r.stdout.split() == [str(tmp_path / "out" / n) for n in ("0002.png", "0003.png")]


def test_failed_job_exits_1(local_farm, small_scene):
    # A 6x4 frame (10 %) cannot be split into 16x16 tiles: the farm fails the job.
    r = cli("submit", str(small_scene), "--frames", "1", "--resolution", "10", "--tiles",
            "16x16", "--wait", url=local_farm.url)  # fmt: skip
    assert r.returncode == 1
    assert "FAILED" in r.stdout and "cannot be split into 16x16 tiles" in r.stdout
    job_id = r.stdout.split()[0]
    r = cli("status", job_id, url=local_farm.url)
    assert r.returncode == 1 and "FAILED" in r.stdout


def test_cancel_and_refused_retry(local_farm, small_scene):
    r = cli("submit", str(small_scene), "--frames", "1-2000", "--json", url=local_farm.url)
    job_id = json.loads(r.stdout)["id"]
    r = cli("cancel", job_id, url=local_farm.url)
    assert r.returncode == 0 and "CANCELLED" in r.stdout
    r = cli("retry", job_id, url=local_farm.url)
    assert r.returncode == 2 and "cannot become PENDING" in r.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("status", "0123456789abcdef"), "no job 0123456789abcdef"),
        (("submit", "/no/such/scene.blend", "--frames", "1"), "scene file not found"),
        (("submit", "{scene}", "--frames", "5-1"), "backwards"),
        (("submit", "{scene}", "--frames", "1", "--tiles", "2by2"), "tiles"),
        (("submit", "{scene}", "--frames", "1", "--slices", "many"), "slices 'many': slices must"),
        (
            ("submit", "{scene}", "--frames", "1", "--slices", "9", "--samples", "8"),
            "slices 9 is more than the 8 samples of a frame",
        ),
        (("submit", "{scene}", "--frames", "1", "--denoise", "yes"), "unrecognized arguments"),
        (("submit", "{scene}", "--frames", "1", "--camera", "Nope"), "no camera 'Nope'"),
        (("submit", "{not_blend}", "--frames", "1"), "not a .blend"),
        (("submit", "{scene}"), "--frames"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_bad_input_exits_2(local_farm, small_scene, tmp_path, args, fragment):
    not_blend = tmp_path / "notes.blend"
    not_blend.write_text("not a scene")
    args = tuple(a.format(scene=small_scene, not_blend=not_blend) for a in args)
    r = cli(*args, url=local_farm.url)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert fragment in r.stderr


def test_unreachable_farm_exits_3():
    r = cli("list", url="http://127.0.0.1:9")
    assert r.returncode == 3 and "cannot reach the farm" in r.stderr


def test_up_on_a_taken_port_exits_2_before_starting_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = cli("up", "--port", str(port), "--data-dir", str(tmp_path / "farm"), timeout=60)
    assert r.returncode == 2
    assert f"cannot serve on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr
    assert not (tmp_path / "farm" / "redis").exists()


def test_inspect_prints_the_catalogue(local_farm, small_scene):
    r = cli("inspect", str(small_scene), url=local_farm.url)
    assert r.returncode == 0, r.stderr
    assert "* Shot: CYCLES, 64x48 at 100%, frames 1-8, samples 4, camera MainCam" in r.stdout
    r = cli("inspect", str(small_scene), "--json", url=local_farm.url)
    assert r.returncode == 0 and json.loads(r.stdout)["scenes"][0]["cameras"] == ["MainCam"]


def test_tokens_are_made_by_admins_and_sign_users_in(local_farm):
    r = cli("token", "create", "--user", "cli-ana", "--role", "artist", "--project", "p1",
            "--project", "p2", url=local_farm.url)  # fmt: skip
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip().splitlines()[-1]  # the token alone on the last line
    assert re.fullmatch(r"rf_[A-Za-z0-9_-]{43}", token) and "shown once" in r.stderr
    r = cli("whoami", url=local_farm.url, token=token)
    assert r.returncode == 0 and r.stdout.strip() == "cli-ana (artist) projects: p1, p2"
    r = cli("token", "create", "--user", "cli-eve", "--role", "admin", url=local_farm.url,
            token=token)  # fmt: skip
    assert r.returncode == 4 and "this is for admins" in r.stderr
    r = cli("list", url=local_farm.url, token="rf_" + "0" * 43)
    assert r.returncode == 4 and "unknown or malformed token" in r.stderr
    r = cli("token", "create", "--user", "bad name", "--role", "viewer", url=local_farm.url)
    assert r.returncode == 2 and "user name 'bad name'" in r.stderr


def test_up_without_accounts_only_on_loopback_alone(tmp_path):
    r = cli("up", "--no-auth", "--grpc-port", str(free_port()), "--data-dir", str(tmp_path / "f"),
            timeout=60)  # fmt: skip
    assert r.returncode == 2 and "only when the farm listens on loopback alone" in r.stderr
    assert not (tmp_path / "f").exists()  # refused before anything started
