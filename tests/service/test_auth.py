"""Accounts, roles, tokens and the audit stream (rayfarm.cluster.auth) on a real Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from rayfarm.cluster.auth import AUDIT, TOKENS, AuthStore, Principal, Role, hash_token
from rayfarm.errors import InvalidRequest, NotFound


def _run(redis_url, body):
    async def main():
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await body(AuthStore(client, audit_maxlen=1000), client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_tokens_are_stored_only_as_their_hash_and_name_their_user(redis_url):
    async def body(auth, client):
        await auth.put_user("ana", Role.ARTIST, ["sh010"])
        token = await auth.create_token("ana", "laptop")
        stored = await client.hgetall(TOKENS)
        assert list(stored) == [hash_token(token).encode()]
        assert token.encode() not in b"".join(stored.values())
        who = await auth.principal(token)
        assert who == Principal("ana", Role.ARTIST, frozenset({"sh010"}))
        assert await auth.principal(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
        assert await auth.principal("not a token") is None
        assert await auth.revoke("ana") == 1
        assert await auth.principal(token) is None

    _run(redis_url, body)


def test_names_and_tokens_are_checked(redis_url):
    async def body(auth, client):
        for bad in ("", "a b", "../x", "x" * 65, "-lead"):
            with pytest.raises(InvalidRequest, match="name"):
                await auth.put_user(bad, Role.VIEWER)
        with pytest.raises(NotFound, match="no user nobody"):
            await auth.create_token("nobody")
        await auth.put_user("bo", Role.VIEWER)
        with pytest.raises(InvalidRequest, match="rf_"):
            await auth.create_token("bo", token="short")

    _run(redis_url, body)


def test_visibility_and_rights_follow_the_roles():
    admin = Principal("root", Role.ADMIN)
    ana = Principal("ana", Role.ARTIST, frozenset({"sh010"}))
    vic = Principal("vic", Role.VIEWER, frozenset({"sh010"}))
    assert admin.can_read("ana", None) and admin.can_change("ana") and admin.can_submit
    assert ana.can_read("ana", None) and ana.can_change("ana") and ana.can_submit
    assert ana.can_read("bo", "sh010") and not ana.can_change("bo")
    assert not ana.can_read("bo", None) and not ana.can_read("bo", "sh020")
    assert vic.can_read("bo", "sh010") and not vic.can_read("vic", None)
    assert not vic.can_change("vic") and not vic.can_submit


def test_the_first_admin_is_made_once_or_from_the_given_token(redis_url):
    async def body(auth, client):
        first = await auth.bootstrap(None)
        assert first is not None and (await auth.principal(first)).is_admin
        assert await auth.bootstrap(None) is None  # an admin exists: nothing new
        given = "rf_" + "x" * 43
        assert await auth.bootstrap(given) is None
        assert (await auth.principal(given)).name == "admin"
        assert await auth.bootstrap(given) is None  # already known: not stored twice
        assert await client.hlen(TOKENS) == 2

    _run(redis_url, body)


def test_the_audit_stream_is_filtered_newest_first_and_bounded(redis_url):
    async def body(auth, client):
        for i in range(1200):
            await auth.audit(who="ana" if i % 2 else "bo", action="POST /jobs", job=f"{i:016x}",
                             outcome=201)  # fmt: skip
        await auth.audit(who="-", action="sign-in failed", outcome=401, **{"from": "10.0.0.9"})
        newest = await auth.audit_log(limit=3)
        assert [r["action"] for r in newest] == ["sign-in failed", "POST /jobs", "POST /jobs"]
        assert newest[0]["from"] == "10.0.0.9" and newest[0]["outcome"] == "401"
        anas = await auth.audit_log(user="ana", limit=400)  # several pages of the stream
        assert len(anas) == 400 and {r["who"] for r in anas} == {"ana"}
        one = await auth.audit_log(job=f"{1199:016x}")
        assert [r["who"] for r in one] == ["ana"]
        assert await auth.audit_log(since="9999") == []
        assert 1000 <= await client.xlen(AUDIT) < 1201  # trimmed to about the bound

    _run(redis_url, body)
