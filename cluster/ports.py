"""Free ports for the servers a local farm starts (Redis, Serve's proxies, HAProxy).

A listening port is taken from 20000-32000, below Linux's ephemeral range
(32768-60999 by default): a port the kernel hands out for ``bind(0)`` is also what
it gives outgoing connections, and Ray opens many. A port picked that way was taken
by an outgoing connection between the pick and the server's bind — HAProxy failed
with "cannot bind socket (Address already in use)", seen twice in CI, once on
Serve's metrics port and once on the farm's own HTTP port.
"""

from __future__ import annotations

import random
import socket
from contextlib import ExitStack

from rayfarm.errors import InvalidRequest

__all__ = ["LISTEN_PORTS", "free_port", "free_range"]

#: Where listening ports are picked: [low, high).
LISTEN_PORTS = (20000, 32000)

#: Ports this process handed out already: two picks in a row (a farm's HTTP and gRPC
#: ports) are probed free one after the other and would otherwise be able to coincide.
_given: set[int] = set()


def free_range(span: int, tries: int = 200) -> int:
    """The first port of ``span`` consecutive ports nothing listens on now (on any
    interface), none of them handed out before by this process."""
    low, high = LISTEN_PORTS
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(low, high - span)
        ports = range(base, base + span)
        if _given.intersection(ports):
            continue
        try:
            with ExitStack() as stack:
                for port in ports:
                    probe = stack.enter_context(socket.socket())
                    probe.bind(("0.0.0.0", port))
        except OSError:
            continue
        _given.update(ports)
        return base
    raise InvalidRequest(f"found no {span} free consecutive ports in {low}-{high}")


def free_port() -> int:
    """One port nothing listens on now, from below the ephemeral range."""
    return free_range(1)
