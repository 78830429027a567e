"""Object storage for scenes and frames over fsspec (``file://`` or ``s3://``).

Layout under the root URL::

    blobs/sha256/ab/ab12...        (job inputs, by content: scenes, textures, caches;
                                    shared by every job that uses them)
    jobs/{id}/frames/0001.png
    jobs/{id}/outputs/thumbnails/0001.png   (a preview of each frame, when it lands)
    jobs/{id}/outputs/previews/0001.png     (a sliced frame's merge so far, while it
                                             renders; gone once the frame lands)
    jobs/{id}/outputs/files/0001/<node>/<file>   (the scene's File Output nodes' files)
    jobs/{id}/outputs/...          (post-processing results)
    jobs/{id}/logs/{task}/01.log   (Blender's output for each attempt at a task)
    jobs/{id}/manifest.json        (written last)

Writes are whole or nothing: on a local filesystem the data goes to a
temporary name in the same folder and is renamed into place; on S3 a PUT is
atomic (multipart uploads become visible only when completed).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "Storage",
    "file_output_key",
    "frame_key",
    "job_prefix",
    "manifest_key",
    "outputs_prefix",
    "preview_key",
    "task_log_key",
    "task_logs_prefix",
    "thumbnail_key",
]

CHUNK_BYTES = 1 << 20


def job_prefix(job_id: str) -> str:
    """Everything the farm stores for a job (its inputs are blobs, shared)."""
    return f"jobs/{job_id}"


def frame_key(job_id: str, frame: int, extension: str) -> str:
    return f"jobs/{job_id}/frames/{frame:04d}.{extension}"


def thumbnail_key(job_id: str, frame: int) -> str:
    return f"jobs/{job_id}/outputs/thumbnails/{frame:04d}.png"


def preview_key(job_id: str, frame: int) -> str:
    """A sliced frame's preview while its slices render (its merge so far)."""
    return f"jobs/{job_id}/outputs/previews/{frame:04d}.png"


def outputs_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/outputs"


def file_output_key(job_id: str, frame: int, name: str) -> str:
    """Where a file the scene's compositor File Output nodes wrote for ``frame`` is kept
    (``name``: ``<node>/<file>``, checked by the caller)."""
    return f"{outputs_prefix(job_id)}/files/{frame:04d}/{name}"


def task_logs_prefix(job_id: str, task: str) -> str:
    return f"jobs/{job_id}/logs/{task}"


def task_log_key(job_id: str, task: str, attempt: int) -> str:
    return f"{task_logs_prefix(job_id, task)}/{attempt:02d}.log"


def manifest_key(job_id: str) -> str:
    return f"jobs/{job_id}/manifest.json"


class Storage:
    """A root URL and the fsspec filesystem behind it."""

    def __init__(self, root: str, **storage_options: Any) -> None:
        self.root = root.rstrip("/")
        fs, path = fsspec.core.url_to_fs(self.root, **storage_options)
        self.fs: fsspec.AbstractFileSystem = fs
        self.base = path.rstrip("/")
        self.is_local = isinstance(fs, LocalFileSystem)
        if self.is_local:
            os.makedirs(self.base, exist_ok=True)

    def path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def url(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic(key, lambda f: f.write(data))

    def put_stream(self, key: str, src: IO[bytes]) -> None:
        self._atomic(key, lambda f: shutil.copyfileobj(src, f, CHUNK_BYTES))

    def _atomic(self, key: str, write: Any) -> None:
        target = self.path(key)
        if not self.is_local:
            # Not `with fs.open(...)`: leaving that block closes the file, which commits
            # whatever was written even when an exception is on its way out.
            f = self.fs.open(target, "wb")
            try:
                write(f)
            except BaseException:
                f.discard()  # abort the (multipart) upload: no partial object appears
                f.closed = True  # discard() leaves it open; closing later would fail
                raise
            f.close()
            return
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(target)}.{uuid.uuid4().hex}.part")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def read_bytes(self, key: str) -> bytes:
        data: bytes = self.fs.cat_file(self.path(key))
        return data

    def iter_bytes(
        self, key: str, chunk: int = CHUNK_BYTES, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """The object's bytes ``[start, end)`` (to the end when ``end`` is None)."""
        with self.fs.open(self.path(key), "rb") as f:
            if start:
                f.seek(start)
            left = None if end is None else end - start
            while left is None or left > 0:
                block = f.read(chunk if left is None else min(chunk, left))
                if not block:
                    break
                if left is not None:
                    left -= len(block)
                yield block

    def size(self, key: str) -> int:
        return int(self.fs.size(self.path(key)))

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under ``prefix``, sorted; none if it is absent."""
        target = self.path(prefix)
        try:
            found = self.fs.find(target, detail=True)
        except FileNotFoundError:
            return []
        base = self.base + "/"
        return sorted(
            (str(name).removeprefix(base), int(info.get("size", 0)))
            for name, info in found.items()
            if info.get("type") == "file" and not os.path.basename(str(name)).startswith(".")
        )

    def usage(self, prefix: str) -> tuple[int, int]:
        """(objects, bytes) under ``prefix`` (temporary files included: they take space
        too); (0, 0) when it is absent. Walks one folder at a time, so a large bucket
        is never listed into memory whole."""
        objects = size = 0
        for _, _, files in self.fs.walk(self.path(prefix), detail=True):
            for info in files.values():
                if info.get("type") == "file":
                    objects += 1
                    size += int(info.get("size") or 0)
        return objects, size

    def delete(self, key: str) -> bool:
        """Delete one object; False when there was none."""
        try:
            self.fs.rm_file(self.path(key))
        except FileNotFoundError:
            return False
        return True

    def delete_prefix(self, prefix: str) -> None:
        target = self.path(prefix)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
