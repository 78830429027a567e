"""Pack a saved copy of the scene with blender-asset-tracer (BAT), as the SDK does.

BAT follows the .blend's textures, sequences, UDIMs, libraries, caches and fonts,
copies them into a folder and rewrites paths in the copied .blend files; files
outside the project (here: everything, since the scene copy sits alone in a temp
folder) land under ``_outside_project/``. Every file is hashed so only what the farm
lacks is uploaded. No ``bpy`` here: it runs in the upload thread.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .comms import Cancelled, FarmError, sha256_file

#: BAT's note about the pack (it holds the time it was made): not a render input.
_BAT_INFO = "pack-info.txt"
#: BAT caches the .blend files it reads in one module-wide dict: pack one at a time.
_BAT_LOCK = threading.Lock()


@dataclass(frozen=True)
class PackedFile:
    path: str  # relative, POSIX, as the farm lays it out
    source: Path
    sha256: str
    size: int


@dataclass
class Pack:
    main: str
    files: list[PackedFile]
    missing: list[str]
    folder: Path

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def pack_scene(blend: Path, allow_missing: bool, cancel: threading.Event) -> Pack:
    """Pack ``blend`` (the saved copy; its folder is the project) into a new temp folder."""
    _import_bat()
    from blender_asset_tracer.blendfile import close_all_cached
    from blender_asset_tracer.blendfile.exceptions import BlendFileError
    from blender_asset_tracer.pack import Packer

    folder = Path(tempfile.mkdtemp(prefix="rayfarm-pack-"))
    try:
        with _BAT_LOCK:
            try:
                logging.getLogger("blender_asset_tracer").setLevel(logging.ERROR)
                with Packer(blend, blend.parent, str(folder)) as packer:
                    packer.strategise()
                    missing = sorted(str(p) for p in packer.missing_files)
                    if missing and not allow_missing:
                        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
                        raise FarmError(
                            f"{len(missing)} file(s) the scene uses are missing: {shown} "
                            "(fix the paths, or tick Allow Missing Files to render anyway)",
                            "missing_dependencies",
                            {"missing": missing},
                        )
                    if cancel.is_set():
                        raise Cancelled()
                    packer.execute()
                    main = PurePosixPath(Path(packer.output_path).relative_to(folder)).as_posix()
            except BlendFileError as exc:
                raise FarmError(f"Cannot trace the files {blend.name} uses: {exc}") from None
            finally:
                close_all_cached()
        files = []
        for path in sorted(folder.rglob("*")):
            if cancel.is_set():
                raise Cancelled()
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and rel != _BAT_INFO:
                files.append(PackedFile(rel, path, sha256_file(path), path.stat().st_size))
        return Pack(main, files, missing, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _import_bat() -> None:
    """As an extension, Blender installs the bundled wheel; as a legacy add-on (a zip
    installed the pre-4.2 way) it does not, but a pure-Python wheel is importable from
    ``sys.path`` as it is."""
    try:
        import blender_asset_tracer
    except ImportError:
        for wheel in sorted((Path(__file__).parent / "wheels").glob("blender_asset_tracer-*.whl")):
            sys.path.append(str(wheel))
        import blender_asset_tracer  # noqa: F401
