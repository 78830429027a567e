"""Object storage on both backends: local files and a real S3 endpoint (moto server)."""

from __future__ import annotations

import io
import uuid

import pytest
import s3fs

from rayfarm.cluster.storage import Storage, frame_key, manifest_key, thumbnail_key
from rayfarm.render.inputs import blob_key


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path):
    if request.param == "file":
        return Storage((tmp_path / "root").as_uri())
    request.getfixturevalue("s3_env")
    bucket = f"rayfarm-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return Storage(f"s3://{bucket}/farm/prefix")


def test_layout_keys():
    assert blob_key("ab" * 32) == f"blobs/sha256/ab/{'ab' * 32}"
    assert thumbnail_key("j", 7) == "jobs/j/outputs/thumbnails/0007.png"
    assert frame_key("j", 7, "png") == "jobs/j/frames/0007.png"
    assert frame_key("j", 12345, "exr") == "jobs/j/frames/12345.exr"
    assert manifest_key("j") == "jobs/j/manifest.json"


def test_round_trip(storage):
    data = bytes(range(256)) * 5000  # > one 1 MiB chunk
    storage.put_bytes("jobs/a/frames/0001.png", data)
    storage.put_stream("jobs/a/input/scene.blend", io.BytesIO(data[::-1]))
    assert storage.exists("jobs/a/frames/0001.png")
    assert storage.size("jobs/a/frames/0001.png") == len(data)
    assert storage.read_bytes("jobs/a/frames/0001.png") == data
    assert b"".join(storage.iter_bytes("jobs/a/input/scene.blend")) == data[::-1]
    assert storage.url("jobs/a/frames/0001.png").endswith("/jobs/a/frames/0001.png")
    storage.delete_prefix("jobs/a")
    assert not storage.exists("jobs/a/frames/0001.png")
    storage.delete_prefix("jobs/never-there")


def test_failed_write_leaves_nothing(storage):
    class Broken(io.RawIOBase):
        def __init__(self):
            self.calls = 0

        def readable(self):
            return True

        def readinto(self, b):
            self.calls += 1
            if self.calls > 2:
                raise OSError("connection dropped mid-upload")
            b[: len(b)] = b"x" * len(b)
            return len(b)

    with pytest.raises(OSError, match="dropped"):
        storage.put_stream("jobs/b/input/scene.blend", io.BufferedReader(Broken(), 1 << 16))
    assert not storage.exists("jobs/b/input/scene.blend")


def test_local_write_never_shows_a_partial_file(tmp_path):
    storage = Storage((tmp_path / "root").as_uri())
    storage.put_bytes("jobs/c/frames/0001.png", b"old")

    def reader():
        yield b"new-"
        raise OSError("disk full")

    class Src:
        it = reader()

        def read(self, n=-1):
            return next(self.it)

    with pytest.raises(OSError):
        storage.put_stream("jobs/c/frames/0001.png", Src())
    assert storage.read_bytes("jobs/c/frames/0001.png") == b"old"
    assert [p.name for p in (tmp_path / "root/jobs/c/frames").iterdir()] == ["0001.png"]
