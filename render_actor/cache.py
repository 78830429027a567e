"""A node's local copy of job inputs: blobs fetched from object storage once per node
and shared by every RenderActor on it, bounded in bytes.

Layout: ``{root}/ab/ab12...`` (the blob, named by its SHA-256), a ``.lock`` beside
each blob while it is fetched. Actors lay a job's folder out from here with hard
links, so a blob some actor's input folder still links (``st_nlink > 1``) is in use
and never evicted; the others go least recently used first once the cache is over
its bound.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import uuid
from typing import Any

from rayfarm.errors import RenderError
from rayfarm.render.tasks import FATAL

__all__ = ["DEFAULT_MAX_BYTES", "BlobCache", "default_root"]

#: Default bound of a node's cache (RAYFARM_CACHE_BYTES).
DEFAULT_MAX_BYTES = 50 * 1024**3
CHUNK_BYTES = 1 << 20


def default_root() -> str:
    """``RAYFARM_CACHE_DIR``, else ``rayfarm-cache`` in the node's temp folder (the same
    file system as the actors' work folders, so hard links work)."""
    return os.environ.get("RAYFARM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "rayfarm-cache"
    )


class BlobCache:
    """Blobs on this node's disk; safe across the processes of one node."""

    def __init__(self, root: str | None = None, max_bytes: int | None = None) -> None:
        self.root = root or default_root()
        env = os.environ.get("RAYFARM_CACHE_BYTES")
        self.max_bytes = max_bytes or (int(env) if env else DEFAULT_MAX_BYTES)
        os.makedirs(self.root, exist_ok=True)

    def path(self, sha256: str) -> str:
        return os.path.join(self.root, sha256[:2], sha256)

    def get(self, fs: Any, src: str, sha256: str, size: int, name: str) -> str:
        """The local path of blob ``sha256`` (``size`` bytes, ``name`` for messages),
        fetched from ``src`` on ``fs`` unless this node has it. One process fetches a
        blob while the others wait for it (a file lock), so a node fetches it once."""
        path = self.path(sha256)
        if os.path.exists(path):
            os.utime(path)  # recently used
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not os.path.exists(path):
                    self._download(fs, src, path, sha256, size, name)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.evict()
        return path

    def _download(self, fs: Any, src: str, dest: str, sha256: str, size: int, name: str) -> None:
        """Copy one blob to ``dest``, verifying its hash and size; whole or not at all."""
        tmp = f"{dest}.{uuid.uuid4().hex}.part"
        sha = hashlib.sha256()
        got = 0
        try:
            with fs.open(src, "rb") as inp, open(tmp, "wb") as out:
                while block := inp.read(CHUNK_BYTES):
                    sha.update(block)
                    got += len(block)
                    out.write(block)
            if sha.hexdigest() != sha256 or got != size:
                raise RenderError(
                    f"input {name!r}: the stored blob does not match its hash", {FATAL: True}
                )
            os.replace(tmp, dest)
        except FileNotFoundError:
            raise RenderError(f"input {name!r} is missing from storage", {FATAL: True}) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def evict(self) -> int:
        """Remove least recently used blobs no input folder links until the cache fits
        its bound; return how many bytes it holds after."""
        blobs = []
        for sub in os.scandir(self.root):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.name.endswith((".lock", ".part")):
                    continue
                st = entry.stat()
                blobs.append((st.st_mtime, st.st_size, st.st_nlink, entry.path))
        total = sum(size for _, size, _, _ in blobs)
        for _, size, links, path in sorted(blobs):
            if total <= self.max_bytes:
                break
            if links > 1:
                continue  # an actor's input folder uses it
            try:
                os.unlink(path)
                total -= size
            except FileNotFoundError:
                pass  # another actor evicted it first
        return total
