"""The vsock front door: AF_VSOCK bind/listen for real; accept + splice through a unix listener
(the same code path; there is no vsock loopback here and CIDs 1/2 are never dialled)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from pathlib import Path

import pytest

from agent.rpc import vsock
from agent.rpc.vsock import SpliceListener, describe_peer, vsock_listen_socket

# every gRPC connection opens with the HTTP/2 client preface (RFC 9113 §3.4); the echo backend
# sends it back
P = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_the_preface_is_rfc_9113s() -> None:
    assert vsock.HTTP2_PREFACE == P


def test_vsock_bind_and_listen() -> None:
    try:
        sock = vsock_listen_socket(0xFFFF_FFF0 - 7)
    except OSError as exc:
        if exc.errno in (errno.EAFNOSUPPORT, errno.ENODEV, errno.EADDRNOTAVAIL):
            pytest.skip(f"no vsock transport here ({exc.strerror})")
        raise
    with sock:
        cid, port = sock.getsockname()
        assert cid == socket.VMADDR_CID_ANY and port == 0xFFFF_FFF0 - 7
        assert sock.family == socket.AF_VSOCK and not sock.getblocking()


def test_vsock_port_in_use_is_an_oserror() -> None:
    try:
        first = vsock_listen_socket(0xFFFF_FFF0 - 9)
    except OSError:
        pytest.skip("no vsock transport here")
    with first, pytest.raises(OSError):
        vsock_listen_socket(0xFFFF_FFF0 - 9)


def test_describe_peer() -> None:
    assert describe_peer((2, 1234)) == {"peer_cid": 2, "peer_port": 1234}
    assert describe_peer("") == {"peer": ""}


async def _echo_server(path: Path) -> asyncio.Server:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    return await asyncio.start_unix_server(echo, path=str(path))


def _unix_listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(8)
    s.setblocking(False)
    return s


async def test_splice_copies_both_ways_and_logs_the_peer(tmp_path: Path) -> None:
    backend = await _echo_server(tmp_path / "grpc.sock")
    events: list[tuple[str, dict[str, object]]] = []
    front = SpliceListener(
        _unix_listener(tmp_path / "front.sock"),
        tmp_path / "grpc.sock",
        log=lambda e, **kw: events.append((e, kw)),
    )
    await front.start()
    r, w = await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
    payload = P + bytes(range(256)) * 1024  # bigger than one chunk
    w.write(payload)
    await w.drain()
    assert await r.readexactly(len(payload)) == payload
    w.close()
    await front.close()
    backend.close()
    assert events and events[0][0] == "vsock_connection" and "peer" in events[0][1]


async def test_unreachable_backend_closes_the_connection(tmp_path: Path) -> None:
    events: list[str] = []
    front = SpliceListener(
        _unix_listener(tmp_path / "front.sock"),
        tmp_path / "missing.sock",
        log=lambda e, **kw: events.append(e),
    )
    await front.start()
    r, w = await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
    w.write(P)
    assert await asyncio.wait_for(r.read(), 5) == b""
    w.close()
    await front.close()
    assert "vsock_backend_unreachable" in events


async def test_connection_limit(tmp_path: Path) -> None:
    backend = await _echo_server(tmp_path / "grpc.sock")
    events: list[str] = []
    front = SpliceListener(
        _unix_listener(tmp_path / "front.sock"),
        tmp_path / "grpc.sock",
        max_connections=1,
        log=lambda e, **kw: events.append(e),
    )
    await front.start()
    r1, w1 = await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
    w1.write(P + b"x")
    assert await r1.readexactly(len(P) + 1) == P + b"x"
    r2, w2 = await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
    assert await asyncio.wait_for(r2.read(), 5) == b""
    assert "vsock_connection_refused" in events
    w1.close()
    w2.close()
    await front.close()
    backend.close()


async def test_stop_accepting_keeps_live_connections(tmp_path: Path) -> None:
    backend = await _echo_server(tmp_path / "grpc.sock")
    front = SpliceListener(_unix_listener(tmp_path / "front.sock"), tmp_path / "grpc.sock")
    await front.start()
    r, w = await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
    w.write(P + b"a")
    assert await r.readexactly(len(P) + 1) == P + b"a"
    await front.stop_accepting()
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
    w.write(b"b")
    assert await r.readexactly(1) == b"b"
    await front.close()
    assert await asyncio.wait_for(r.read(), 5) == b""
    backend.close()


# -- silent, slow, non-HTTP/2 and idle peers (the constants monkeypatched small) -------------------

PREFACE_S = 0.4
IDLE_S = 0.6


@pytest.fixture
async def front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(vsock, "PREFACE_TIMEOUT", PREFACE_S, raising=False)
    monkeypatch.setattr(vsock, "IDLE_EVICT_AFTER", IDLE_S, raising=False)
    backend_conns: list[bytes] = []

    async def backend_handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = await r.read(len(P))
        backend_conns.append(first)
        w.write(first)
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    backend = await asyncio.start_unix_server(backend_handler, path=str(tmp_path / "grpc.sock"))
    events: list[str] = []
    listener = SpliceListener(
        _unix_listener(tmp_path / "front.sock"),
        tmp_path / "grpc.sock",
        max_connections=2,
        log=lambda e, **kw: events.append(e),
    )
    await listener.start()
    yield tmp_path / "front.sock", events, backend_conns
    await listener.close()
    backend.close()


async def _open(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path))


async def _spliced(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes = b"") -> bool:
    w.write(data)
    await w.drain()
    try:
        got = await asyncio.wait_for(r.readexactly(len(data)), 5)
    except asyncio.IncompleteReadError:
        return False
    return got == data


async def _closed_within(r: asyncio.StreamReader, seconds: float) -> None:
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(r.read(), seconds) == b""


async def test_a_silent_connection_is_closed_before_the_backend(front) -> None:  # type: ignore[no-untyped-def]
    path, events, backend_conns = front
    r, w = await _open(path)
    await _closed_within(r, PREFACE_S + 2)
    assert "vsock_connection_closed" in events and backend_conns == []
    w.close()


async def test_a_slow_preface_is_closed(front) -> None:  # type: ignore[no-untyped-def]
    path, _events, backend_conns = front
    r, w = await _open(path)
    for byte in P[:10]:  # a byte now and then: the deadline counts from the accept
        w.write(bytes([byte]))
        await asyncio.sleep(PREFACE_S / 8)
    await _closed_within(r, PREFACE_S + 2)
    assert backend_conns == []
    w.close()


async def test_not_http2_is_closed(front) -> None:  # type: ignore[no-untyped-def]
    path, events, backend_conns = front
    r, w = await _open(path)
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await _closed_within(r, 2)
    assert backend_conns == [] and "vsock_connection_closed" in events
    w.close()


async def test_silent_connections_cannot_hold_the_limit(front) -> None:  # type: ignore[no-untyped-def]
    path, events, _ = front
    squatters = [await _open(path) for _ in range(2)]
    await asyncio.sleep(0.05)
    r, w = await _open(path)
    assert await _spliced(r, w, P + b"hello")
    assert "vsock_connection_evicted" in events
    w.close()
    for _r, sw in squatters:
        sw.close()


async def test_idle_spliced_connections_cannot_hold_the_limit(front) -> None:  # type: ignore[no-untyped-def]
    path, _events, _ = front
    old, newer = await _open(path), await _open(path)
    assert await _spliced(*old, P)
    await asyncio.sleep(0.2)
    assert await _spliced(*newer, P)
    await asyncio.sleep(IDLE_S)
    fresh = await _open(path)
    assert await _spliced(*fresh, P)
    await _closed_within(old[0], 2)  # the longest idle made room
    assert await _spliced(*newer, b"still here")
    for _r, w in (old, newer, fresh):
        w.close()


async def test_active_connections_are_not_evicted(front) -> None:  # type: ignore[no-untyped-def]
    path, events, _ = front
    a, b = await _open(path), await _open(path)
    assert await _spliced(*a, P) and await _spliced(*b, P)
    await asyncio.sleep(IDLE_S + 0.2)
    assert await _spliced(*a, b"1") and await _spliced(*b, b"2")  # both active just now
    r, w = await _open(path)
    await _closed_within(r, 2)
    assert "vsock_connection_refused" in events
    assert await _spliced(*a, b"3") and await _spliced(*b, b"4")
    for _r, cw in (a, b, (r, w)):
        cw.close()


async def test_a_real_grpc_client_gets_through_the_preface_check(tmp_path: Path) -> None:
    """grpc.aio server behind the splice, grpc.aio client in front: the real preface passes."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"unix:{tmp_path / 'grpc.sock'}")
    await server.start()
    front = SpliceListener(_unix_listener(tmp_path / "front.sock"), tmp_path / "grpc.sock")
    await front.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'front.sock'}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await front.close()
        await server.stop(0)
