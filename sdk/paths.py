"""Where a farm on this machine keeps its data, and its first admin's token.

``rayfarm up`` writes the token it generated for the first admin to
``<data dir>/admin-token`` (readable by its owner only), the token on the first line
and the farm's port on the next (``port=8000``); the SDK and the CLI read it there when
talking to that farm — a loopback URL with that port — and no token was given. Any
other URL, another user's "farm" on another loopback port included, never gets it.

A farm may keep its data anywhere (``--data-dir``, ``RAYFARM_DATA_DIR``): ``rayfarm up``
notes which data dir serves its port in the user's state folder
(``~/.local/state/rayfarm/ports/<port>``), so a client in another shell, without the
farm's environment, still finds the token.
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
    "register_farm",
    "registered_data_dir",
    "token_file_text",
    "unregister_farm",
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


def _ports_dir() -> Path:
    """Where ``rayfarm up`` notes the data dir of the farm on each port of this machine."""
    return Path(platformdirs.user_state_dir("rayfarm", appauthor=False)) / "ports"


def register_farm(port: int, data_dir: Path) -> None:
    """Note that the farm on ``port`` keeps its data (and its admin-token) in ``data_dir``:
    the latest farm started on a port wins."""
    folder = _ports_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / str(port)
    partial = path.with_name(f".{port}.{os.getpid()}")
    partial.write_text(f"{Path(data_dir).resolve()}\n")
    partial.replace(path)  # a reader never sees half a path


def unregister_farm(port: int, data_dir: Path) -> None:
    """Forget the note for ``port`` if it still names ``data_dir`` (a farm started since on
    the same port keeps its own)."""
    if registered_data_dir(port) == Path(data_dir).resolve():
        (_ports_dir() / str(port)).unlink(missing_ok=True)


def registered_data_dir(port: int) -> Path | None:
    """The data dir of the latest farm started on ``port`` here, if one noted it."""
    try:
        text = (_ports_dir() / str(port)).read_text().strip()
    except OSError:
        return None
    return Path(text) if text else None


def local_token(url: str) -> str | None:
    """The first admin's token of the farm at ``url`` when that farm runs on this machine
    (a loopback URL) and wrote its token, for ``url``'s port, to its data dir: the one
    noted for that port by ``rayfarm up`` (``register_farm``), else ``$RAYFARM_DATA_DIR``,
    else the default. None otherwise."""
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    folders = (
        registered_data_dir(port),
        os.environ.get("RAYFARM_DATA_DIR") or None,
        default_data_dir(),
    )
    for folder in folders:
        if folder is None:
            continue
        try:
            token, recorded = read_token_file((Path(folder) / ADMIN_TOKEN_FILE).read_text())
        except OSError:
            continue
        # A token goes only to the port its farm recorded, whichever folder it is in.
        if token and recorded == port:
            return token
    return None
