"""One farm, several Blender versions: each job renders with the Blender that saved its
file (or the one it asks for, or the nearest newer one offered), in that version's own
worker process, and its frames are exactly what that bpy renders in-process.

The session's farm offers the default versions, 5.3 and 5.0 (``make setup`` builds
both environments). The same scene rendered by bpy 5.0 and 5.3 differs (2-3% of its
pixels, measured), so a frame equal to one version's reference and not the other's
says which Blender rendered it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from rayfarm import BlenderNotOffered, Farm
from rayfarm.cluster.api import AppContext, create_app
from rayfarm.cluster.local import bootstrap_admin
from rayfarm.cluster.settings import Settings

from helpers import ADMIN_TOKEN, AUTH, PYTHON, ROOT
from helpers.blender import pixels, render_reference
from helpers.farms import completed

pytestmark = pytest.mark.slow

SCENE = ("--width", "64", "--height", "48", "--samples", "4", "--frames", "4")
SAVED_BY_45 = ROOT / "tests" / "fixtures" / "saved-by-4.5.blend"


def _span(farm, job_id: str) -> tuple[str, str]:
    """(first task start, last task end) of a job, as its events' timestamps say."""
    events = farm.events(job_id)
    started = [e["at"] for e in events if e["kind"] == "task_started"]
    done = [e["at"] for e in events if e["kind"] == "task_done"]
    return min(started), max(done)


def _same(got: Path, want: Path) -> bool:
    return bool(np.array_equal(pixels(got), pixels(want)))


def test_a_53_and_a_50_scene_render_in_parallel_each_with_its_own_blender(
    farm, local_farm, make_scene, tmp_path
):
    new = make_scene(*SCENE, blender="5.3")
    old = make_scene(*SCENE, blender="5.0")
    jobs = {
        "5.3": farm.submit(new, frames="1-4"),
        "5.0": farm.submit(old, frames="1-4"),
        "5.3 tiled": farm.submit(new, frames="2", tiles="2x2"),
        "5.0 tiled": farm.submit(old, frames="2", tiles="2x2"),
    }
    for job in jobs.values():
        completed(job)
    for label, scene in (("5.3", new), ("5.0", old)):
        version, other = label, "5.0" if label == "5.3" else "5.3"
        whole, tiled = jobs[label], jobs[f"{label} tiled"]
        assert (whole.saved_by, whole.rendered_by) == (version, version)
        assert (tiled.saved_by, tiled.rendered_by) == (version, version)
        want = render_reference(scene, tmp_path / version, [1, 2, 3, 4], blender=version)
        wrong = render_reference(scene, tmp_path / other, [1], blender=other)
        got = {int(p.stem): p for p in whole.download(tmp_path / f"farm-{version}")}
        assert sorted(got) == [1, 2, 3, 4]
        for frame, path in got.items():
            assert _same(path, want[frame]), f"Blender {version} frame {frame}"
        assert not _same(got[1], wrong[1])  # it is this version's render, not the other's
        (frame2,) = tiled.download(tmp_path / f"tiled-{version}")
        assert _same(frame2, want[2]), f"Blender {version}'s 2x2 tiles"
        workers = {e["worker"] for e in local_farm.events(whole.id) if e["kind"] == "task_done"}
        assert "0" not in workers and workers
    # Both versions rendered at the same time: each job's span overlaps the other's.
    (a0, a1), (b0, b1) = _span(local_farm, jobs["5.3"].id), _span(local_farm, jobs["5.0"].id)
    assert a0 < b1 and b0 < a1


def test_a_45_file_renders_with_the_nearest_newer_version_and_says_so(farm, local_farm, tmp_path):
    """A file saved by 4.5 LTS on a farm of 5.3 and 5.0: 5.0 renders it, the job carries
    the warning, and the frames equal bpy 5.0's own render of the file."""
    job = completed(farm.submit(SAVED_BY_45, frames="1-2"))
    assert (job.saved_by, job.rendered_by) == ("4.5", "5.0")
    warnings = [e["message"] for e in local_farm.events(job.id) if e["kind"] == "warning"]
    assert (
        "saved by Blender 4.5, rendering with Blender 5.0, the nearest newer version this "
        "farm offers (it offers 5.3, 5.0)" in warnings
    )
    want = render_reference(SAVED_BY_45, tmp_path / "ref", [1, 2], blender="5.0")
    for path in job.download(tmp_path / "farm"):
        assert _same(path, want[int(path.stem)]), path.name
    # The CLI's status line says both.
    out = subprocess.run(
        [PYTHON, "-m", "rayfarm", "--url", local_farm.url, "status", job.id],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "Blender 5.0 (saved by 4.5)" in out.stdout


def test_a_job_may_ask_for_an_offered_version_and_not_for_another(farm, make_scene, tmp_path):
    scene = make_scene(*SCENE, blender="5.0")
    newest = [j.id for j in farm.jobs(limit=1)]
    with pytest.raises(BlenderNotOffered) as err:
        farm.submit(scene, frames="1", blender="4.2")
    assert "Blender 4.2, which this farm does not offer (it offers 5.3, 5.0)" in str(err.value)
    assert [j.id for j in farm.jobs(limit=1)] == newest  # nothing queued
    job = completed(farm.submit(scene, frames="1", blender="5.3"))
    assert (job.saved_by, job.rendered_by) == ("5.0", "5.3")
    want = render_reference(scene, tmp_path / "ref", [1], blender="5.3")
    (got,) = job.download(tmp_path / "farm")
    assert _same(got, want[1])


def test_a_scene_is_catalogued_by_the_blender_that_renders_it(farm, make_scene):
    info = farm.inspect(make_scene(*SCENE, blender="5.3"))
    assert info["saved_by"].startswith("5.3") and info["read_by"].startswith("5.3.")
    assert farm.inspect(SAVED_BY_45)["read_by"].startswith("5.0.")


def test_a_53_file_on_a_50_only_farm_is_refused_naming_what_it_offers(
    redis_url, tmp_path, make_scene
):
    settings = Settings(
        redis_url=redis_url, storage=(tmp_path / "storage").as_uri(), data_dir=str(tmp_path),
        blender=("5.0",),
    )  # fmt: skip
    bootstrap_admin(redis_url, ADMIN_TOKEN)
    scene = make_scene(*SCENE, blender="5.3")
    with TestClient(create_app(AppContext.build(settings)), headers=AUTH) as client:
        r = client.post(
            "/jobs",
            files={"scene": ("shot.blend", scene.read_bytes())},
            data={"spec": '{"frames": "1"}'},
        )
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "scene_too_new"
        assert (
            "saved by Blender 5.3, newer than every Blender this farm offers (5.0)"
            in (error["message"])
        )
        assert error["detail"] == {"file_version": "5.3", "offered": ["5.0"]}
    stored = tmp_path / "storage"
    assert not stored.exists() or not [p for p in stored.rglob("*") if p.is_file()]


def test_the_farm_says_what_it_offers(local_farm):
    with Farm(local_farm.url) as farm:
        health = farm.health()
    assert health["blender"] == ["5.3", "5.0"]
    assert health["workers"]["count"] == 2
    assert set(health["workers"]["blender"]) <= {"5.3", "5.0"}
