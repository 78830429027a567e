"""A farm whose storage is S3 (s3fs against moto's server over HTTP)."""

from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import pytest
import s3fs

from rayfarm import Farm, JobState

from helpers.api import S3_ENV
from helpers.blender import pixels, render_reference
from helpers.farms import run_farm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_farm(tmp_path_factory, farm_env, s3_endpoint):
    bucket = f"rayfarm-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(
        key=S3_ENV["AWS_ACCESS_KEY_ID"], secret=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": s3_endpoint},
        skip_instance_cache=True,
    )  # fmt: skip
    fs.mkdir(bucket)
    env = {
        **farm_env, **S3_ENV,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "RAYFARM_STORAGE": f"s3://{bucket}/studio",
        "RAYFARM_CPU_ACTORS": "1",
    }  # fmt: skip
    for farm in run_farm(tmp_path_factory.mktemp("s3farm"), env):
        farm.fs, farm.bucket = fs, bucket
        yield farm


def test_frames_land_in_s3_and_come_back_through_the_api(s3_farm, small_scene, tmp_path):
    with Farm(s3_farm.url) as farm:
        whole = farm.submit(small_scene, frames="1-2")
        tiled = farm.submit(small_scene, frames="3", tiles="2x2")
        for job in (whole, tiled):
            assert job.wait(timeout=300).state is JobState.COMPLETED, job.refresh().error
        got = whole.download(tmp_path / "whole") + tiled.download(tmp_path / "tiled")
    want = render_reference(small_scene, tmp_path / "ref", [1, 2, 3])
    for path in got:
        assert np.array_equal(pixels(path), pixels(want[int(path.stem)])), path
    fs, prefix = s3_farm.fs, f"{s3_farm.bucket}/studio/jobs/{whole.id}"
    fs.invalidate_cache()
    # find (one ListObjects under the prefix) rather than ls: ls reads through s3fs's
    # directory cache and raised FileNotFoundError once for frames that were there.
    assert sorted(fs.find(f"{prefix}/frames/")) == [f"{prefix}/frames/0001.png",
                                                   f"{prefix}/frames/0002.png"]  # fmt: skip
    digest = hashlib.sha256(small_scene.read_bytes()).hexdigest()
    blob = f"{s3_farm.bucket}/studio/blobs/sha256/{digest[:2]}/{digest}"
    assert fs.cat(blob) == small_scene.read_bytes()  # the input, stored once by content
    manifest = json.loads(fs.cat(f"{prefix}/manifest.json"))
    assert manifest["frames"] == {"1": f"jobs/{whole.id}/frames/0001.png",
                                  "2": f"jobs/{whole.id}/frames/0002.png"}  # fmt: skip
    assert not (s3_farm.data_dir / "storage").exists()  # nothing went to local disk


def test_a_textured_scene_and_its_video_go_through_s3(s3_farm, tmp_path):
    """Packed inputs as blobs in S3 (fetched by the actor), frames, previews and the
    video all in the bucket; nothing on local disk."""
    import subprocess

    from helpers.blender import MAKE_SCENE, blender_python

    scene = tmp_path / "project" / "shot.blend"
    scene.parent.mkdir()
    subprocess.run(
        [blender_python(), str(MAKE_SCENE), str(scene), "--width", "64", "--height", "48",
         "--samples", "2", "--frames", "3", "--texture"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with Farm(s3_farm.url) as farm:
        job = farm.submit(scene, frames="1-3", post={"video": {"fps": 3}})
        assert farm.last_upload.files_sent == 2
        assert job.wait(timeout=300).state is JobState.COMPLETED, job.refresh().error
        got = job.download(tmp_path / "farm")
        assert job.image(2).size == (64, 48)
    want = render_reference(scene, tmp_path / "ref", [1, 2, 3])
    for path in got:
        assert np.array_equal(pixels(path), pixels(want[int(path.stem)])), path
    fs, prefix = s3_farm.fs, f"{s3_farm.bucket}/studio/jobs/{job.id}"
    fs.invalidate_cache()
    assert fs.size(f"{prefix}/outputs/video.mp4") > 0
    assert sorted(fs.ls(f"{prefix}/outputs/thumbnails")) == [
        f"{prefix}/outputs/thumbnails/{n:04d}.png" for n in (1, 2, 3)
    ]
    manifest = json.loads(fs.cat(f"{prefix}/manifest.json"))
    assert manifest["outputs"] == {"video": f"jobs/{job.id}/outputs/video.mp4"}
    for n, path in zip((1, 2, 3), got, strict=True):
        entry = manifest["files"][f"jobs/{job.id}/frames/{n:04d}.png"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["size"] == path.stat().st_size
        assert entry["render_s"] > 0 and entry["device"] == "CPU"
    assert not (s3_farm.data_dir / "storage").exists()
