"""The farm's limits piece by piece, without a farm: Serve's real HAProxy config hardened
and checked by the real HAProxy, the per-user stream leases on a real Redis, the
``--no-auth`` Host check on the ASGI app, and the SDK's local admin token, which goes to
the port it was written for and no other (over real HTTP servers)."""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from rayfarm import Farm, TooManyRequests
from rayfarm.cluster.accounts import is_loopback_host
from rayfarm.cluster.api import AppContext, create_app
from rayfarm.cluster.connections import address_key
from rayfarm.cluster.haproxy import MARK, HardeningError, harden
from rayfarm.cluster.local import write_token
from rayfarm.cluster.ports import free_port
from rayfarm.cluster.settings import EdgeLimits, Settings
from rayfarm.cluster.streams import StreamLeases

from helpers import PYTHON

WRAPPER = str(Path(PYTHON).parent / "rayfarm-haproxy")


def serve_config(folder: Path) -> Path:
    """The HAProxy config Ray Serve writes for an app with HTTP and gRPC, by Serve's own
    code (nothing is started)."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions, gRPCOptions

    grpc = gRPCOptions(port=18001, grpc_servicer_functions=["x.y:add"])
    cfg = HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=18000), grpc_options=grpc,
        is_head=True, socket_path=str(folder / "admin.sock"), server_state_base=str(folder),
        server_state_file=str(folder / "state"), has_received_routes=True,
        has_received_servers=True,
    )  # fmt: skip
    backends = {
        "http-app": BackendConfig(
            name="http-app", path_prefix="/", app_name="app",
            servers=[ServerConfig("r1", "127.0.0.1", 18002)],
            fallback_server=ServerConfig("fallback", "127.0.0.1", 18003),
        ),
        "grpc-app": BackendConfig(
            name="grpc-app", path_prefix="/", app_name="app", protocol=RequestProtocol.GRPC,
            servers=[ServerConfig("g1", "127.0.0.1", 18004)],
        ),
    }  # fmt: skip
    path = folder / "haproxy.cfg"
    HAProxyApi(cfg, backends, config_file_path=str(path))._generate_config_file_internal()
    return path


def test_serves_haproxy_config_is_hardened_and_haproxy_takes_it(tmp_path):
    path = serve_config(tmp_path)
    original = path.read_text()
    assert "mode 666" in original and "bind *:" in original  # what Serve writes
    limits = EdgeLimits(max_client_connections=7, header_timeout_s=2.5, client_timeout_s=9)
    hardened = harden(original, limits)
    assert harden(hardened, limits) == hardened  # a second run changes nothing
    lines = [line.strip() for line in hardened.splitlines()]
    (socket_line,) = [x for x in lines if x.startswith("stats socket")]
    assert " mode 600 " in socket_line and "666" not in socket_line
    binds = [x.split()[1] for x in lines if x.startswith("bind ")]
    assert [b for b in binds if not b.startswith("127.0.0.1:")] == []
    assert {"127.0.0.1:18000", "127.0.0.1:18001"} <= set(binds)
    # Both public frontends carry the limits.
    for frontend in ("http_frontend", "grpc_frontend"):
        section = hardened.split(f"frontend {frontend}\n", 1)[1].split("\nbackend ", 1)[0]
        assert "tcp-request connection reject if { sc0_conn_cur gt 7 }" in section
        assert "timeout http-request 2500ms" in section and "timeout client 9000ms" in section
        assert "http-request set-header X-Forwarded-For %[src]" in section
    # The real HAProxy accepts it: run through the wrapper, as Serve does (-c: check only).
    check = subprocess.run(
        [WRAPPER, "-c", "-f", str(path)], capture_output=True, text=True, timeout=60,
        env={"RAYFARM_MAX_CLIENT_CONNECTIONS": "7", "RAYFARM_HEADER_TIMEOUT_S": "2.5",
             "RAYFARM_CLIENT_TIMEOUT_S": "9", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert path.read_text() == hardened


def test_a_config_of_an_unknown_shape_starts_no_haproxy(tmp_path):
    path = serve_config(tmp_path)
    odd = path.read_text().replace("frontend http_frontend", "frontend web")
    with pytest.raises(HardeningError, match="no http_frontend"):
        harden(odd, EdgeLimits())
    path.write_text(odd)
    run = subprocess.run([WRAPPER, "-c", "-f", str(path)], capture_output=True, text=True)
    assert run.returncode == 1 and "not starting HAProxy" in run.stderr
    assert not path.read_text().startswith(MARK)


def test_limits_are_checked_when_the_farm_starts():
    with pytest.raises(ValueError, match="max_client_connections"):
        Settings(max_connections=100, max_client_connections=200, blender=("5.0",))
    with pytest.raises(ValueError, match="max_streams_per_user"):
        Settings(max_streams_per_user=0, blender=("5.0",))


def test_an_ipv6_client_counts_as_its_64():
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9")
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7" == address_key("192.0.2.7")


def test_stream_leases_count_per_user_and_expire_with_a_dead_replica(redis_url):
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            leases = StreamLeases(client, limit=2, lease_s=1.0)
            a, b = await leases.take("ana", "s1"), await leases.take("ana", "s2")
            with pytest.raises(TooManyRequests, match="2 event streams"):
                await leases.take("ana", "s3")
            await leases.take("bo", "s1")  # others have their own count
            await a.release()
            await a.release()  # once only
            c = await leases.take("ana", "s3")
            assert await leases.count("ana") == 2
            # A replica that dies holding leases never releases them: they expire.
            dead = StreamLeases(client, limit=2, lease_s=1.0)
            await b.release()
            await c.release()
            await dead.take("ana", "s4"), await dead.take("ana", "s5")
            with pytest.raises(TooManyRequests):
                await leases.take("ana", "s6")
            await asyncio.sleep(1.2)
            await leases.take("ana", "s6")
        finally:
            await client.aclose()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1:8000", True), ("localhost", True), ("[::1]:8000", True),
        ("app.localhost:8000", True), ("127.8.9.10", True), ("LOCALHOST:1", True),
        ("evil.example:8000", False), ("127.0.0.1.nip.io", False), ("localhost.evil", False),
        ("192.0.2.2:8000", False), ("", False), ("[::1", False),
    ],
)  # fmt: skip
def test_loopback_host_names(host, loopback):
    assert is_loopback_host(host) is loopback


def test_a_farm_without_accounts_refuses_a_foreign_host_name(redis_url, tmp_path):
    settings = Settings(redis_url=redis_url, storage=(tmp_path / "s").as_uri(),
                        data_dir=str(tmp_path), auth=False, blender=("5.0",))  # fmt: skip
    app = create_app(AppContext.build(settings))
    with TestClient(app, base_url="http://rebound.example:8000") as rebound:
        r = rebound.get("/jobs")
        assert r.status_code == 403 and r.json()["error"]["detail"]["host"].startswith("rebound")
        assert rebound.get("/jobs", headers={"Host": "localhost:8000"}).status_code == 200
    # With accounts on, the token is what counts: any Host gets its 401.
    settings = Settings(redis_url=redis_url, storage=(tmp_path / "s").as_uri(),
                        data_dir=str(tmp_path), blender=("5.0",))  # fmt: skip
    with TestClient(create_app(AppContext.build(settings)), base_url="http://farm.example") as c:
        assert c.get("/jobs").status_code == 401


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A "farm" that notes the Authorization header of every request."""

    seen: list[str | None]

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        body = b'{"user": "x", "role": "admin", "projects": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recording_server() -> Iterator[tuple[int, list[str | None]]]:
    seen: list[str | None] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port, seen
    server.shutdown()
    server.server_close()


def test_the_local_admin_token_goes_to_its_own_farm_only(tmp_path, monkeypatch, recording_server):
    """Another local user's "farm" on another loopback port asks the SDK for nothing and
    gets no token; the farm the token was written for gets it."""
    port, seen = recording_server
    monkeypatch.delenv("RAYFARM_TOKEN")
    monkeypatch.setenv("RAYFARM_DATA_DIR", str(tmp_path))
    token = "rf_" + "T" * 43
    write_token(tmp_path, token, free_port())  # a farm on some other port wrote it
    with Farm(f"http://127.0.0.1:{port}") as impostor:
        impostor.whoami()
    assert seen == [None]
    write_token(tmp_path, token, port)  # now it is this port's farm
    for url in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        with Farm(url) as farm:
            farm.whoami()
    assert seen == [None, f"Bearer {token}", f"Bearer {token}"]
    # A file written before ports were recorded names no farm: it is sent nowhere.
    (tmp_path / "admin-token").write_text(token + "\n")
    with Farm(f"http://127.0.0.1:{port}") as farm:
        farm.whoami()
    assert seen[-1] is None
