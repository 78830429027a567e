"""Files a render leaves behind (standard library only): the image a task wrote, the
tail of its log, what the scene's File Output nodes wrote."""

from __future__ import annotations

import os
import shutil

__all__ = ["MAX_FILE_OUTPUT_BYTES", "collect_files", "tail", "take"]

#: Most bytes of files one task's File Output nodes may hand back.
MAX_FILE_OUTPUT_BYTES = 1024**3


def tail(path: str, limit: int) -> str:
    """The last ``limit`` bytes of ``path`` as text ("" when there is no such file)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - limit))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def take(path: str) -> bytes:
    """The bytes of ``path``, which is removed."""
    try:
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def collect_files(folder: str) -> dict[str, bytes]:
    """The files under ``folder`` (File Output nodes' work), by path relative to it;
    the folder is emptied. More than ``MAX_FILE_OUTPUT_BYTES`` in all is an error."""
    found: dict[str, bytes] = {}
    total = 0
    try:
        for root, _, names in os.walk(folder):
            for name in sorted(names):
                path = os.path.join(root, name)
                if os.path.islink(path):
                    continue  # Blender writes files; a link is not its work
                total += os.path.getsize(path)
                if total > MAX_FILE_OUTPUT_BYTES:
                    raise ValueError(
                        f"the scene's File Output nodes wrote over {MAX_FILE_OUTPUT_BYTES} bytes "
                        "for one frame"
                    )
                with open(path, "rb") as f:
                    found[os.path.relpath(path, folder)] = f.read()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return found
