"""A node's blob cache on real local storage (fsspec file://): job folders laid out from
it, each blob fetched once per node however many processes ask, verified, bounded."""

import hashlib
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import fsspec
import pytest

from rayfarm.cluster.storage import Storage
from rayfarm.errors import RenderError
from rayfarm.render.cache import BlobCache
from rayfarm.render.inputs import InputFile, Inputs, blob_key, materialize


def _store(storage: Storage, data: bytes) -> InputFile:
    digest = hashlib.sha256(data).hexdigest()
    storage.put_bytes(blob_key(digest), data)
    return InputFile(f"tex/{digest[:8]}.png", digest, len(data))


class CountingCache(BlobCache):
    """Counts real downloads (instrumentation of our own class, not a stand-in for a
    component: storage, files and locks are all real)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.downloads = 0
        self._count = threading.Lock()

    def _download(self, *args):
        with self._count:
            self.downloads += 1
        super()._download(*args)


def test_folders_share_blobs_fetched_once(tmp_path):
    storage = Storage((tmp_path / "store").as_uri())
    scene = _store(storage, b"BLENDER-v500 pretend scene")
    texture = _store(storage, b"\x89PNG" + os.urandom(4096))
    inputs = Inputs(storage.root, "shot.blend", (InputFile("shot.blend", scene.sha256,
                    scene.size), texture))  # fmt: skip
    cache = CountingCache(str(tmp_path / "cache"))
    a = materialize(inputs, str(tmp_path / "actor0" / "job"), cache)
    b = materialize(inputs, str(tmp_path / "actor1" / "job"), cache)
    assert cache.downloads == 2  # two blobs, once each, for two actors' folders
    assert Path(a).read_bytes() == Path(b).read_bytes() == b"BLENDER-v500 pretend scene"
    assert os.stat(a).st_ino == os.stat(b).st_ino == os.stat(cache.path(scene.sha256)).st_ino


def test_concurrent_processes_fetch_a_blob_once(tmp_path):
    storage = Storage((tmp_path / "store").as_uri())
    blob = _store(storage, os.urandom(8 * 1024 * 1024))
    cache_dir = str(tmp_path / "cache")
    with ProcessPoolExecutor(4) as pool:
        results = list(pool.map(_fetch_in_process, [(storage.root, cache_dir, blob)] * 4))
    paths = [p for p, _ in results]
    assert len(set(paths)) == 1
    assert sum(downloads for _, downloads in results) == 1  # one fetch for the node
    leftovers = [n for n in os.listdir(os.path.dirname(paths[0])) if n.endswith(".part")]
    assert leftovers == []


def _fetch_in_process(args):
    root, cache_dir, blob = args
    fs, base = fsspec.core.url_to_fs(root)
    cache = CountingCache(cache_dir)
    path = cache.get(fs, f"{base}/{blob_key(blob.sha256)}", blob.sha256, blob.size, blob.path)
    return path, cache.downloads


def test_a_corrupt_or_missing_blob_fails_fatally_and_leaves_nothing(tmp_path):
    storage = Storage((tmp_path / "store").as_uri())
    good = _store(storage, b"abc")
    storage.put_bytes(blob_key(good.sha256), b"abd")  # bit rot in storage
    cache = BlobCache(str(tmp_path / "cache"))
    fs, base = fsspec.core.url_to_fs(storage.root)
    with pytest.raises(RenderError, match="does not match its hash") as err:
        cache.get(fs, f"{base}/{blob_key(good.sha256)}", good.sha256, good.size, good.path)
    assert err.value.detail["fatal"] is True
    assert not os.path.exists(cache.path(good.sha256))
    with pytest.raises(RenderError, match="missing from storage"):
        cache.get(fs, f"{base}/{blob_key('0' * 64)}", "0" * 64, 1, "gone.png")


def test_the_cache_stays_within_its_bound_and_keeps_what_is_linked(tmp_path):
    storage = Storage((tmp_path / "store").as_uri())
    blobs = [_store(storage, bytes([i]) * 1000) for i in range(6)]
    cache = BlobCache(str(tmp_path / "cache"), max_bytes=3500)
    fs, base = fsspec.core.url_to_fs(storage.root)
    held = cache.get(fs, f"{base}/{blob_key(blobs[0].sha256)}", blobs[0].sha256, 1000, "a")
    os.link(held, tmp_path / "in-use")  # an actor's input folder links the first
    for b in blobs[1:]:
        cache.get(fs, f"{base}/{blob_key(b.sha256)}", b.sha256, b.size, b.path)
    kept = [b for b in blobs if os.path.exists(cache.path(b.sha256))]
    assert blobs[0] in kept  # in use: never evicted, though least recently used
    assert sum(b.size for b in kept) <= 3500
    assert blobs[-1] in kept  # the newest stays
