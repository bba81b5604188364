"""Silent, slow and idle ttRPC peers over real unix sockets: a connection that sends no complete
frame header within HEADER_TIMEOUT is closed, and idle connections cannot hold the connection
limit against a new peer; a busy or recently active connection is never evicted.

The timeouts are the module constants (monkeypatched small here), so these tests exercise the
server as `agent.rpc.ttrpc_service` builds it, with no extra arguments."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent._proto.ttrpc import ttrpc_pb2
from agent.rpc import ttrpc
from agent.rpc.ttrpc import CallContext, MessageType, TtrpcServer, encode_frame
from tests.ttrpc_peer import RawConnection

HEADER = 0.4
IDLE = 0.6


def call(stream_id: int, method: str = "Echo", payload: bytes = b"x") -> bytes:
    req = ttrpc_pb2.Request(service="test.Echo", method=method, payload=payload)
    return encode_frame(stream_id, MessageType.REQUEST, req.SerializeToString())


async def echo(payload: bytes, ctx: CallContext) -> bytes:
    return payload


async def hang(payload: bytes, ctx: CallContext) -> bytes:
    await asyncio.Event().wait()
    return b""


@pytest.fixture
async def sock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Path]:
    monkeypatch.setattr(ttrpc, "HEADER_TIMEOUT", HEADER, raising=False)
    monkeypatch.setattr(ttrpc, "IDLE_EVICT_AFTER", IDLE, raising=False)
    srv = TtrpcServer(max_connections=2)
    srv.register("test.Echo/Echo", echo)
    srv.register("test.Echo/Hang", hang)
    path = tmp_path / "t.sock"
    await srv.listen_unix(path)
    yield path
    await srv.close(grace=0.1)


async def served(conn: RawConnection, stream_id: int = 1) -> bool:
    await conn.send(call(stream_id))
    frame = await conn.read_frame(timeout=5)
    return frame is not None and frame[0].stream_id == stream_id


async def closed_within(conn: RawConnection, seconds: float) -> float:
    start = time.monotonic()
    assert await conn.at_eof(timeout=seconds), "the server kept the connection open"
    return time.monotonic() - start


async def test_a_silent_connection_is_closed(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    assert await closed_within(conn, HEADER + 2) >= HEADER - 0.1


@pytest.mark.parametrize("sent", [b"\x00", b"\x00\x00\x00\x05\x00"], ids=["1 byte", "5 bytes"])
async def test_a_slowloris_header_is_closed(sock: Path, sent: bytes) -> None:
    """A first header dribbled in: the deadline counts from the accept, not the last byte."""
    conn = await RawConnection.open(sock)
    await conn.send(sent)
    await closed_within(conn, HEADER + 2)


async def test_a_later_header_must_complete_too(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    assert await served(conn)
    await conn.send(call(3)[:4])  # a started header, never finished (frame_timeout is 30 s)
    await closed_within(conn, HEADER + 2)


async def test_an_idle_connection_is_kept_when_there_is_room(sock: Path) -> None:
    """kata-agent dials the CDH socket once and keeps that connection: idling is allowed."""
    conn = await RawConnection.open(sock)
    assert await served(conn)
    await asyncio.sleep(IDLE + HEADER + 0.3)
    assert await served(conn, 3)
    await conn.close()


async def test_silent_connections_cannot_hold_the_limit(sock: Path) -> None:
    squatters = [await RawConnection.open(sock) for _ in range(2)]
    await asyncio.sleep(0.05)
    fresh = await RawConnection.open(sock)  # at once, not after the squatters' timeout
    start = time.monotonic()
    assert await served(fresh)
    assert time.monotonic() - start < HEADER
    await fresh.close()
    for s in squatters:
        await s.close()


async def test_idle_connections_cannot_hold_the_limit(sock: Path) -> None:
    old, newer = await RawConnection.open(sock), await RawConnection.open(sock)
    assert await served(old)
    await asyncio.sleep(0.2)
    assert await served(newer)
    await asyncio.sleep(IDLE)
    fresh = await RawConnection.open(sock)
    assert await served(fresh)
    await closed_within(old, 2)  # the longest idle made room
    assert await served(newer, 3)
    for c in (newer, fresh):
        await c.close()


async def test_recently_active_or_busy_connections_are_not_evicted(sock: Path) -> None:
    busy, active = await RawConnection.open(sock), await RawConnection.open(sock)
    await busy.send(call(1, "Hang"))  # in flight forever
    assert await served(active)
    await asyncio.sleep(IDLE + 0.2)
    assert await served(active, 3)  # active again just now
    refused = await RawConnection.open(sock)
    await closed_within(refused, 2)
    assert await served(active, 5)  # both still there
    for c in (busy, active):
        await c.close()
