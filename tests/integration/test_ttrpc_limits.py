"""Issue 21 #5: what one ttRPC server holds is bounded. Requests are capped per method (16 KiB
by default, like cva's gRPC; a method registered with its own cap), a frame is read only up to
the largest cap plus the request envelope, and calls in flight are bounded per connection, per
server and (when registered so) per method: a call beyond a bound is RESOURCE_EXHAUSTED at once
and the server goes on serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent._proto.ttrpc import ttrpc_pb2
from agent.rpc.ttrpc import (
    DEFAULT_MAX_REQUEST_BYTES,
    MESSAGE_LENGTH_MAX,
    REQUEST_ENVELOPE_BYTES,
    CallContext,
    Code,
    MessageType,
    TtrpcServer,
    encode_frame,
)
from tests.ttrpc_peer import RawConnection

KIB = 1024


def _request(method: str, payload: bytes = b"") -> bytes:
    return ttrpc_pb2.Request(service="t.S", method=method, payload=payload).SerializeToString()


def _status(frame: tuple[object, bytes] | None) -> tuple[int, str, bytes]:
    assert frame is not None
    resp = ttrpc_pb2.Response.FromString(frame[1])
    return resp.status.code, resp.status.message, resp.payload


async def _echo(payload: bytes, _ctx: CallContext) -> bytes:
    return payload


class _Gate:
    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.entered = 0

    async def hang(self, _payload: bytes, _ctx: CallContext) -> bytes:
        self.entered += 1
        await self.open.wait()
        return b"done"


@pytest.fixture
def gate() -> _Gate:
    return _Gate()


@pytest.fixture
async def sock(tmp_path: Path, gate: _Gate) -> AsyncIterator[Path]:
    srv = TtrpcServer(max_inflight=3, max_server_inflight=4)
    srv.register("t.S/Echo", _echo)
    srv.register("t.S/Small", _echo, max_request_bytes=1 * KIB)
    srv.register("t.S/Hang", gate.hang)
    srv.register("t.S/One", gate.hang, max_inflight=1)
    await srv.listen_unix(tmp_path / "t.sock")
    yield tmp_path / "t.sock"
    gate.open.set()
    await srv.close(grace=1)


async def _call(conn: RawConnection, sid: int, method: str, payload: bytes = b"") -> None:
    await conn.send(encode_frame(sid, MessageType.REQUEST, _request(method, payload)))


def test_the_defaults_are_bounded() -> None:
    srv = TtrpcServer()
    assert srv.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES == 16 * KIB
    assert srv.request_frame_limit == 16 * KIB + REQUEST_ENVELOPE_BYTES
    assert srv.max_inflight * srv.max_connections > srv.max_server_inflight == 64
    srv.register("t.S/Big", _echo, max_request_bytes=MESSAGE_LENGTH_MAX - REQUEST_ENVELOPE_BYTES)
    assert srv.request_frame_limit == MESSAGE_LENGTH_MAX
    assert srv.request_limit("t.S/Big") == MESSAGE_LENGTH_MAX - REQUEST_ENVELOPE_BYTES
    with pytest.raises(ValueError, match="max_request_bytes out of range"):
        srv.register("t.S/Huge", _echo, max_request_bytes=MESSAGE_LENGTH_MAX)
    with pytest.raises(ValueError, match="max_inflight must be positive"):
        srv.register("t.S/Zero", _echo, max_inflight=0)


def test_cvas_fronts_use_the_bounded_defaults(tmp_path: Path) -> None:
    from agent.rpc.ttrpc_service import build_ttrpc_server
    from tests.daemon_support import contract, volume

    the_contract = contract(volume("pg"))

    class _Manager:
        contract = the_contract

    srv = build_ttrpc_server(
        _Manager(),  # type: ignore[arg-type]
        call_timeout=10,
        securemount_backend=None,
        header_dir=tmp_path,
    )
    assert srv.request_frame_limit == 16 * KIB + REQUEST_ENVELOPE_BYTES
    assert (srv.max_inflight, srv.max_server_inflight) == (16, 64)
    assert all(srv.request_limit(m) == 16 * KIB for m in srv.methods)


async def test_request_over_the_default_cap_is_refused(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    await _call(conn, 1, "Echo", b"x" * (16 * KIB))
    assert _status(await conn.read_frame()) == (0, "", b"x" * (16 * KIB))
    await _call(conn, 3, "Echo", b"x" * (16 * KIB + 1))
    code, message, _ = _status(await conn.read_frame())
    assert code == Code.RESOURCE_EXHAUSTED and "16384 bytes t.S/Echo accepts" in message
    await _call(conn, 5, "Echo", b"x" * (64 * KIB))  # beyond the frame limit: skipped
    code, message, _ = _status(await conn.read_frame())
    assert code == Code.RESOURCE_EXHAUSTED and "exceed maximum message size" in message
    await _call(conn, 7, "Echo", b"still in sync")
    assert _status(await conn.read_frame()) == (0, "", b"still in sync")


async def test_a_method_with_its_own_cap(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    await _call(conn, 1, "Small", b"x" * KIB)
    assert _status(await conn.read_frame())[0] == 0
    await _call(conn, 3, "Small", b"x" * (KIB + 1))
    assert _status(await conn.read_frame())[0] == Code.RESOURCE_EXHAUSTED


async def test_calls_in_flight_are_bounded_per_server(sock: Path, gate: _Gate) -> None:
    """max_inflight 3 per connection, 4 per server: two connections cannot hold 6."""
    a, b = await RawConnection.open(sock), await RawConnection.open(sock)
    for sid in (1, 3, 5):
        await _call(a, sid, "Hang")
    while gate.entered < 3:
        await asyncio.sleep(0.01)
    await _call(a, 7, "Echo", b"a4")  # over the connection's bound
    code, message, _ = _status(await a.read_frame())
    assert code == Code.RESOURCE_EXHAUSTED and "on this connection" in message
    await _call(b, 1, "Hang")
    while gate.entered < 4:
        await asyncio.sleep(0.01)
    await _call(b, 3, "Echo", b"b2")  # over the server's bound
    code, message, _ = _status(await b.read_frame())
    assert code == Code.RESOURCE_EXHAUSTED and "on this server" in message
    gate.open.set()
    answers = [_status(await a.read_frame()) for _ in range(3)]
    assert answers == [(0, "", b"done")] * 3
    assert _status(await b.read_frame()) == (0, "", b"done")
    await _call(b, 5, "Echo", b"after")  # the bound is released with the calls
    assert _status(await b.read_frame()) == (0, "", b"after")


async def test_a_method_with_its_own_inflight_bound(sock: Path, gate: _Gate) -> None:
    conn = await RawConnection.open(sock)
    await _call(conn, 1, "One")
    while gate.entered < 1:
        await asyncio.sleep(0.01)
    await _call(conn, 3, "One")
    code, message, _ = _status(await conn.read_frame())
    assert code == Code.RESOURCE_EXHAUSTED and "more than 1 t.S/One calls in flight" in message
    await _call(conn, 5, "Echo", b"others still run")
    assert _status(await conn.read_frame()) == (0, "", b"others still run")
    gate.open.set()
    assert _status(await conn.read_frame()) == (0, "", b"done")
    await _call(conn, 7, "One")  # released
    assert _status(await conn.read_frame()) == (0, "", b"done")


async def test_limits_apply_to_methods_served_without_a_handler(tmp_path: Path) -> None:
    """A front that forwards methods it does not register (issue 24's CDH relay) sets their
    caps with set_method_limits; every other call gets the server's default cap."""
    srv = TtrpcServer()
    srv.set_method_limits("t.Fwd/Big", max_request_bytes=64 * KIB, max_inflight=2)
    assert srv.request_limit("t.Fwd/Big") == 64 * KIB
    assert srv.request_limit("t.Fwd/Other") == DEFAULT_MAX_REQUEST_BYTES
    assert srv.request_frame_limit == 64 * KIB + REQUEST_ENVELOPE_BYTES
    await srv.listen_unix(tmp_path / "f.sock")
    try:
        conn = await RawConnection.open(tmp_path / "f.sock")

        async def call(sid: int, method: str, size: int) -> tuple[int, str, bytes]:
            frame = ttrpc_pb2.Request(service="t.Fwd", method=method, payload=b"x" * size)
            await conn.send(encode_frame(sid, MessageType.REQUEST, frame.SerializeToString()))
            return _status(await conn.read_frame())

        assert (await call(1, "Big", 64 * KIB))[0] == Code.UNIMPLEMENTED  # within its cap
        assert (await call(3, "Big", 64 * KIB + 1))[0] == Code.RESOURCE_EXHAUSTED
        assert (await call(5, "Other", 16 * KIB + 1))[0] == Code.RESOURCE_EXHAUSTED
        assert (await call(7, "Other", 16 * KIB))[0] == Code.UNIMPLEMENTED
    finally:
        await srv.close(grace=0.1)
