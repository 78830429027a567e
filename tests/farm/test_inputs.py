"""Scenes with their dependencies, on a real local farm: packed with blender-asset-tracer,
uploaded by content hash (once), laid out on the render actor so every path resolves,
and compared with bpy's own render of the scene where it was made."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest

from rayfarm import JobState, MissingDependencies

from helpers import AUTH
from helpers.blender import blender_python, pixels, render_reference
from helpers.farms import WAIT_S, completed

pytestmark = pytest.mark.slow

SCENE = ("--width", "64", "--height", "48", "--samples", "4", "--frames", "2")


@pytest.fixture
def project(tmp_path):
    """A project folder with a scene whose ground texture is relative (``//textures``)
    and whose cube texture lives outside the project, by absolute path."""
    import subprocess

    from helpers.blender import MAKE_SCENE

    scene = tmp_path / "project" / "shots" / "shot.blend"
    scene.parent.mkdir(parents=True)
    outside = tmp_path / "library" / "cube.png"
    subprocess.run(
        [blender_python(), str(MAKE_SCENE), str(scene), *SCENE, "--texture",
         "--abs-texture", str(outside)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return scene


def test_a_textured_scene_renders_as_it_does_where_it_was_made(farm, project, tmp_path):
    job = completed(farm.submit(project, frames="1-2"))
    report = farm.last_upload
    assert report is not None and report.files == 3 and report.missing == []
    want = render_reference(project, tmp_path / "ref", [1, 2])
    for path in job.download(tmp_path / "farm"):
        assert np.array_equal(pixels(path), pixels(want[int(path.stem)])), path.name
    # Not a coincidence of untextured renders: without the textures bpy renders another image.
    shutil.rmtree(project.parent / "textures")
    pink = render_reference(project, tmp_path / "pink", [1])
    assert not np.array_equal(pixels(pink[1]), pixels(want[1]))


def test_an_unchanged_resubmit_uploads_no_file_bytes(farm, project, tmp_path):
    first = farm.submit(project, frames="1")
    sent_first = farm.last_upload
    again = farm.submit(project, frames="1")
    assert farm.last_upload.files_sent == 0 and farm.last_upload.bytes_sent == 0
    assert sent_first.bytes_total == farm.last_upload.bytes_total
    # One texture changes: only it goes up.
    texture = project.parent / "textures" / "checker.png"
    texture.write_bytes(texture.read_bytes() + b"\0")  # still a valid PNG (trailing byte)
    changed = farm.submit(project, frames="1")
    report = farm.last_upload
    assert (report.files_sent, report.bytes_sent) == (1, texture.stat().st_size)
    for job in (first, again, changed):
        completed(job)


def test_a_missing_dependency_stops_the_submission_before_upload(farm, project):
    (project.parent / "textures" / "checker.png").unlink()
    before = farm.jobs(limit=500)
    with pytest.raises(MissingDependencies) as err:
        farm.submit(project, frames="1")
    assert "checker.png" in str(err.value)
    assert any(p.endswith("checker.png") for p in err.value.detail["missing"])
    assert len(farm.jobs(limit=500)) == len(before)
    job = completed(farm.submit(project, frames="1", allow_missing=True))
    assert farm.last_upload.missing and job.spec.allow_missing


def test_the_render_actor_fails_a_scene_whose_files_were_not_sent(farm, local_farm, project):
    """A plain upload of the .blend alone (a simple client): the actor finds the texture
    missing after opening the file and fails the job naming it, instead of rendering pink."""
    with open(project, "rb") as f:
        r = httpx.post(
            f"{local_farm.url}/jobs",
            files={"scene": ("shot.blend", f)},
            data={"spec": '{"frames": "1"}'},
            headers=AUTH,
            timeout=60,
        )
    assert r.status_code == 201, r.text
    job = farm.job(r.json()["id"])
    status = job.wait(timeout=WAIT_S)
    assert status.state is JobState.FAILED
    assert "not uploaded with it" in status.error and "//textures/checker.png" in status.error


def test_a_linked_library_outside_the_project_is_packed_and_renders(farm, tmp_path):
    """The prop comes from a .blend linked from outside the project (``//../library``):
    it travels under _outside_project/ with the link rewritten, and renders."""
    import subprocess

    from helpers.blender import MAKE_SCENE

    scene = tmp_path / "project" / "shot.blend"
    scene.parent.mkdir()
    library = tmp_path / "library" / "props.blend"
    subprocess.run(
        [blender_python(), str(MAKE_SCENE), str(scene), *SCENE, "--library", str(library)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    info = farm.inspect(scene)
    paths = [f["path"] for f in info["files"]]
    assert "shot.blend" in paths and any(p.endswith("library/props.blend") for p in paths)
    assert info["missing"] == []
    job = completed(farm.submit(scene, frames="1"))
    (got,) = job.download(tmp_path / "farm")
    want = render_reference(scene, tmp_path / "ref", [1])[1]
    assert np.array_equal(pixels(got), pixels(want))
    # The prop is really there: without its library the scene renders differently.
    library.unlink()
    without = render_reference(scene, tmp_path / "without", [1])[1]
    assert not np.array_equal(pixels(without), pixels(want))
