"""Rate limits and the priority range, kept in Redis so every API replica shares them.

- **Failed sign-ins, per client address** (``client_address``): a token bucket of
  ``auth_failure_burst`` wrong credentials, refilled at ``auth_failures_per_min``; past
  it a request with wrong credentials is answered 429 with ``Retry-After``. A *valid*
  token still works from that address: the address may be shared by many users (an
  office's NAT, or the proxy's own address when it does not forward the client's), and
  a 256-bit token is not guessed anyway; what the limit protects is the farm's work and
  its audit log. A request with no credentials at all (a browser opening the page
  before signing in) guesses nothing: always 401, never counted against the address.
- **Refused anonymous requests in the audit log** (failed sign-ins, a cross-site
  form): aggregated, at most one record per address and kind a minute and
  ``auth_audit_per_min`` farm-wide, each with the ``count`` since the previous one;
  ``/metrics`` counts every one. A stranger cannot push the real records out.
- **Submissions, per user** (artists; admins are not limited): a token bucket of
  ``submit_burst`` jobs, refilled at ``submit_per_min``; 429 past it.
- **Priority**: an artist's job may have priority 0..``artist_max_priority`` (403
  above it); an admin's, 0..100.

Limits and their settings are listed in docs/security.md.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from rayfarm.cluster import keys
from rayfarm.cluster.auth import AuthStore, Principal
from rayfarm.cluster.settings import Settings
from rayfarm.errors import Forbidden, TooManyRequests
from rayfarm.models import JobSpec

__all__ = ["Limits"]

_LUA = resources.files("rayfarm.cluster").joinpath("lua")
#: How long a tally of refusals waits for its audit record (the next refusal from the
#: same address after a quiet minute writes it).
TALLY_S = 86_400


def _seconds(ms: int) -> int:
    return max(1, math.ceil(ms / 1000))


class Limits:
    """The farm's rate limits and priority range over an asyncio Redis client."""

    def __init__(self, redis: Any, auth: AuthStore, settings: Settings) -> None:
        self.auth, self.settings = auth, settings
        self._take = redis.register_script(_LUA.joinpath("take_token.lua").read_text())
        self._tally = redis.register_script(_LUA.joinpath("tally_refusal.lua").read_text())

    async def take(self, kind: str, who: str, per_min: float, burst: int) -> int:
        """Take a token from ``who``'s ``kind`` bucket: 0, or the milliseconds until one
        is there (refused)."""
        ok, wait_ms = await self._take(keys=[keys.limit(kind, who)], args=[per_min / 60, burst])
        return 0 if int(ok) else int(wait_ms)

    # -- sign-ins ------------------------------------------------------------------------

    async def sign_in_failed(self, address: str, reason: str, guess: bool = True) -> None:
        """Tally a failed sign-in from ``address`` for the audit log and, when it sent
        credentials (``guess``), count it against the address: ``TooManyRequests`` past
        the limit; else the caller answers 401."""
        s = self.settings
        wait_ms = 0
        if guess:
            wait_ms = await self.take(
                "auth", address, s.auth_failures_per_min, s.auth_failure_burst
            )
        outcome = 429 if wait_ms else 401
        await self.refused(address, "sign-in", "sign-in failed", outcome, reason)
        if wait_ms:
            raise TooManyRequests(
                f"too many failed sign-ins from {address or 'this address'}: the farm takes "
                f"{s.auth_failure_burst} at once and then {s.auth_failures_per_min:g} a minute "
                "from one address (RAYFARM_AUTH_FAILURE_BURST, RAYFARM_AUTH_FAILURES_PER_MIN); "
                f"retry in {_seconds(wait_ms)} s with a valid token (a valid token is always "
                "taken)",
                {"retry_after_s": _seconds(wait_ms), "address": address},
            )

    async def refused(
        self, address: str, kind: str, action: str, outcome: int, detail: str = ""
    ) -> None:
        """Tally a state-changing request no signed-in user made (a failed sign-in, a
        cross-site form, a sign-out without a session); write the audit record when
        one is due (see the module's docstring)."""
        first = json.dumps({"action": action, "outcome": outcome, "detail": detail})
        tally = await self._tally(
            keys=[keys.tally(kind, address), keys.limit("record", f"{kind}:{address}"),
                  keys.limit("record", "*"), keys.metrics()],
            args=[first, int(outcome == 429), self.settings.auth_audit_per_min,
                  f"refused_{kind.replace('-', '_')}_total", TALLY_S],
        )  # fmt: skip
        if not tally:
            return
        count, throttled, since, text = tally
        what = json.loads(text)
        await self.auth.audit(
            who="", action=what["action"], outcome=what["outcome"], count=count,
            detail=f"{count} request(s) without a valid token from {address or '?'} since "
                   f"{datetime.fromtimestamp(float(since), UTC).isoformat(timespec='seconds')} "
                   f"({throttled} answered 429); the first: {what['detail'] or what['action']}",
            **{"from": address},
        )  # fmt: skip

    # -- submissions ---------------------------------------------------------------------

    async def take_submission(self, who: Principal) -> None:
        """One submission of ``who``'s: ``TooManyRequests`` past the user's rate (admins
        are not limited)."""
        if who.is_admin:
            return
        s = self.settings
        wait_ms = await self.take("submit", who.name, s.submit_per_min, s.submit_burst)
        if wait_ms:
            raise TooManyRequests(
                f"{who.name} is submitting too fast: the farm takes {s.submit_burst} jobs at "
                f"once and then {s.submit_per_min:g} a minute from each user "
                f"(RAYFARM_SUBMIT_BURST, RAYFARM_SUBMIT_PER_MIN); retry in "
                f"{_seconds(wait_ms)} s",
                {"retry_after_s": _seconds(wait_ms), "user": who.name},
            )

    def check_priority(self, who: Principal, spec: JobSpec) -> JobSpec:
        """``spec`` unless its priority is above what ``who`` may use (403)."""
        top = 100 if who.is_admin else self.settings.artist_max_priority
        if spec.priority > top:
            raise Forbidden(
                f"priority {spec.priority} is above the range an artist may use: 0-{top} "
                "(RAYFARM_ARTIST_MAX_PRIORITY, set by the farm's admins; an admin may give "
                "any job 0-100)",
                {"field": "priority", "min": 0, "max": top},
            )
        return spec
