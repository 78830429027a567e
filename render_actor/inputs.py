"""A job's input: a scene and its dependencies, as content-addressed blobs in storage.

The SDK packs a scene with its textures, libraries and caches (blender-asset-tracer)
and uploads each file once, by its SHA-256; a job then names its files by relative
path and hash (``Inputs``). A render actor materializes that folder on local disk
(``materialize``): each blob is fetched once per node into a blob cache, checked
against its hash, and linked into the job's folder at its path, so the scene's
relative paths (``//textures/wood.png``) resolve as they did on the artist's machine.

Paths are checked twice: by the API before a job is accepted (``check_path``) and
here again before anything is written, so no path can leave the input folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

from rayfarm.errors import InvalidRequest, RenderError
from rayfarm.render.cache import BlobCache
from rayfarm.render.tasks import FATAL

__all__ = ["SHA256", "InputFile", "Inputs", "blob_key", "check_path", "materialize"]

#: A SHA-256 as the farm writes it: 64 lowercase hex digits.
SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FORBIDDEN = re.compile(r'[\x00-\x1f\x7f\\:*?"<>|]')
MAX_PATH_CHARS = 1024
MAX_COMPONENT_CHARS = 255
CHUNK_BYTES = 1 << 20


def blob_key(sha256: str) -> str:
    """Where a blob lives under the storage root."""
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def check_path(path: str) -> str:
    """``path`` if it is a safe relative POSIX path inside a job's input folder, else
    ``InvalidRequest`` naming it: no absolute paths, no ``..`` or ``.`` components, no
    empty components, backslashes, drive letters, wildcards or control characters."""

    def refuse(why: str) -> InvalidRequest:
        return InvalidRequest(f"input path {path!r} {why}", {"path": path})

    if not isinstance(path, str) or not path:
        raise refuse("is empty")
    if len(path) > MAX_PATH_CHARS:
        raise refuse(f"is longer than {MAX_PATH_CHARS} characters")
    if path.startswith("/"):
        raise refuse("is absolute")
    if _FORBIDDEN.search(path):
        raise refuse('holds a character not allowed in input paths (\\ : * ? " < > | or control)')
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise refuse("has an empty, '.' or '..' component")
        if len(part) > MAX_COMPONENT_CHARS:
            raise refuse(f"has a component longer than {MAX_COMPONENT_CHARS} characters")
    return path


@dataclass(frozen=True)
class InputFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Inputs:
    """A job's input folder: ``main`` (the .blend to open) and every file, by path."""

    storage: str  # fsspec root URL the blobs live under
    main: str
    files: tuple[InputFile, ...]

    @property
    def digest(self) -> str:
        """SHA-256 of the folder's listing: equal folders, equal digest (the actors'
        cache key for an open scene)."""
        listing = sorted((f.path, f.sha256) for f in self.files)
        return hashlib.sha256(json.dumps([self.main, listing]).encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(
            {"main": self.main, "files": [[f.path, f.sha256, f.size] for f in self.files]}
        )

    @classmethod
    def from_json(cls, storage: str, text: str) -> Inputs:
        data = json.loads(text)
        files = tuple(InputFile(p, h, int(n)) for p, h, n in data["files"])
        return cls(storage, data["main"], files)


def materialize(inputs: Inputs, folder: str, cache: BlobCache) -> str:
    """Lay ``inputs`` out under ``folder`` as hard links into the node's blob ``cache``
    (fetching what the node lacks) and return the main .blend's path. Idempotent: a
    complete folder is reused."""
    done = os.path.join(folder, ".complete")
    main = os.path.join(folder, *inputs.main.split("/"))
    if os.path.exists(done):
        return main
    fs: Any = None
    root = ""
    real = os.path.realpath(folder)
    for f in inputs.files:
        try:
            check_path(f.path)
        except InvalidRequest as exc:
            raise RenderError(exc.message, {FATAL: True}) from None
        if not SHA256.match(f.sha256):
            raise RenderError(f"input {f.path!r} has a malformed hash", {FATAL: True})
        target = os.path.join(folder, *f.path.split("/"))
        if os.path.commonpath([real, os.path.realpath(target)]) != real:
            raise RenderError(f"input {f.path!r} leaves the input folder", {FATAL: True})
        if fs is None and not os.path.exists(cache.path(f.sha256)):
            import fsspec

            fs, root = fsspec.core.url_to_fs(inputs.storage)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.lexists(target):
            os.unlink(target)
        for _ in range(3):  # another actor may evict the blob between get and link
            blob = cache.get(
                fs, f"{root.rstrip('/')}/{blob_key(f.sha256)}", f.sha256, f.size, f.path
            )
            try:
                os.link(blob, target)
                break
            except FileNotFoundError:
                if fs is None:
                    import fsspec

                    fs, root = fsspec.core.url_to_fs(inputs.storage)
            except OSError:  # another file system: copy
                shutil.copyfile(blob, target)
                break
        else:
            raise RenderError(f"input {f.path!r} kept vanishing from the node's cache")
    with open(done, "w"):
        pass
    return main
