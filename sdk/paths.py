"""Where a farm on this machine keeps its data, and its first admin's token.

``rayfarm up`` writes the token it generated for the first admin to
``<data dir>/admin-token`` (readable by its owner only); the SDK and the CLI read it
there when talking to a farm on this machine and no token was given.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs

__all__ = ["ADMIN_TOKEN_FILE", "LOOPBACK", "default_data_dir", "local_token"]

ADMIN_TOKEN_FILE = "admin-token"
#: Host names that reach only this machine.
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def default_data_dir() -> Path:
    """``$RAYFARM_DATA_DIR``'s default: the user's data folder (``~/.local/share/rayfarm``)."""
    return Path(platformdirs.user_data_dir("rayfarm", appauthor=False))


def local_token(url: str) -> str | None:
    """The first admin's token of the farm at ``url`` when that farm runs on this machine
    (a loopback URL) and wrote one to its data dir (``$RAYFARM_DATA_DIR`` or the
    default); None otherwise."""
    if urlsplit(url).hostname not in LOOPBACK:
        return None
    folder = Path(os.environ.get("RAYFARM_DATA_DIR") or default_data_dir())
    try:
        return (folder / ADMIN_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None
