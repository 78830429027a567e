"""Where a farm on this machine keeps its data, and its first admin's token.

``rayfarm up`` writes the token it generated for the first admin to
``<data dir>/admin-token`` (readable by its owner only), the token on the first line
and the farm's port on the next (``port=8000``); the SDK and the CLI read it there when
talking to that farm — a loopback URL with that port — and no token was given. Any
other URL, another user's "farm" on another loopback port included, never gets it.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs

__all__ = [
    "ADMIN_TOKEN_FILE",
    "LOOPBACK",
    "default_data_dir",
    "local_token",
    "read_token_file",
    "token_file_text",
]

ADMIN_TOKEN_FILE = "admin-token"
#: Host names that reach only this machine.
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def default_data_dir() -> Path:
    """``$RAYFARM_DATA_DIR``'s default: the user's data folder (``~/.local/share/rayfarm``)."""
    return Path(platformdirs.user_data_dir("rayfarm", appauthor=False))


def token_file_text(token: str, port: int) -> str:
    """The admin-token file's text: the token, then the port of the farm it is for."""
    return f"{token}\nport={port}\n"


def read_token_file(text: str) -> tuple[str | None, int | None]:
    """(token, port) from an admin-token file's text; port None where the file records
    none (written before ports were recorded)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    port = None
    for line in lines[1:]:
        name, _, value = line.partition("=")
        if name.strip() == "port" and value.strip().isdigit():
            port = int(value)
    return (lines[0] if lines else None), port


def local_token(url: str) -> str | None:
    """The first admin's token of the farm at ``url`` when that farm runs on this machine
    (a loopback URL) and wrote its token, for ``url``'s port, to its data dir
    (``$RAYFARM_DATA_DIR`` or the default); None otherwise."""
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    folder = Path(os.environ.get("RAYFARM_DATA_DIR") or default_data_dir())
    try:
        token, recorded = read_token_file((folder / ADMIN_TOKEN_FILE).read_text())
    except OSError:
        return None
    return token if recorded == port else None
