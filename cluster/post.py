"""Post-processing, the job's final step: the finished frames encoded to video.

FFmpeg comes from ``RAYFARM_FFMPEG`` if set, else the static build the
``imageio-ffmpeg`` package ships (x264, x265, AOM AV1), else ``ffmpeg`` on the PATH.
Frames are fetched from storage into a temporary folder as a gap-free sequence (a
job's frames may be ``1-100x2``), so storage may be S3; odd frame sizes are padded
by one pixel (4:2:0 video needs even sizes). FFmpeg runs with ``-xerror``, so a
frame it cannot decode stops the encode instead of leaving a silent gap. A failure
raises ``PostError`` with FFmpeg's own message; the frames stay where they are.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

from rayfarm.cluster import storage as layout
from rayfarm.cluster.storage import Storage
from rayfarm.errors import RenderError
from rayfarm.models import VideoSpec

__all__ = ["VIDEO_NAME", "PostError", "encode_video", "ffmpeg_exe"]

VIDEO_NAME = "video.mp4"
ENCODE_TIMEOUT_S = 3600
_ENCODERS = {"h264": "libx264", "h265": "libx265", "av1": "libaom-av1"}


class PostError(RenderError):
    """Post-processing failed (the frames are kept)."""


def ffmpeg_exe() -> str:
    explicit = os.environ.get("RAYFARM_FFMPEG")
    if explicit:
        return explicit
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        found = shutil.which("ffmpeg")
        if found is None:
            raise PostError(
                "no FFmpeg: install rayfarm[cluster] (imageio-ffmpeg), put ffmpeg on the "
                "PATH, or set RAYFARM_FFMPEG"
            ) from None
        return found


def encode_video(
    storage: Storage, job_id: str, frames: dict[int, str], video: VideoSpec
) -> tuple[str, int, float]:
    """Encode the stored ``frames`` ({frame: key}) to ``outputs/video.mp4``; return
    (key, frames encoded, seconds)."""
    started = time.perf_counter()
    chosen = sorted(f for f in frames if video.trim is None or video.trim[0] <= f <= video.trim[1])
    if not chosen:
        raise PostError("no stored frame falls inside post.video.trim")
    with tempfile.TemporaryDirectory(prefix="rayfarm-video-") as tmp:
        for i, frame in enumerate(chosen):
            with open(os.path.join(tmp, f"{i:06d}.png"), "wb") as f:
                for block in storage.iter_bytes(frames[frame]):
                    f.write(block)
        out = os.path.join(tmp, VIDEO_NAME)
        cmd = [
            ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-xerror", "-y",
            "-framerate", f"{video.fps:g}", "-i", os.path.join(tmp, "%06d.png"),
            "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", _ENCODERS[video.codec],
            "-pix_fmt", "yuv420p", "-movflags", "+faststart", out,
        ]  # fmt: skip
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=ENCODE_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise PostError(f"FFmpeg ran over {ENCODE_TIMEOUT_S} s") from None
        if done.returncode != 0 or not os.path.exists(out):
            lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
            message = " / ".join(lines[-5:]) or f"exit status {done.returncode}"
            raise PostError(f"FFmpeg failed: {message}")
        key = f"{layout.outputs_prefix(job_id)}/{VIDEO_NAME}"
        with open(out, "rb") as video_file:
            storage.put_stream(key, video_file)
    return key, len(chosen), time.perf_counter() - started
