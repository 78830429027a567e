"""Job-end notifications: a webhook per user and per job, called when a job ends
(COMPLETED, FAILED or CANCELLED) with a signed JSON body and retried with backoff.

- A user's webhook: ``PUT /webhook`` ``{"url": ...}`` sets it and answers its signing
  secret (made once; ``"rotate": true`` makes a new one), ``GET /webhook`` shows both,
  ``DELETE /webhook`` removes the URL (routes in ``rayfarm.cluster.accounts``). A job's
  own: ``JobSpec.webhook``, kept apart from the job's spec when it is created (the farm
  does not show it back).
- The body: ``{"id", "event": "job.completed" | "job.failed" | "job.cancelled",
  "attempt", "sent_at", "job": {...}}``; the header ``X-Rayfarm-Signature: sha256=HEX`` is
  the HMAC-SHA256 of the body with the owner's secret. ``id`` is the same on every attempt
  (a receiver drops repeats by it).
- Who sends: every API replica runs a ``Notifier``, which reads job ends from the farm's
  changes stream in a Redis consumer group (each end goes to one replica; one a dead
  replica had read is claimed by another after ``CLAIM_IDLE_MS``). A delivery answered
  other than 2xx is tried again after ``webhook_backoff_s``, doubling each time, up to
  ``webhook_attempts`` tries (``keys.webhooks_due``); each outcome is a ``webhook`` event
  in the job's log.
- Where to: http(s) only, never following redirects, and only to public addresses unless
  the host is one of ``webhook_allow_hosts`` (a name, an address or a network): a user's
  URL must not turn the farm against its own private network. A name is resolved once
  and the call goes to the address checked (DNS rebinding cannot redirect it).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

import rayfarm
from rayfarm.cluster import keys
from rayfarm.cluster.event_log import now_iso
from rayfarm.cluster.settings import Settings
from rayfarm.cluster.store import JobStore
from rayfarm.models import JobState

__all__ = ["SIGNATURE_HEADER", "Notifier", "WebhookStore", "sign"]

log = logging.getLogger("rayfarm.webhooks")

SIGNATURE_HEADER = "X-Rayfarm-Signature"
#: The consumer group of the changes stream that delivers notifications.
GROUP = "webhooks"
#: A read entry no replica acknowledged for this long is claimed by another.
CLAIM_IDLE_MS = 60_000
#: Longest a retry waits, however many attempts came before.
MAX_BACKOFF_S = 3600.0
#: Entries (job ends, due retries) handled per round.
BATCH = 50
#: How long one read of the changes stream waits for news.
BLOCK_MS = 1000
_ENDS = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}


def sign(secret: str, body: bytes) -> str:
    """The ``X-Rayfarm-Signature`` value for ``body``: ``sha256=`` and the hex HMAC."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookStore:
    """Each user's webhook URL and signing secret (``keys.webhooks``)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    async def get(self, user: str) -> dict[str, str | None]:
        text = await self.redis.hget(keys.webhooks(), user)
        found = json.loads(text) if text else {}
        return {"url": found.get("url"), "secret": found.get("secret")}

    async def put(self, user: str, url: str | None, rotate: bool = False) -> dict[str, str | None]:
        """Set ``user``'s URL (None: none); a secret is made the first time, or with
        ``rotate``. Returns both."""
        found = await self.get(user)
        secret = found["secret"] if found["secret"] and not rotate else new_secret()
        record = {"url": url, "secret": secret}
        await self.redis.hset(keys.webhooks(), user, json.dumps(record))
        return record

    async def secret(self, user: str) -> str:
        """``user``'s signing secret, made now if they have none."""
        found = await self.get(user)
        if found["secret"]:
            return found["secret"]
        return str((await self.put(user, found["url"]))["secret"])


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


# -- delivery --------------------------------------------------------------------------------


class Notifier:
    """Sends job-end notifications (see the module's docstring); ``run`` loops forever."""

    def __init__(
        self, redis: Any, store: JobStore, webhooks: WebhookStore, settings: Settings
    ) -> None:
        self.redis, self.store, self.webhooks, self.settings = redis, store, webhooks, settings
        self.consumer = uuid.uuid4().hex[:12]
        self._claimed_at = 0.0

    async def run(self) -> None:
        """Deliver until cancelled; Redis away: try again a second later."""
        async with httpx.AsyncClient(
            timeout=self.settings.webhook_timeout_s, follow_redirects=False,
            headers={"User-Agent": f"rayfarm/{rayfarm.__version__}"},
        ) as http:  # fmt: skip
            while True:
                try:
                    await self._ensure_group()
                    while True:
                        await self.round(http)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.warning("webhook delivery failed; trying again", exc_info=True)
                    await asyncio.sleep(1.0)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(keys.changes(), GROUP, id="$", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def round(self, http: httpx.AsyncClient) -> None:
        """Job ends new to the group (or left by a dead replica), then retries due now."""
        entries: list[tuple[str, dict[str, str]]] = []
        if time.monotonic() - self._claimed_at > CLAIM_IDLE_MS / 1000:
            self._claimed_at = time.monotonic()
            _, entries, *_ = await self.redis.xautoclaim(
                keys.changes(), GROUP, self.consumer, CLAIM_IDLE_MS, count=BATCH
            )
        if not entries:
            due = await self.redis.zrangebyscore(keys.webhooks_due(), 0, time.time(), 0, BATCH)
            block = None if due else BLOCK_MS
            read = await self.redis.xreadgroup(
                GROUP, self.consumer, {keys.changes(): ">"}, count=BATCH, block=block
            )
            entries = read[0][1] if read else []
        else:
            due = []
        jobs = [(entry_id, f["job"], f["state"]) for entry_id, f in entries
                if f and f.get("state") in _ENDS]  # fmt: skip
        sends = []
        for entry_id, job_id, state in jobs:
            sends += await self._first_attempts(entry_id, job_id, state)
        for item in due:
            if await self.redis.zrem(keys.webhooks_due(), item):  # this replica's to send
                sends.append(json.loads(item))
        if sends:
            await asyncio.gather(*(self._attempt(http, d) for d in sends))
        if entries:
            await self.redis.xack(keys.changes(), GROUP, *[e for e, _ in entries])

    async def _first_attempts(self, entry_id: str, job_id: str, state: str) -> list[dict]:
        """A delivery for each URL the ended job notifies: its own, its owner's."""
        owner, spec, url, error = await self.redis.hmget(
            keys.job(job_id), ["owner", "spec", "webhook", "error"]
        )
        if owner is None:
            return []  # deleted meanwhile
        mine = await self.webhooks.get(owner)
        urls = [u for u in dict.fromkeys([url, mine["url"]]) if u]
        if not urls:
            return []
        status = await self.store.status(job_id)
        job = {
            "id": job_id, "state": state, "owner": owner,
            "project": json.loads(spec).get("project") if spec else None,
            "error": error or None, "frames_done": status.frames_done,
            "frames_total": status.frames_total,
        }  # fmt: skip
        event = f"job.{state.lower()}"
        return [{"id": f"{entry_id}-{n}", "url": u, "event": event, "job": job, "attempt": 1}
                for n, u in enumerate(urls)]  # fmt: skip

    async def _attempt(self, http: httpx.AsyncClient, delivery: dict[str, Any]) -> None:
        """Send one delivery; a failure is tried again later until attempts run out."""
        job_id, attempt = delivery["job"]["id"], delivery["attempt"]
        body = json.dumps({
            "id": delivery["id"], "event": delivery["event"], "attempt": attempt,
            "sent_at": now_iso(), "job": delivery["job"],
        }).encode()  # fmt: skip
        secret = await self.webhooks.secret(delivery["job"]["owner"])
        headers = {
            "Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body),
            "X-Rayfarm-Event": delivery["event"], "X-Rayfarm-Delivery": delivery["id"],
        }  # fmt: skip
        try:
            url, pinned = await self._pin(delivery["url"])
            extensions = {}
            if pinned is not None:  # connect to the address checked, not to a new answer
                headers["Host"] = pinned
                if url.startswith("https:"):
                    extensions["sni_hostname"] = urlsplit(delivery["url"]).hostname
            response = await http.post(url, content=body, headers=headers, extensions=extensions)
            outcome = f"HTTP {response.status_code}"
            ok = 200 <= response.status_code < 300
        except _Refused as exc:
            await self._log(job_id, delivery, attempt, f"refused: {exc}", final=True)
            return
        except httpx.HTTPError as exc:
            outcome, ok = f"{type(exc).__name__}: {exc}"[:200], False
        if ok:
            await self._log(job_id, delivery, attempt, "delivered " + outcome, final=True)
            return
        final = attempt >= self.settings.webhook_attempts
        if not final:
            wait_s = min(MAX_BACKOFF_S, self.settings.webhook_backoff_s * 2 ** (attempt - 1))
            retry = json.dumps({**delivery, "attempt": attempt + 1})
            await self.redis.zadd(keys.webhooks_due(), {retry: time.time() + wait_s})
        await self._log(job_id, delivery, attempt, outcome, final)

    async def _log(
        self, job_id: str, delivery: dict[str, Any], attempt: int, outcome: str, final: bool
    ) -> None:
        """A ``webhook`` event in the job's log (not for a job deleted meanwhile)."""
        if not await self.redis.exists(keys.job(job_id)):
            return
        if not final:
            outcome += f"; trying again (attempt {attempt + 1} of {self.settings.webhook_attempts})"
        elif not outcome.startswith(("delivered", "refused")):
            outcome += f"; gave up after {attempt} attempt(s)"
        await self.store.event(
            job_id, "webhook", delivery=delivery["id"], url=_redacted(delivery["url"]),
            attempt=attempt, outcome=outcome,
        )  # fmt: skip

    async def _pin(self, url: str) -> tuple[str, str | None]:
        """The URL to call and, when its host is a name, the ``Host`` to send: a name is
        resolved once, each of its addresses checked, and the call goes to the first of
        them (IPv4 first), so a second DNS answer cannot send it elsewhere. A host that is,
        or resolves to, a loopback, private, link-local or otherwise non-public address
        is refused (``_Refused``) unless ``webhook_allow_hosts`` allows it; a name the
        list names is called as it is."""
        parts = urlsplit(url)
        host, allowed = parts.hostname or "", self.settings.webhook_allow_hosts
        try:
            addresses = [ipaddress.ip_address(host)]
            literal = True
        except ValueError:
            if _allowed(host, allowed):
                return url, None
            try:
                found = await asyncio.get_running_loop().getaddrinfo(
                    host, parts.port, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from None
            addresses = sorted({ipaddress.ip_address(info[4][0]) for info in found},
                               key=lambda a: (a.version, str(a)))  # fmt: skip
            literal = False
        for address in addresses:
            if not address.is_global and not _allowed(str(address), allowed):
                raise _Refused(
                    f"{host} is a non-public address ({address}); the farm's admin may allow "
                    "it with RAYFARM_WEBHOOK_ALLOW_HOSTS"
                )
        if literal or not addresses:
            return url, None
        first = addresses[0]
        netloc = f"[{first}]" if first.version == 6 else str(first)
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc)), parts.netloc


class _Refused(Exception):
    """A webhook URL the farm will not call (never retried)."""


def _allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``host`` (a name or an address) is one of ``allowed``: names compared
    exactly (case aside), addresses against addresses and networks."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() in {a.lower() for a in allowed}
    for item in allowed:
        try:
            if address in ipaddress.ip_network(item, strict=False):
                return True
        except ValueError:
            continue
    return False


def _redacted(url: str) -> str:
    """A URL for the job's log: its path and query may hold a token of the receiver's."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..." if parts.path.strip("/") else url
