"""Blender environments: one virtual environment per Blender version, holding bpy.

A farm offers several Blender versions at once (``RAYFARM_BLENDER=5.3,5.0``). Each is a
venv with ``bpy==X.Y.*`` (and the numpy it brings), built from the CPython that bpy
release line is published for — 3.11 for bpy 4.2-5.0, 3.13 for bpy 5.1 and newer — in a
node-local cache outside any checkout (``RAYFARM_BLENDER_DIR``, else the user's cache
folder). Render actors run their Blender worker process with the environment's own
interpreter; the farm's own Python never imports bpy.

Layout under the root::

    5.3/                  the venv (bin/python, lib/python3.13/site-packages/bpy, ...)
    5.3/rayfarm-env.json  written last, once bpy imports: the environment is ready
    .5.3.lock             held while one process builds it (others on the node wait)

The interpreter for a Python version is found, in order: ``RAYFARM_PYTHON_3_13`` (a
path), ``python3.13`` on ``PATH``, pyenv (``pyenv prefix 3.13``), uv's managed Pythons,
then the usual system places. A missing one is an error that names it and how to get
it; nothing here downloads an interpreter.

Only the standard library (and platformdirs, an SDK dependency) is used: the CLI
(``rayfarm blender install|list``) and a node's setup commands import this module.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from rayfarm.errors import BlenderUnavailable, InvalidRequest
from rayfarm.versions import version_key

__all__ = [
    "DEFAULT_VERSIONS",
    "Environment",
    "environment",
    "find_python",
    "install",
    "installed",
    "parse_versions",
    "python_for",
    "python_setting",
    "root",
]

#: What a farm offers when ``RAYFARM_BLENDER`` is not set: the current release and the
#: last one built for CPython 3.11 (which also renders the 4.x files of an LTS show).
DEFAULT_VERSIONS = ("5.3", "5.0")
#: (first, last) Blender release of each bpy line on PyPI, and the CPython it needs.
#: A version newer than the table is assumed to stay on the last line's Python.
PYTHON_LINES = (((4, 0), (4, 1), "3.10"), ((4, 2), (5, 0), "3.11"), ((5, 1), (99, 99), "3.13"))
#: Written into a finished environment, last.
MARKER = "rayfarm-env.json"
#: About what one bpy wheel downloads (the README states it).
WHEEL_MB = 400
#: The longest one ``pip install bpy`` may take (a slow mirror, a 400 MB wheel).
INSTALL_TIMEOUT_S = 3600
#: A version folder's name, and what ``python -c`` prints of an interpreter's version.
_VERSION = re.compile(r"^(\d{1,2})\.(\d{1,2})$")


def parse_versions(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"5.3, 5.0"`` (or a list) as ``("5.3", "5.0")``: each checked, duplicates
    dropped, newest first."""
    items = text.split(",") if isinstance(text, str) else list(text)
    keys = {version_key(item) for item in items if str(item).strip()}
    if not keys:
        raise InvalidRequest("no Blender version given (such as 5.3,5.0)")
    for key in keys:
        python_for(f"{key[0]}.{key[1]}")  # refuses a version no bpy line has
    return tuple(f"{a}.{b}" for a, b in sorted(keys, reverse=True))


def python_for(version: str) -> str:
    """The CPython ``major.minor`` the bpy wheels of Blender ``version`` are built for."""
    key = version_key(version)
    for first, last, python in PYTHON_LINES:
        if first <= key <= last:
            return python
    raise InvalidRequest(
        f"Blender {version} has no bpy module on PyPI (bpy exists from Blender 4.0)",
        {"version": version},
    )


def root() -> Path:
    """Where this node keeps its Blender environments (``RAYFARM_BLENDER_DIR``, else
    ``<user cache>/rayfarm/blender``): outside any checkout, shared by every render
    actor of the node."""
    configured = os.environ.get("RAYFARM_BLENDER_DIR")
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("rayfarm")) / "blender"


@dataclass(frozen=True)
class Environment:
    """One Blender environment on this node."""

    version: str
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def is_ready(self) -> bool:
        return (self.path / MARKER).is_file() and self.python.exists()

    def info(self) -> dict[str, str]:
        """What the environment recorded when it was built (bpy, Python, when)."""
        try:
            return dict(json.loads((self.path / MARKER).read_text()))
        except (OSError, ValueError):
            return {}


def environment(version: str, base: Path | None = None) -> Environment:
    key = version_key(version)
    return Environment(f"{key[0]}.{key[1]}", (base or root()) / f"{key[0]}.{key[1]}")


def installed(base: Path | None = None) -> list[Environment]:
    """The ready environments under ``base`` (the node's root), newest first."""
    base = base or root()
    found = []
    for entry in base.glob("*.*"):
        if _VERSION.match(entry.name):
            env = environment(entry.name, base)
            if env.is_ready:
                found.append(env)
    return sorted(found, key=lambda e: version_key(e.version), reverse=True)


def _python_version(path: str) -> tuple[int, int] | None:
    """The ``(major, minor)`` of the interpreter at ``path``, or None if it does not run
    (a pyenv shim for a version not selected fails here)."""
    try:
        out = subprocess.run(
            [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION.match(out.stdout.strip()) if out.returncode == 0 else None
    return (int(m[1]), int(m[2])) if m else None


def _pyenv_prefix(python: str) -> str | None:
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return None
    try:
        out = subprocess.run(
            [pyenv, "prefix", python], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    prefix = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout else ""
    return os.path.join(prefix, "bin", f"python{python}") if prefix else None


def python_setting(python: str) -> str:
    """The environment variable naming the interpreter for CPython ``python``."""
    return "RAYFARM_PYTHON_" + python.replace(".", "_")


def find_python(python: str) -> str:
    """A CPython ``python`` (``"3.13"``) interpreter on this machine; ``BlenderUnavailable``
    naming what was tried, and how to get one, when there is none."""
    wanted = version_key(python)
    setting = python_setting(python)
    configured = os.environ.get(setting)
    if configured:
        if _python_version(configured) == wanted:
            return configured
        raise BlenderUnavailable(
            f"{setting}={configured} is not a working CPython {python} interpreter",
            {"python": python, "setting": setting},
        )
    candidates: list[str | None] = [shutil.which(f"python{python}"), _pyenv_prefix(python)]
    home = os.path.expanduser("~")
    for pattern in (
        f"{home}/.pyenv/versions/{python}*/bin/python{python}",
        f"{home}/.local/share/uv/python/cpython-{python}*/bin/python{python}",
        f"/usr/bin/python{python}",
        f"/usr/local/bin/python{python}",
        f"/opt/homebrew/bin/python{python}",
    ):
        candidates.extend(sorted(glob.glob(pattern), reverse=True))
    if tuple(sys.version_info[:2]) == wanted:
        candidates.append(sys.executable)
    for candidate in candidates:
        if candidate and _python_version(candidate) == wanted:
            return candidate
    raise BlenderUnavailable(
        f"CPython {python} was not found on this machine ({setting} is not set, no "
        f"python{python} on PATH, none under pyenv or uv). Install it (`pyenv install "
        f"{python}`, `uv python install {python}`, or your system's python{python} "
        f"package), or set {setting} to its path",
        {"python": python, "setting": setting},
    )


def install(
    version: str,
    base: Path | None = None,
    say: Callable[[str], None] | None = None,
    force: bool = False,
) -> Environment:
    """Build the environment for Blender ``version`` (``bpy==version.*``) unless it is
    ready; return it. Safe to call from many processes of one node at once: one builds
    while the others wait on its lock, then use what it built. ``say`` gets progress
    lines (the CLI prints them)."""
    say = say or (lambda _line: None)
    env = environment(version, base)
    if env.is_ready and not force:
        return env
    env.path.parent.mkdir(parents=True, exist_ok=True)
    with open(env.path.parent / f".{env.version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if env.is_ready and not force:
                return env  # another process built it while we waited
            _build(env, say)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return env


def _build(env: Environment, say: Callable[[str], None]) -> None:
    python_line = python_for(env.version)
    interpreter = find_python(python_line)
    if env.path.exists():
        shutil.rmtree(env.path)  # half built (no marker), or rebuilt on request
    say(f"Blender {env.version}: creating {env.path} with {interpreter}")
    started = time.monotonic()
    _run([interpreter, "-m", "venv", str(env.path)], f"create a venv for Blender {env.version}")
    say(f"Blender {env.version}: installing bpy=={env.version}.* (about {WHEEL_MB} MB to download)")
    _run(
        [str(env.python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
         "--no-input", f"bpy=={env.version}.*"],
        f"install bpy {env.version}.* for CPython {python_line} (is it on your package index?)",
        INSTALL_TIMEOUT_S,
    )  # fmt: skip
    probe = (
        "import json, sys, bpy; print(json.dumps({'bpy': bpy.app.version_string, "
        "'python': '%d.%d.%d' % sys.version_info[:3]}))"
    )
    out = _run([str(env.python), "-c", probe], f"import bpy {env.version}")
    found = json.loads(out.strip().splitlines()[-1])
    if not str(found["bpy"]).startswith(f"{env.version}."):
        raise BlenderUnavailable(
            f"the environment for Blender {env.version} holds bpy {found['bpy']}",
            {"version": env.version},
        )
    record = {**found, "version": env.version, "interpreter": interpreter,
              "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    tmp = env.path / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, env.path / MARKER)
    say(f"Blender {env.version}: ready (bpy {found['bpy']}, {time.monotonic() - started:.0f} s)")


def _run(argv: list[str], what: str, timeout_s: float = 600) -> str:
    """Run ``argv``; on failure, ``BlenderUnavailable`` saying it could not ``what``, with
    the command's last lines."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BlenderUnavailable(f"could not {what}: {exc}") from None
    if out.returncode != 0:
        lines = [line for line in (out.stderr or out.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-6:]
        raise BlenderUnavailable(
            f"could not {what}: " + " | ".join(errors[-6:]), {"command": argv[:3]}
        )
    return out.stdout
