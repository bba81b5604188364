"""agent.cdh.upstream against a hostile or broken peer: whatever bytes come back, a forwarded
call ends with the peer's Response bytes or with one clear status (never a hang past the
deadline, never an exception other than RpcError)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent._proto.ttrpc import ttrpc_pb2
from agent.cdh.upstream import forward
from agent.rpc.ttrpc import MESSAGE_LENGTH_MAX, Code, MessageType, RpcError, encode_frame

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
REQUEST = ttrpc_pb2.Request(
    service="api.GetResourceService", method="GetResource"
).SerializeToString()


async def call_with(tmp_path: Path, reply: Reply, *, timeout: float = 5.0) -> bytes:
    sock = tmp_path / "up.sock"
    sock.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(reply, path=str(sock))
    try:
        return await forward(sock, REQUEST, timeout=timeout)
    finally:
        server.close()


def answering(data: bytes, *, close: bool = True) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(10 + len(REQUEST))
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()
        else:
            await asyncio.sleep(30)

    return reply


async def test_the_answer_comes_back_as_sent(tmp_path: Path) -> None:
    answer = ttrpc_pb2.Response(payload=b"\x0a\x03abc").SerializeToString() + b"\x7a\x01\x00"
    skipped = encode_frame(3, MessageType.RESPONSE, b"other stream")
    data = skipped + encode_frame(1, MessageType.RESPONSE, answer)
    assert await call_with(tmp_path, answering(data)) == answer


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", Code.UNAVAILABLE),  # closed without answering
        (b"\x00\x00", Code.UNAVAILABLE),  # half a header
        (struct.pack(">IIBB", MESSAGE_LENGTH_MAX + 1, 1, 2, 0), Code.RESOURCE_EXHAUSTED),
        (encode_frame(1, MessageType.RESPONSE, b"\xff\xff\xff"), Code.INTERNAL),
        (encode_frame(3, MessageType.RESPONSE, b"") * 20, Code.INTERNAL),  # never ours
    ],
)
async def test_broken_answers_get_one_status(tmp_path: Path, data: bytes, code: Code) -> None:
    with pytest.raises(RpcError) as info:
        await call_with(tmp_path, answering(data))
    assert info.value.rpc_code == code
    assert "CDH upstream" in str(info.value)


async def test_silence_ends_at_the_deadline(tmp_path: Path) -> None:
    with pytest.raises(RpcError) as info:
        await call_with(tmp_path, answering(b"", close=False), timeout=0.3)
    assert info.value.rpc_code == Code.DEADLINE_EXCEEDED


async def test_no_upstream_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(RpcError) as info:
        await forward(tmp_path / "none.sock", REQUEST, timeout=5)
    assert info.value.rpc_code == Code.UNAVAILABLE
    assert str(tmp_path / "none.sock") in str(info.value)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=600))
async def test_any_bytes_end_in_an_answer_or_a_status(tmp_path: Path, data: bytes) -> None:
    try:
        got = await call_with(tmp_path, answering(data), timeout=2.0)
    except RpcError as exc:
        assert exc.rpc_code in (
            Code.UNAVAILABLE,
            Code.INTERNAL,
            Code.RESOURCE_EXHAUSTED,
            Code.DEADLINE_EXCEEDED,
        )
    else:
        ttrpc_pb2.Response.FromString(got)
