"""Post-processing on a real local farm: the finished frames encoded to MP4 by FFmpeg
(the build imageio-ffmpeg ships), read back with FFmpeg itself."""

from __future__ import annotations

import re
import subprocess
import time

import httpx
import imageio_ffmpeg
import pytest

from rayfarm import JobState

from helpers import AUTH
from helpers.farms import WAIT_S

pytestmark = pytest.mark.slow


def _probe(path) -> tuple[int, float]:
    """(frames, seconds) of a video, decoded by FFmpeg."""
    out = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path),
         "-map", "0:v:0", "-f", "null", "-"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stderr  # fmt: skip
    frames = int(re.findall(r"frame=\s*(\d+)", out)[-1])
    h, m, s = re.search(r"Duration: (\d+):(\d+):([\d.]+)", out).groups()
    return frames, int(h) * 3600 + int(m) * 60 + float(s)


@pytest.mark.parametrize(
    ("frames", "video", "count"),
    [("1-6", {"fps": 12}, 6), ("1-8x2", {"fps": 4, "trim": [3, 7]}, 3)],
    ids=["all", "trimmed"],
)
def test_frames_become_a_video(farm, local_farm, small_scene, tmp_path, frames, video, count):
    job = farm.submit(small_scene, frames=frames, post={"video": video})
    status = job.wait(timeout=WAIT_S)
    assert status.state is JobState.COMPLETED, status.error
    listed = httpx.get(f"{local_farm.url}/jobs/{job.id}/outputs", headers=AUTH).json()["outputs"]
    assert [o["name"] for o in listed] == ["video.mp4"]
    r = httpx.get(listed[0]["url"], headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert len(r.content) == listed[0]["size"]
    path = tmp_path / "video.mp4"
    path.write_bytes(r.content)
    got_frames, seconds = _probe(path)
    assert got_frames == count
    assert seconds == pytest.approx(count / video["fps"], abs=0.05)


def test_a_failed_encode_fails_the_job_and_keeps_the_frames(farm, local_farm, small_scene):
    """A stored frame damaged on disk before the encode (a real fault, through the
    filesystem): FFmpeg cannot decode it; the job fails with FFmpeg's words."""
    job = farm.submit(small_scene, frames="1-16", post={"video": {"fps": 24}})
    first = local_farm.storage_dir / "jobs" / job.id / "frames" / "0001.png"
    deadline = time.monotonic() + WAIT_S
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    first.write_bytes(b"\x89PNG\r\n\x1a\n this is no longer an image")
    status = job.wait(timeout=WAIT_S)
    assert status.state is JobState.FAILED
    assert "video encoding failed (frames kept): FFmpeg failed" in status.error
    assert status.frames_done == 16 and len(job.frames()) == 16
