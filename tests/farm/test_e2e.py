"""End to end on a real local farm: `rayfarm up` (Ray, Redis, Serve, two CPU render
actors), the SDK over HTTP, bpy rendering, frames compared with bpy's own renders."""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from rayfarm import InvalidScene, InvalidSpec, InvalidTransition, JobState
from rayfarm.pack import pack_scene
from rayfarm.render.inputs import InputFile, Inputs

from helpers import AUTH
from helpers.blender import blender_python, pixels, render_reference
from helpers.farms import WAIT_S, completed, farm_processes

pytestmark = pytest.mark.slow


def test_frames_equal_a_direct_bpy_render(farm, small_scene, tmp_path):
    job = completed(farm.submit(small_scene, frames="1-3"))
    assert (job.frames_done, job.tasks_done) == (3, 3)
    assert job.device == "CPU"
    assert job.started_at is not None and job.finished_at >= job.started_at
    got = job.download(tmp_path / "farm")
    assert [p.name for p in got] == ["0001.png", "0002.png", "0003.png"]
    want = render_reference(small_scene, tmp_path / "ref", [1, 2, 3])
    for path in got:
        frame = int(path.stem)
        assert np.array_equal(pixels(path), pixels(want[frame])), f"frame {frame} differs"
    # The scene is animated, so equal frames are not a coincidence of identical images.
    assert not np.array_equal(pixels(got[0]), pixels(got[2]))
    assert [f.frame for f in job.frames()] == [1, 2, 3]


@pytest.mark.parametrize(
    ("tiles", "size", "extra"),
    [("2x2", (67, 45), ()), ("3x3", (67, 45), ()), ("3x3", (321, 241), ()),
     ("2x2", (67, 45), ("--grade",))],
    ids=str,
)  # fmt: skip
def test_tiles_equal_the_full_frame(farm, make_scene, tmp_path, tiles, size, extra):
    """Odd frame sizes included: tiles of unequal sizes stitch bit-identically, and a
    graded scene (look, exposure, gamma, curves, transparent film) converts the same."""
    w, h = size
    scene = make_scene("--width", str(w), "--height", str(h), "--samples", "4", *extra)
    job = completed(farm.submit(scene, frames="2,5", tiles=tiles))
    assert job.tasks_done == 2 * int(tiles[0]) ** 2
    assert job.tiles == tiles
    got = job.download(tmp_path / "farm")
    want = render_reference(scene, tmp_path / "ref", [2, 5])
    for path in got:
        a, b = pixels(path), pixels(want[int(path.stem)])
        assert a.shape == (h, w, 4)
        assert np.array_equal(a, b), f"{tiles} frame {path.stem}: max diff {np.abs(a - b).max()}"


def test_overrides_apply(farm, small_scene, tmp_path):
    job = completed(farm.submit(small_scene, frames="4", resolution_percentage=50,
                                 format="png", color_depth=16))  # fmt: skip
    (path,) = job.download(tmp_path)
    ihdr = path.read_bytes()[16:25]  # PNG IHDR: width, height, bit depth
    assert struct.unpack(">IIB", ihdr) == (32, 24, 16)


def test_registered_python_does_not_run(farm, make_scene, tmp_path):
    marker = tmp_path / "scripts-ran"
    scene = make_scene(*("--width", "32", "--height", "24", "--samples", "2"),
                       "--script-marker", str(marker))  # fmt: skip
    job = completed(farm.submit(scene, frames="1"))
    assert job.frames_done == 1
    assert not marker.exists()
    # The scene is armed: opened with auto-execution on, it does create the marker.
    subprocess.run(
        [blender_python(), "-c", "import bpy; bpy.ops.wm.open_mainfile("
         f"filepath={str(scene)!r}, load_ui=False, use_scripts=True)"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert marker.exists()


def _corrupt_dna(src: Path, dst: Path) -> Path:
    """Zero the SDNA block: the file's structure is intact, its contents unreadable."""
    data = bytearray(src.read_bytes())
    offset = 17
    while True:
        code = bytes(data[offset : offset + 4])
        (length,) = struct.unpack("<q", data[offset + 16 : offset + 24])
        if code == b"DNA1":
            data[offset + 32 : offset + 32 + length] = bytes(length)
            break
        offset += 32 + length
    dst.write_bytes(bytes(data))
    return dst


def test_scene_bpy_cannot_open_fails_the_job(farm, local_farm, small_scene, tmp_path):
    """The SDK refuses such a file before upload (it cannot trace it); a plain upload
    reaches the farm, where bpy's failure to open it fails the job."""
    bad = _corrupt_dna(small_scene, tmp_path / "damaged.blend")
    with pytest.raises(InvalidScene, match=r"cannot trace the files damaged\.blend uses"):
        farm.submit(bad, frames="1-2")
    with open(bad, "rb") as f:
        spec = '{"frames": "1-2", "max_retries": 3}'
        r = httpx.post(f"{local_farm.url}/jobs", files={"scene": ("damaged.blend", f)},
                       data={"spec": spec}, headers=AUTH, timeout=60)  # fmt: skip
    assert r.status_code == 201, r.text
    job = farm.job(r.json()["id"])
    status = job.wait(timeout=WAIT_S)
    assert status.state is JobState.FAILED
    assert "Blender could not open the scene" in status.error
    assert "SDNA" in status.error
    assert status.frames_done == 0


def test_a_camera_or_scene_the_file_lacks_is_refused_before_queueing(farm, small_scene):
    before = len(farm.jobs(limit=500))
    with pytest.raises(InvalidSpec) as err:
        farm.submit(small_scene, frames="1", camera="NoSuchCam")
    assert "no camera 'NoSuchCam'" in str(err.value) and "MainCam" in str(err.value)
    assert err.value.detail["choices"] == ["MainCam"]
    with pytest.raises(InvalidSpec, match=r"no scene 'Nope' \(it has: Shot\)"):
        farm.submit(small_scene, frames="1", scene="Nope")
    assert len(farm.jobs(limit=500)) == before


def test_the_catalogue_describes_an_uploaded_scene(farm, local_farm, small_scene):
    info = farm.inspect(small_scene)
    (shot,) = info["scenes"]
    assert (info["active_scene"], shot["name"], shot["camera"]) == ("Shot", "Shot", "MainCam")
    assert shot["resolution"] == [64, 48, 100] and shot["samples"] == 4
    assert (shot["frame_start"], shot["frame_end"], shot["engine"]) == (1, 8, "CYCLES")
    assert [v["name"] for v in shot["view_layers"]] == ["ViewLayer"]
    assert "combined" in shot["view_layers"][0]["passes"]
    assert info["saved_by"].startswith("5.0") and info["missing"] == []
    assert [f["path"] for f in info["files"]] == [small_scene.name]
    assert httpx.get(f"{local_farm.url}/scenes/{info['id']}", headers=AUTH).json() == info
    r = httpx.get(f"{local_farm.url}/scenes/{'0' * 64}", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "scene_not_found"


def test_a_new_scene_is_catalogued_beside_its_first_job(farm, local_farm, make_scene):
    """A job naming no scene or camera is queued without waiting for a second Blender to
    open the file; the catalogue is made beside its render, once: the one POST /scenes
    gives is the same."""
    scene = make_scene("--width", "41", "--height", "31", "--samples", "1", "--frames", "2")
    completed(farm.submit(scene, frames="1"))
    with pack_scene(scene) as packed:
        files = tuple(InputFile(f.path, f.sha256, f.size) for f in packed.files)
        digest = Inputs("", packed.main, files).digest
    url = f"{local_farm.url}/scenes/{digest}"
    _wait_for(lambda: httpx.get(url, headers=AUTH).status_code == 200)
    info = httpx.get(url, headers=AUTH).json()
    assert info["id"] == digest and info["active_scene"] == "Shot"
    assert info["scenes"][0]["resolution"] == [41, 31, 100] and info["catalogue_s"] > 0
    assert farm.inspect(scene) == info


def _wait_for(predicate, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def test_cancel_stops_queued_tasks(farm, small_scene):
    job = farm.submit(small_scene, frames="1-2000")
    _wait_for(lambda: job.status().frames_done >= 2)
    job.cancel()
    assert job.state is JobState.CANCELLED
    done = job.status().frames_done
    time.sleep(2)
    # At most what was already under way finishes: on each of the two actors one frame
    # rendering and one rendered but still being stored (the dispatcher frees an actor
    # before it stores the frame). Uncancelled, ~10 frames a second would land.
    assert job.status().frames_done <= done + 4
    assert job.status().state is JobState.CANCELLED
    with pytest.raises(InvalidTransition):
        job.cancel()
    with pytest.raises(InvalidTransition):
        job.retry()


def test_retry_renders_only_missing_frames(farm, local_farm, small_scene):
    """A storage fault on one frame fails the job after its retries; once the fault
    is gone, retry renders that frame alone and leaves the stored ones untouched."""
    blocker = farm.submit(small_scene, frames="1-2000", priority=100)
    _wait_for(lambda: blocker.status().state is JobState.PROCESSING)
    victim = farm.submit(small_scene, frames="1-4", priority=0, max_retries=1)
    assert victim.status().state is JobState.PENDING  # queued behind the blocker
    frames_dir = local_farm.storage_dir / "jobs" / victim.id / "frames"
    fault = frames_dir / "0003.png"
    fault.mkdir(parents=True)  # a directory where the frame must go: the write fails
    blocker.cancel()

    status = victim.wait(timeout=WAIT_S)
    assert status.state is JobState.FAILED
    assert status.error.startswith("frame 3:") and "failed 2 times" in status.error
    assert status.frames_done == 3
    failures = [e for e in local_farm.events(victim.id) if e["kind"] == "task_failed"]
    assert [(e["frame"], e["attempt"]) for e in failures] == [("3", "1"), ("3", "2")]
    assert failures[0]["actor"] != failures[1]["actor"]  # the retry ran on the other actor
    inodes = {p.name: p.stat().st_ino for p in frames_dir.glob("*.png") if p.is_file()}
    assert sorted(inodes) == ["0001.png", "0002.png", "0004.png"]

    fault.rmdir()
    victim.retry()
    status = victim.wait(timeout=WAIT_S)
    assert status.state is JobState.COMPLETED and status.frames_done == 4
    assert status.error is None
    after = {p.name: p.stat().st_ino for p in frames_dir.glob("*.png")}
    assert {k: after[k] for k in inodes} == inodes  # not rewritten
    assert "0003.png" in after


def test_priority_orders_the_queue(farm, small_scene):
    blocker = farm.submit(small_scene, frames="1-2000", priority=100)
    _wait_for(lambda: blocker.status().state is JobState.PROCESSING)
    low = farm.submit(small_scene, frames="1", priority=10)
    high = farm.submit(small_scene, frames="1", priority=90)
    blocker.cancel()
    assert high.wait(timeout=WAIT_S).state is JobState.COMPLETED
    low_status = low.wait(timeout=WAIT_S)
    assert low_status.state is JobState.COMPLETED
    high.refresh()
    low.refresh()
    assert high.started_at <= low.started_at


def test_more_tiles_than_pixels_fails_once_with_the_reason(farm, make_scene):
    scene = make_scene("--width", "8", "--height", "6", "--samples", "1")
    job = farm.submit(scene, frames="1", tiles="16x16", max_retries=5)
    status = job.wait(timeout=WAIT_S)
    assert status.state is JobState.FAILED
    # Two actors fail tiles at once and the first report wins; fatal, so no retry
    # happened (a spent retry budget would add "(failed N times)").
    assert re.fullmatch(r"frame 1 tile \d+: a 8x6 frame cannot be split into 16x16 tiles",
                        status.error)  # fmt: skip


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _allowed_cores(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            cores: set[int] = set()
            for part in line.split(":")[1].strip().split(","):
                a, _, b = part.partition("-")
                cores.update(range(int(a), int(b or a) + 1))
            return cores
    raise AssertionError("no Cpus_allowed_list")


def test_cpu_actors_are_pinned_to_disjoint_cores_and_idle_quietly(farm, local_farm, small_scene):
    """Two CPU actors on this node share its cores without overlap; an unpinned Cycles
    process with persistent data and fewer threads than cores spins while idle."""
    completed(farm.submit(small_scene, frames="1-2"))
    actors = _render_actor_pids(local_farm)
    assert len(actors) == 2
    first, second = (_allowed_cores(pid) for pid in actors)
    assert first and second and not first & second
    assert first | second == os.sched_getaffinity(0)
    before = {pid: _cpu_seconds(pid) for pid in actors}
    time.sleep(2)
    used = {pid: _cpu_seconds(pid) - before[pid] for pid in actors}
    assert all(seconds < 0.5 for seconds in used.values()), used


def _render_actor_pids(local_farm, name: bytes = b"RenderActor") -> list[int]:
    return [
        pid
        for pid in farm_processes(local_farm.mark) - local_farm.before
        if name in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def test_a_killed_render_actor_is_replaced_and_the_job_completes(farm, local_farm, small_scene):
    job = farm.submit(small_scene, frames="1-30")
    _wait_for(lambda: job.status().frames_done >= 2)
    victim = _render_actor_pids(local_farm)[0]
    os.kill(victim, 9)
    status = job.wait(timeout=WAIT_S)
    assert status.state is JobState.COMPLETED, status.error
    assert status.frames_done == 30
    assert [f.frame for f in job.frames()] == list(range(1, 31))
    pids = _render_actor_pids(local_farm)
    assert len(pids) == 2 and victim not in pids


def test_a_killed_tile_assembler_costs_only_its_frames(farm, local_farm, small_scene, tmp_path):
    """The assembler restarts empty; frames whose tiles it held render again, and every
    frame still equals bpy's own render."""
    job = farm.submit(small_scene, frames="1-8", tiles="2x2")
    _wait_for(lambda: job.status().frames_done >= 1)
    (victim,) = _render_actor_pids(local_farm, b"TileAssembler")
    os.kill(victim, 9)
    status = job.wait(timeout=WAIT_S)
    assert status.state is JobState.COMPLETED, status.error
    assert [f.frame for f in job.frames()] == list(range(1, 9))
    got = job.download(tmp_path / "farm")
    want = render_reference(small_scene, tmp_path / "ref", list(range(1, 9)))
    for path in got:
        assert np.array_equal(pixels(path), pixels(want[int(path.stem)])), path.name
    (after,) = _render_actor_pids(local_farm, b"TileAssembler")
    assert after != victim


def test_download_verifies_skips_and_resumes(farm, local_farm, small_scene, tmp_path):
    job = completed(farm.submit(small_scene, frames="1-2"))
    infos = job.frames()
    assert all(len(i.sha256 or "") == 64 and i.size for i in infos)
    first = job.download(tmp_path)
    data = [p.read_bytes() for p in first]
    # Resume: half of frame 1 left as .part; a corrupted frame 2 is fetched again.
    first[0].unlink()
    part = first[0].with_name(first[0].name + ".part")
    part.write_bytes(data[0][: len(data[0]) // 2])
    first[1].write_bytes(b"not the frame")
    again = job.download(tmp_path)
    assert [p.read_bytes() for p in again] == data and not part.exists()
    # The farm serves byte ranges of a frame.
    url = f"{local_farm.url}/jobs/{job.id}/frames/1"
    r = httpx.get(url, headers={**AUTH, "Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[0][10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(data[0])}"
    assert r.headers["etag"] == f'"{infos[0].sha256}"'
    r = httpx.get(url, headers={**AUTH, "Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == data[0][-5:]
    r = httpx.get(url, headers={**AUTH, "Range": f"bytes={len(data[0])}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data[0])}"


def test_previews_land_with_frames_and_show_displays_them(farm, local_farm, small_scene, tmp_path):
    png = completed(farm.submit(small_scene, frames="3"))
    exr = completed(farm.submit(small_scene, frames="3", tiles="2x2", format="exr"))
    (frame,) = png.download(tmp_path / "png")
    thumb = httpx.get(f"{local_farm.url}/jobs/{png.id}/frames/3/thumbnail", headers=AUTH)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    (tmp_path / "thumb.png").write_bytes(thumb.content)
    # A 64x48 frame is under the preview size: its preview is the frame itself.
    assert np.array_equal(pixels(tmp_path / "thumb.png"), pixels(frame))
    # An EXR frame's preview goes through the scene's view transform, as the PNG does
    # (only the PNG's dither noise differs).
    shown = exr.image(3)
    assert shown.size == (64, 48)
    diff = np.abs(np.asarray(shown.convert("RGBA"), dtype=int) - pixels(frame).astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 8, (diff.mean(), diff.max())
    assert png.image(3).size == (64, 48)
    r = httpx.get(f"{local_farm.url}/jobs/{png.id}/frames/99/thumbnail", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "frame_not_found"
    outputs = httpx.get(f"{local_farm.url}/jobs/{png.id}/outputs", headers=AUTH)
    assert outputs.json() == {"outputs": []}


def test_a_large_frames_preview_is_scaled_to_fit(farm, make_scene):
    scene = make_scene("--width", "1030", "--height", "40", "--samples", "1", "--frames", "1")
    job = completed(farm.submit(scene, frames="1"))
    assert job.image(1).size == (1030, 40)  # a PNG frame is shown whole
    from PIL import Image

    r = httpx.get(f"{farm.url}/jobs/{job.id}/frames/1/thumbnail", headers=AUTH)
    with Image.open(io.BytesIO(r.content)) as thumb:
        assert thumb.size == (512, 20)


def test_a_killed_dispatcher_restarts_and_finishes_the_job_from_redis(
    farm, local_farm, small_scene, tmp_path
):
    """kill -9 of the dispatcher mid-job: Ray restarts it, it rebuilds its runs from Redis
    (render actors die with their owner and are made again), and the job completes with
    every frame stored and reported once, each equal to bpy's own render."""
    job = farm.submit(small_scene, frames="1-24")
    _wait_for(lambda: job.status().frames_done >= 3)
    (victim,) = _render_actor_pids(local_farm, b"Dispatcher")
    os.kill(victim, 9)
    status = job.wait(timeout=WAIT_S)
    assert status.state is JobState.COMPLETED, status.error
    assert [f.frame for f in job.frames()] == list(range(1, 25))
    stored = Counter(e["frame"] for e in local_farm.events(job.id) if e["kind"] == "frame")
    assert sorted(int(f) for f in stored) == list(range(1, 25)) and set(stored.values()) == {1}
    (after,) = _render_actor_pids(local_farm, b"Dispatcher")
    assert after != victim
    got = job.download(tmp_path / "farm")
    want = render_reference(small_scene, tmp_path / "ref", [1, 12, 24])
    for path in got:
        if int(path.stem) in want:
            assert np.array_equal(pixels(path), pixels(want[int(path.stem)])), path.name
    # The farm keeps rendering after it.
    assert completed(farm.submit(small_scene, frames="2")).frames_done == 1
