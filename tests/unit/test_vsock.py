"""The vsock front door: AF_VSOCK bind/listen for real; accept + splice through a unix listener
(the same code path; there is no vsock loopback here and CIDs 1/2 are never dialled)."""

from __future__ import annotations

import asyncio
import errno
import socket
from pathlib import Path

import pytest

from agent.vsock import SpliceListener, describe_peer, vsock_listen_socket


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
    payload = bytes(range(256)) * 1024  # bigger than one chunk
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
    w1.write(b"x")
    assert await r1.readexactly(1) == b"x"
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
    w.write(b"a")
    assert await r.readexactly(1) == b"a"
    await front.stop_accepting()
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
    w.write(b"b")
    assert await r.readexactly(1) == b"b"
    await front.close()
    assert await asyncio.wait_for(r.read(), 5) == b""
    backend.close()
