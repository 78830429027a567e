"""The HTTP API as an ASGI app on a real Redis and file:// storage (no Ray: nothing
renders), and what tests of it check: refusals, and the keys a request leaves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from fastapi.testclient import TestClient

from rayfarm.cluster.api import AppContext, create_app
from rayfarm.cluster.local import bootstrap_admin
from rayfarm.cluster.settings import Settings

from helpers import ADMIN_TOKEN, AUTH

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "rayfarm-test",
    "AWS_SECRET_ACCESS_KEY": "rayfarm-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


#: Farm-wide keys a refused request may touch: counters (accepted uploads), accounts, and
#: the audit stream (a refusal is audited too); and the changes stream, which the app's
#: webhook sender makes when it starts (its consumer group lives there).
FARM_KEYS = {b"rayfarm:metrics", b"rayfarm:users", b"rayfarm:tokens", b"rayfarm:audit",
             b"rayfarm:changes"}  # fmt: skip


#: What an accepted upload leaves (the blob index: who uploaded what, for the quota) and
#: rate limits' buckets.
FARM_PREFIXES = (b"rayfarm:blob:", b"rayfarm:uploads:", b"rayfarm:upload_bytes",
                 b"rayfarm:blobs", b"rayfarm:limit:")  # fmt: skip


def job_keys(client: redis.Redis) -> list[bytes]:
    """Redis keys other than the farm-wide ones (what a job or a stored upload leaves)."""
    return [k for k in client.keys("rayfarm:*")
            if k not in FARM_KEYS and not k.startswith(FARM_PREFIXES)]  # fmt: skip


@contextmanager
def api_client(
    redis_url: str, tmp_path: Path, notify: Any = None, **overrides: Any
) -> Iterator[TestClient]:
    """The HTTP API as an ASGI app on a real Redis and ``file://`` storage under
    ``tmp_path`` (no Ray: nothing renders), its first admin ``ADMIN_TOKEN``, offering
    Blender 5.0; ``overrides`` are ``Settings`` fields. The client sends the admin's token
    and carries ``storage_dir`` and a ``redis`` client."""
    values = {"redis_url": redis_url, "storage": (tmp_path / "storage").as_uri(),
              "data_dir": str(tmp_path), "blender": ("5.0",), **overrides}  # fmt: skip
    settings = Settings(**values)
    ctx = AppContext.build(settings, notify=notify)
    bootstrap_admin(redis_url, ADMIN_TOKEN)
    with TestClient(create_app(ctx), raise_server_exceptions=False, headers=AUTH) as client:
        client.storage_dir = tmp_path / "storage"  # type: ignore[attr-defined]
        client.redis = redis.Redis.from_url(redis_url)  # type: ignore[attr-defined]
        try:
            yield client
        finally:
            client.redis.close()  # type: ignore[attr-defined]


def user_headers(api: Any, name: str, role: str = "artist", projects: Any = ()) -> dict[str, str]:
    """Headers with a new token for user ``name`` (made by the admin through ``api``)."""
    r = api.post("/tokens", json={"user": name, "role": role, "projects": list(projects)})
    return {"Authorization": f"Bearer {r.json()['token']}"}


def refused(response: Any, status: int, fragment: str) -> dict[str, Any]:
    """The error body of ``response``, which must be ``status`` with ``fragment`` in its
    message."""
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"], response.text
    error: dict[str, Any] = response.json()["error"]
    return error
