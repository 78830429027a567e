"""Pack a scene with everything it uses, for upload: blender-asset-tracer (BAT).

BAT follows a .blend's references — textures, image sequences and UDIM tiles,
linked libraries (recursively), caches, fonts, sounds, movie clips, volumes — and
copies them into a folder laid out as the project is, rewriting paths in the
copied .blend files where needed so the scene resolves from that folder: files
outside the project (absolute paths, other drives, ``..`` above the project) go
under ``_outside_project/`` instead of being dropped. Every packed file is then
hashed (SHA-256), so the farm is sent only what it lacks.

A scene whose files BAT would only copy unchanged is not copied: its files are hashed
where they are, and a file hashed before in this process is not read again while its
size, times and inode are unchanged (``sha256_file``), so re-submitting an unchanged
scene from a notebook or the add-on costs a trace, not a read of every texture.
A ``Pack`` says how long tracing, copying and hashing took (``trace_s``, ``copy_s``,
``hash_s``).

A dependency missing on this machine stops the submission before anything is
uploaded (``MissingDependencies``, naming the files), unless the job says
``allow_missing=True``. A ``cancel`` event stops a pack between its steps and
between the files it hashes (``PackCancelled``).

This module, ``rayfarm.blendfile`` and ``rayfarm.errors`` are the SDK's packer as a
whole, and the Blender add-on carries them as they are: ``blender_addon/build.py``
copies the three into the extension's ``vendor/`` package. So they import only the
standard library, blender-asset-tracer, zstandard and each other (relatively); the
build refuses anything else.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .blendfile import check_blend
from .errors import InvalidRequest, InvalidScene, MissingDependencies

__all__ = ["Pack", "PackCancelled", "PackedFile", "pack_scene", "sha256_file"]

#: BAT's note about the pack (it holds the time it was made): not a render input.
_BAT_INFO = "pack-info.txt"
CHUNK_BYTES = 1 << 20
#: Files whose hashes ``sha256_file`` remembers (the least recently used go first).
HASH_CACHE_FILES = 10_000
#: A file changed less than this long before it is hashed is not remembered: a second
#: change within its timestamps' granularity would leave them as they were.
RACY_S = 2.0


@dataclass(frozen=True)
class PackedFile:
    path: str  # relative, POSIX, as the farm lays it out
    source: Path  # where its bytes are on this machine
    sha256: str
    size: int


@dataclass
class Pack:
    """A packed scene in a temporary folder; ``close()`` (or ``with``) removes it."""

    main: str
    files: list[PackedFile]
    missing: list[str]
    folder: Path
    trace_s: float = 0.0  # BAT following the scene's references
    copy_s: float = 0.0  # BAT copying (and rewriting) files into the pack folder
    hash_s: float = 0.0  # hashing the packed files
    _closed: bool = field(default=False, repr=False)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def close(self) -> None:
        if not self._closed:
            shutil.rmtree(self.folder, ignore_errors=True)
            self._closed = True

    def __enter__(self) -> Pack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PackCancelled(Exception):
    """``pack_scene``'s ``cancel`` event was set: the pack stopped between files and
    removed its folder (the add-on's Cancel button)."""


def pack_scene(
    scene: str | os.PathLike[str],
    project: str | os.PathLike[str] | None = None,
    allow_missing: bool = False,
    *,
    cancel: threading.Event | None = None,
) -> Pack:
    """Pack ``scene`` and its dependencies; ``project`` (default: the scene's folder)
    is the root whose layout the farm reproduces. Safe to call from several threads
    (``AsyncFarm.submit`` does): packing runs one at a time. When ``cancel`` is set,
    the pack stops after the trace, before BAT copies anything, or between two files
    it hashes (``PackCancelled``)."""
    with _BAT_LOCK:
        return _pack(scene, project, allow_missing, cancel or threading.Event())


#: Blender Asset Tracer keeps the .blend files it reads in one module-wide cache, keyed
#: by path: two threads tracing the same file replace each other's entry and leak a
#: file (seen: three concurrent AsyncFarm.submit of one scene).
_BAT_LOCK = threading.Lock()


def _pack(
    scene: str | os.PathLike[str],
    project: str | os.PathLike[str] | None,
    allow_missing: bool,
    cancel: threading.Event,
) -> Pack:
    from blender_asset_tracer.blendfile import close_all_cached
    from blender_asset_tracer.blendfile.exceptions import BlendFileError
    from blender_asset_tracer.pack import Packer

    path = Path(scene).resolve()
    if not path.is_file():
        raise InvalidRequest(f"scene file not found: {scene}", {"path": str(scene)})
    check_blend(path)  # a precise error for a file that is not a whole .blend
    root = Path(project).resolve() if project is not None else path.parent
    if root not in path.parents:
        raise InvalidRequest(f"the scene {path} is not inside the project folder {root}")
    folder = Path(tempfile.mkdtemp(prefix="rayfarm-pack-"))
    try:
        # BAT logs each missing file as a warning; we report them ourselves.
        logging.getLogger("blender_asset_tracer").setLevel(logging.ERROR)
        with Packer(path, root, str(folder)) as packer:
            started = time.perf_counter()
            packer.strategise()
            trace_s = time.perf_counter() - started
            missing = sorted(str(p) for p in packer.missing_files)
            if missing and not allow_missing:
                shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
                raise MissingDependencies(
                    f"{len(missing)} file(s) the scene uses are missing here: {shown} "
                    "(fix the paths, or submit with allow_missing=True to render anyway)",
                    {"missing": missing},
                )
            _check(cancel)
            main = PurePosixPath(Path(packer.output_path).relative_to(folder)).as_posix()
            started = time.perf_counter()
            in_place = _as_they_are(packer, folder, cancel)
            if in_place is not None:
                hash_s = time.perf_counter() - started
                return Pack(main, in_place, missing, folder, trace_s, 0.0, hash_s)
            started = time.perf_counter()
            packer.execute()
            copy_s = time.perf_counter() - started
        started = time.perf_counter()
        files = []
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.relative_to(folder).as_posix() != _BAT_INFO:
                _check(cancel)
                files.append(_hashed(folder, p))
        hash_s = time.perf_counter() - started
        return Pack(main, files, missing, folder, trace_s, copy_s, hash_s)
    except BlendFileError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        # BAT leaves the file it failed to parse open (its constructor raises after
        # opening it): let it be collected here, quietly, not as a stray warning later.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            exc.__traceback__ = None
            gc.collect()
        raise InvalidScene(
            f"cannot trace the files {path.name} uses: {exc}", {"path": str(path)}
        ) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        close_all_cached()  # BAT keeps every .blend it read open otherwise


def _check(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise PackCancelled()


def _as_they_are(packer: Any, folder: Path, cancel: threading.Event) -> list[PackedFile] | None:
    """The pack's files read where they are, when BAT would only copy them unchanged:
    every dependency a plain file inside the project, referenced relatively, so no
    .blend needs a path rewritten. None otherwise (sequences, UDIMs, folders, files
    outside the project: BAT's own pack handles those).

    Skipping BAT's copy saves the copy itself and BAT's transfer thread, which polls
    its queue every 0.5 s: a one-file scene packed in 1.7 s, most of it waiting (0.2-0.3 s
    now). A file changed on disk between this hash and its upload is refused by the
    farm's hash check (400), never stored wrong.
    """
    from blender_asset_tracer.pack import PathAction

    files = []
    for asset, action in packer._actions.items():
        plain = "*" not in str(asset) and "<UDIM>" not in asset.name and not asset.is_dir()
        if (
            not plain
            or action.path_action != PathAction.KEEP_PATH
            or action.rewrites
            or action.read_from is not None
            or action.new_path is None
            or any(usage.is_sequence for usage in action.usages)
        ):
            return None
        if not asset.is_file():
            continue  # missing: reported already (allow_missing)
        _check(cancel)
        rel = PurePosixPath(Path(action.new_path).relative_to(folder)).as_posix()
        files.append(PackedFile(rel, asset, sha256_file(asset), asset.stat().st_size))
    return sorted(files, key=lambda f: f.path)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes. A file this process hashed before is not read
    again while it has the same size, modification and change times (ns), inode and
    device: writing a file changes its change time, which no one can set back, so an
    edited file is always read (and one edited within ``RACY_S`` of being hashed is
    never remembered). A file changed between this hash and its upload is refused by
    the farm's own hash check, never stored wrong."""
    st = os.stat(path)
    key = os.path.realpath(path)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    with _HASHES_LOCK:
        known = _HASHES.get(key)
        if known is not None and known[0] == stamp:
            _HASHES.move_to_end(key)
            return known[1]
    digest = _digest(path)
    if _now() - max(st.st_mtime, st.st_ctime) > RACY_S:
        with _HASHES_LOCK:
            _HASHES[key] = (stamp, digest)
            while len(_HASHES) > HASH_CACHE_FILES:
                _HASHES.popitem(last=False)
    return digest


#: Real path -> ((size, mtime ns, ctime ns, inode, device), sha256), LRU.
_HASHES: OrderedDict[str, tuple[tuple[int, ...], str]] = OrderedDict()
_HASHES_LOCK = threading.Lock()


def _now() -> float:
    return time.time()


def _digest(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            sha.update(block)
    return sha.hexdigest()


def _hashed(folder: Path, path: Path) -> PackedFile:
    # A copy in a pack folder of its own: read once, never worth remembering.
    rel = path.relative_to(folder).as_posix()
    return PackedFile(rel, path, _digest(path), path.stat().st_size)
