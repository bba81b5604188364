"""Hostile frames against cva's ttRPC server over a raw unix socket: clean answers or a closed
connection, never a crash, and the server keeps serving everyone else."""

from __future__ import annotations

import asyncio
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent._proto.ttrpc import ttrpc_pb2
from agent.errors import CvaError
from agent.rpc.ttrpc import (
    MESSAGE_LENGTH_MAX,
    CallContext,
    Code,
    FrameError,
    MessageType,
    TtrpcServer,
    encode_frame,
    parse_header,
)
from tests.ttrpc_peer import RawConnection


def request(service: str = "test.Echo", method: str = "Echo", payload: bytes = b"", **kw: int):
    return ttrpc_pb2.Request(
        service=service, method=method, payload=payload, **kw
    ).SerializeToString()


def status_of(frame_payload: bytes) -> tuple[int, str, bytes]:
    resp = ttrpc_pb2.Response.FromString(frame_payload)
    return resp.status.code, resp.status.message, resp.payload


async def echo(payload: bytes, ctx: CallContext) -> bytes:
    return payload


async def hang(payload: bytes, ctx: CallContext) -> bytes:
    await asyncio.Event().wait()
    return b""


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[TtrpcServer]:
    srv = TtrpcServer(frame_timeout=0.5, max_inflight=4)
    srv.register("test.Echo/Echo", echo)
    srv.register("test.Echo/Hang", hang)
    await srv.listen_unix(tmp_path / "t.sock")
    yield srv
    await srv.close(grace=0.1)


@pytest.fixture
def sock(tmp_path: Path, server: TtrpcServer) -> Path:
    return tmp_path / "t.sock"


async def still_serves(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(encode_frame(1, MessageType.REQUEST, request(payload=b"alive")))
    frame = await conn.read_frame()
    assert frame is not None
    assert frame[0].stream_id == 1
    assert status_of(frame[1]) == (0, "", b"alive")
    await conn.close()


async def test_valid_request_round_trip(sock: Path) -> None:
    await still_serves(sock)


async def test_oversized_frame_is_skipped_and_answered(sock: Path, server: TtrpcServer) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(struct.pack(">IIBB", MESSAGE_LENGTH_MAX + 1, 7, 1, 0))
    await conn.send(b"\x00" * (MESSAGE_LENGTH_MAX + 1))
    frame = await conn.read_frame()
    assert frame is not None
    assert frame[0].stream_id == 7
    assert frame[0].type == MessageType.RESPONSE
    code, message, _ = status_of(frame[1])
    assert code == Code.RESOURCE_EXHAUSTED
    assert str(server.request_frame_limit) in message
    # as in containerd, the connection stays in sync and usable
    await conn.send(encode_frame(9, MessageType.REQUEST, request(payload=b"next")))
    frame = await conn.read_frame()
    assert frame is not None
    assert status_of(frame[1]) == (0, "", b"next")


async def test_oversized_frame_that_stalls_is_dropped(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(struct.pack(">IIBB", MESSAGE_LENGTH_MAX + 1, 7, 1, 0) + b"partial")
    assert await conn.read_frame() is None
    await still_serves(sock)


async def test_huge_length_field_is_not_read(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(b"\xff\xff\xff\xff\x00\x00\x00\x01\x01\x00")
    frame = await conn.read_frame()
    assert frame is not None
    assert status_of(frame[1])[0] == Code.RESOURCE_EXHAUSTED
    assert await conn.at_eof()


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00",  # truncated header
        struct.pack(">IIBB", 100, 1, 1, 0) + b"x" * 10,  # truncated payload
    ],
    ids=["truncated-header", "truncated-payload"],
)
async def test_truncated_frame_closes_the_connection(sock: Path, data: bytes) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(data)
    conn.writer.write_eof()
    assert await conn.read_frame() is None
    await still_serves(sock)


async def test_stalled_frame_is_dropped_after_frame_timeout(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(struct.pack(">IIBB", 100, 1, 1, 0) + b"x")  # and then nothing
    assert await conn.at_eof()


@pytest.mark.parametrize("mtype", [0, MessageType.RESPONSE, MessageType.DATA, 0xFF])
async def test_other_frame_types_are_ignored(sock: Path, mtype: int) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(encode_frame(1, mtype, b"whatever"))
    await conn.send(encode_frame(3, MessageType.REQUEST, request(payload=b"next")))
    frame = await conn.read_frame()
    assert frame is not None
    assert frame[0].stream_id == 3
    assert status_of(frame[1]) == (0, "", b"next")


async def test_undecodable_request_gets_invalid_argument(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(encode_frame(5, MessageType.REQUEST, b"\x0a\xff\xff\xff\xff\x0f"))
    frame = await conn.read_frame()
    assert frame is not None
    assert frame[0].stream_id == 5
    assert status_of(frame[1])[:2] == (Code.INVALID_ARGUMENT, "unmarshal request error")
    # the connection stays usable, as in containerd
    await conn.send(encode_frame(7, MessageType.REQUEST, request(payload=b"ok")))
    frame = await conn.read_frame()
    assert frame is not None
    assert status_of(frame[1]) == (0, "", b"ok")


@pytest.mark.parametrize("stream_id", [0, 2, 0xFFFFFFFE])
async def test_even_stream_id_is_refused(sock: Path, stream_id: int) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(encode_frame(stream_id, MessageType.REQUEST, request()))
    frame = await conn.read_frame()
    assert frame is not None
    assert frame[0].stream_id == stream_id
    code, message, _ = status_of(frame[1])
    assert code == Code.INVALID_ARGUMENT
    assert "odd" in message


async def test_unknown_service_and_method(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(encode_frame(1, MessageType.REQUEST, request(service="nope.Svc")))
    await conn.send(encode_frame(3, MessageType.REQUEST, request(method="Nope")))
    answers = {}
    for _ in range(2):
        frame = await conn.read_frame()
        assert frame is not None
        answers[frame[0].stream_id] = status_of(frame[1])[:2]
    assert answers == {
        1: (Code.UNIMPLEMENTED, "service nope.Svc"),
        3: (Code.UNIMPLEMENTED, "method Nope"),
    }


async def test_negative_timeout_is_already_expired(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(encode_frame(1, MessageType.REQUEST, request(timeout_nano=-1)))
    frame = await conn.read_frame()
    assert frame is not None
    assert status_of(frame[1])[0] == Code.DEADLINE_EXCEEDED


async def test_stream_id_reused_while_in_flight_closes(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(encode_frame(1, MessageType.REQUEST, request(method="Hang")))
    await conn.send(encode_frame(1, MessageType.REQUEST, request(method="Hang")))
    assert await conn.at_eof()
    await still_serves(sock)


async def test_inflight_limit_per_connection(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    for sid in (1, 3, 5, 7):
        await conn.send(encode_frame(sid, MessageType.REQUEST, request(method="Hang")))
    await conn.send(encode_frame(9, MessageType.REQUEST, request(payload=b"one too many")))
    frame = await conn.read_frame()
    assert frame is not None
    assert frame[0].stream_id == 9
    assert status_of(frame[1])[0] == Code.RESOURCE_EXHAUSTED


async def test_socket_file_mode_and_refusal_of_non_socket(tmp_path: Path, sock: Path) -> None:
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    srv = TtrpcServer()
    with pytest.raises(CvaError, match="is not a socket"):
        await srv.listen_unix(plain)
    assert plain.read_text() == "not a socket"


async def test_close_refuses_new_connections_and_removes_socket(tmp_path: Path) -> None:
    srv = TtrpcServer()
    srv.register("test.Echo/Echo", echo)
    path = tmp_path / "c.sock"
    await srv.listen_unix(path)
    conn = await RawConnection.open(path)
    await conn.send(encode_frame(1, MessageType.REQUEST, request(payload=b"x")))
    assert await conn.read_frame() is not None  # now an idle, accepted connection
    await srv.close(grace=0.1)
    assert not path.exists()
    assert await conn.at_eof()
    with pytest.raises(OSError):
        await RawConnection.open(path)


def test_parse_header_rejects_wrong_sizes() -> None:
    with pytest.raises(FrameError):
        parse_header(b"\x00" * 9)
    h = parse_header(struct.pack(">IIBB", 5, 9, 1, 4))
    assert (h.length, h.stream_id, h.type, h.flags) == (5, 9, 1, 4)


def test_register_rejects_bad_names_and_duplicates() -> None:
    srv = TtrpcServer()
    srv.register("/pkg.Svc/M", echo)  # a leading slash, as in gRPC paths, is accepted
    assert srv.methods == frozenset({"pkg.Svc/M"})
    for bad in ("pkg.Svc", "/M", "pkg.Svc/"):
        with pytest.raises(ValueError, match=r"not 'package\.Service/Method'"):
            srv.register(bad, echo)
    with pytest.raises(ValueError, match="already registered"):
        srv.register("pkg.Svc/M", echo)


@given(st.binary(min_size=10, max_size=10))
def test_parse_header_any_ten_bytes(data: bytes) -> None:
    h = parse_header(data)
    assert encode_frame(h.stream_id, h.type, b"", h.flags)[4:] == data[4:]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(max_size=300))
def test_any_bytes_get_answers_or_a_close(tmp_path: Path, garbage: bytes) -> None:
    """Whatever a peer writes, the server answers well-formed frames or closes, and still
    serves the next connection."""

    async def run() -> None:
        srv = TtrpcServer(frame_timeout=0.2)
        srv.register("test.Echo/Echo", echo)
        path = tmp_path / "h.sock"
        await srv.listen_unix(path)
        try:
            conn = await RawConnection.open(path)
            await conn.send(garbage)
            conn.writer.write_eof()
            while True:
                frame = await conn.read_frame()
                if frame is None:
                    break
                assert frame[0].type == MessageType.RESPONSE
                ttrpc_pb2.Response.FromString(frame[1])
            await still_serves(path)
        finally:
            await srv.close(grace=0.1)

    asyncio.run(run())


async def test_connection_limit(tmp_path: Path) -> None:
    srv = TtrpcServer(max_connections=1)
    srv.register("test.Echo/Echo", echo)
    path = tmp_path / "l.sock"
    await srv.listen_unix(path)
    try:
        first = await RawConnection.open(path)
        await first.send(encode_frame(1, MessageType.REQUEST, request(payload=b"1")))
        assert await first.read_frame() is not None  # accepted and counted
        second = await RawConnection.open(path)
        assert await second.at_eof()
        await first.send(encode_frame(3, MessageType.REQUEST, request(payload=b"2")))
        assert await first.read_frame() is not None
    finally:
        await srv.close(grace=0.1)


async def test_close_cancels_calls_that_outlive_the_grace(tmp_path: Path) -> None:
    cancelled = asyncio.Event()

    async def stuck(payload: bytes, ctx: CallContext) -> bytes:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return b""

    srv = TtrpcServer()
    srv.register("test.Echo/Stuck", stuck)
    path = tmp_path / "g.sock"
    await srv.listen_unix(path)
    conn = await RawConnection.open(path)
    await conn.send(encode_frame(1, MessageType.REQUEST, request(method="Stuck")))
    while not srv._connections or not next(iter(srv._connections)).inflight:
        await asyncio.sleep(0.01)
    await srv.close(grace=0.05)
    assert cancelled.is_set()
    assert await conn.read_frame() is None  # no answer, the connection is closed


async def test_listen_on_a_prebound_socket(tmp_path: Path) -> None:
    """listen_socket serves any bound, listening stream socket (the daemon's AF_VSOCK one)."""
    import socket

    path = tmp_path / "pre.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    srv = TtrpcServer()
    srv.register("test.Echo/Echo", echo)
    await srv.listen_socket(sock)
    try:
        await still_serves(path)
    finally:
        await srv.close(grace=0.1)


async def test_half_closed_peer_still_gets_its_answers(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(
        encode_frame(1, MessageType.REQUEST, request(payload=b"a"))
        + encode_frame(3, MessageType.REQUEST, request(payload=b"b"))
    )
    conn.writer.write_eof()
    answers = {}
    while (frame := await conn.read_frame()) is not None:
        answers[frame[0].stream_id] = status_of(frame[1])
    assert answers == {1: (0, "", b"a"), 3: (0, "", b"b")}


async def test_long_unknown_names_are_clipped_in_the_status(sock: Path) -> None:
    conn = await RawConnection.open(sock)
    await conn.send(encode_frame(1, MessageType.REQUEST, request(service="s" * 10_000)))
    frame = await conn.read_frame()
    assert frame is not None
    code, message, _ = status_of(frame[1])
    assert code == Code.UNIMPLEMENTED
    assert message == "service " + "s" * 200 + "..."
