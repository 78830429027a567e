"""Packing a scene with blender-asset-tracer, without a farm: a scene whose files all
sit in the project, referenced relatively, is read where it is (BAT would copy each file
unchanged); anything that needs a path rewritten goes through BAT's own pack."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import threading
import time

import pytest

import rayfarm.pack
from rayfarm.pack import pack_scene, sha256_file

from helpers.blender import MAKE_SCENE, blender_python

SCENE = ("--width", "32", "--height", "24", "--samples", "1", "--frames", "1")


def _scene(path, *extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([blender_python(), str(MAKE_SCENE), str(path), *SCENE, *extra],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    return path


def _listing(pack):
    return [(f.path, f.sha256, f.size) for f in pack.files]


@pytest.mark.slow
def test_a_self_contained_project_is_read_in_place_as_bat_would_pack_it(tmp_path, monkeypatch):
    scene = _scene(tmp_path / "project" / "shots" / "shot.blend", "--texture")
    project = tmp_path / "project"
    with pack_scene(scene, project) as in_place:
        assert in_place.main == "shots/shot.blend"
        assert [f.path for f in in_place.files] == [
            "shots/shot.blend",
            "shots/textures/checker.png",
        ]
        assert all(f.source.is_relative_to(project) for f in in_place.files)  # the originals
        assert list(in_place.folder.iterdir()) == []  # nothing copied
        for f in in_place.files:
            assert (f.sha256, f.size) == (sha256_file(f.source), f.source.stat().st_size)
    # BAT's own pack of the same project: the same files, byte for byte.
    monkeypatch.setattr(rayfarm.pack, "_as_they_are", lambda *args: None)
    with pack_scene(scene, project) as copied:
        assert all(f.source.is_relative_to(copied.folder) for f in copied.files)
        assert _listing(copied) == _listing(in_place)


@pytest.mark.slow
def test_a_file_outside_the_project_goes_through_bat_and_the_scene_is_rewritten(tmp_path):
    outside = tmp_path / "library" / "cube.png"
    scene = _scene(tmp_path / "project" / "shot.blend", "--texture", "--abs-texture", str(outside))
    with pack_scene(scene) as pack:
        paths = [f.path for f in pack.files]
        assert "shot.blend" in paths and "textures/checker.png" in paths
        assert [p for p in paths if p.startswith("_outside_project/")]
        main = next(f for f in pack.files if f.path == "shot.blend")
        assert main.source.is_relative_to(pack.folder)
        assert main.sha256 != sha256_file(scene)  # its path to the cube was rewritten


@pytest.mark.slow
def test_a_missing_texture_stops_either_way(tmp_path):
    scene = _scene(tmp_path / "project" / "shot.blend", "--texture")
    (scene.parent / "textures" / "checker.png").unlink()
    with pytest.raises(rayfarm.MissingDependencies, match=r"checker\.png"):
        pack_scene(scene)
    with pack_scene(scene, allow_missing=True) as pack:
        assert [f.path for f in pack.files] == ["shot.blend"] and len(pack.missing) == 1


def test_an_unchanged_file_is_hashed_once_and_an_edited_one_again(tmp_path, monkeypatch):
    """``sha256_file`` remembers a hash while the file's size, times and inode stay as
    they were: an unchanged re-submit reads nothing. An edit that keeps the size and
    puts the modification time back is still seen (its change time moved)."""
    reads = []

    def digest(path):
        reads.append(path)
        return real(path)

    real = rayfarm.pack._digest
    monkeypatch.setattr(rayfarm.pack, "_digest", digest)  # counts reads; hashes for real
    # Hashed well after it was written (a file changed just before is never remembered).
    monkeypatch.setattr(rayfarm.pack, "_now", lambda: time.time() + 10 * rayfarm.pack.RACY_S)
    texture = tmp_path / "tex.png"
    texture.write_bytes(b"a" * 4096)
    first = texture.stat()
    assert sha256_file(texture) == sha256_file(texture) == hashlib.sha256(b"a" * 4096).hexdigest()
    assert len(reads) == 1
    while texture.stat().st_ctime_ns == first.st_ctime_ns:  # the clock moves on (a tick)
        texture.write_bytes(b"b" * 4096)
    os.utime(texture, ns=(first.st_atime_ns, first.st_mtime_ns))  # mtime and size as before
    assert sha256_file(texture) == hashlib.sha256(b"b" * 4096).hexdigest()
    assert len(reads) == 2
    assert sha256_file(texture) == hashlib.sha256(b"b" * 4096).hexdigest()
    assert len(reads) == 2


def test_a_file_changed_just_before_it_is_hashed_is_not_remembered(tmp_path, monkeypatch):
    reads = []
    real = rayfarm.pack._digest
    monkeypatch.setattr(rayfarm.pack, "_digest", lambda path: reads.append(path) or real(path))
    texture = tmp_path / "tex.png"
    texture.write_bytes(b"c" * 64)  # written now: within RACY_S of the hash
    sha256_file(texture)
    sha256_file(texture)
    assert len(reads) == 2


@pytest.mark.slow
def test_a_pack_says_where_its_time_went(tmp_path):
    scene = _scene(tmp_path / "project" / "shot.blend", "--texture")
    with pack_scene(scene) as packed:
        assert packed.trace_s > 0 and packed.hash_s > 0 and packed.copy_s == 0  # in place


@pytest.mark.slow
def test_a_cancelled_pack_stops_between_files_and_leaves_nothing(tmp_path, monkeypatch):
    """``cancel`` (the add-on's Cancel button) stops a pack before its first file, or
    between two files it hashes, and removes the pack's folder either way."""
    scene = _scene(tmp_path / "project" / "shot.blend", "--texture")
    packs = tmp_path / "packs"
    packs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(packs))
    monkeypatch.setattr(rayfarm.pack, "_now", lambda: 0.0)  # no hash remembered: each is read
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(rayfarm.pack.PackCancelled):
        pack_scene(scene, cancel=cancel)
    assert list(packs.iterdir()) == []

    cancel.clear()
    reads = []
    real = rayfarm.pack._digest

    def digest(path):  # the first file hashed, then the artist presses Cancel
        reads.append(path)
        cancel.set()
        return real(path)

    monkeypatch.setattr(rayfarm.pack, "_digest", digest)
    with pytest.raises(rayfarm.pack.PackCancelled):
        pack_scene(scene, cancel=cancel)
    assert len(reads) == 1  # of the scene's two files
    assert list(packs.iterdir()) == []
    monkeypatch.setattr(rayfarm.pack, "_digest", real)
    cancel.clear()
    with pack_scene(scene, cancel=cancel) as pack:  # not set: an ordinary pack
        assert [f.path for f in pack.files] == ["shot.blend", "textures/checker.png"]
