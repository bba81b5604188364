"""The ttRPC server's relay hook (`TtrpcServer.set_relay`, used by the CDH front): it sees the
frame payload byte for byte, its answer goes out unchanged, None dispatches locally, and its
failures become statuses like a handler's."""

from __future__ import annotations

from pathlib import Path

from agent._proto.ttrpc import ttrpc_pb2
from agent.rpc.ttrpc import (
    MESSAGE_LENGTH_MAX,
    CallContext,
    Code,
    MessageType,
    RpcError,
    TtrpcServer,
    encode_frame,
)
from tests.ttrpc_peer import RawConnection


async def echo(payload: bytes, ctx: CallContext) -> bytes:
    return payload[::-1]


async def test_relay(tmp_path: Path) -> None:
    seen: list[tuple[bytes, str, float]] = []

    async def relay(raw: bytes, request: ttrpc_pb2.Request, ctx: CallContext) -> bytes | None:
        seen.append((raw, request.method, ctx.timeout))
        if request.method == "Local":
            return None
        if request.method == "Refuse":
            raise RpcError(Code.PERMISSION_DENIED, "no")
        if request.method == "Crash":
            raise RuntimeError("detail that must not leak")
        if request.method == "Huge":
            return b"\x00" * (MESSAGE_LENGTH_MAX + 1)
        return b"\x12\x02ok" + raw[:0]  # a Response with payload "ok", as the relay wrote it

    server = TtrpcServer(max_timeout=30.0)
    server.register("t.S/Local", echo)
    server.set_relay(relay)
    sock = tmp_path / "s.sock"
    await server.listen_unix(sock)
    conn = await RawConnection.open(sock)
    answers = {}
    try:
        for stream, method in enumerate(("Local", "Other", "Refuse", "Crash", "Huge")):
            req = ttrpc_pb2.Request(
                service="t.S", method=method, payload=b"abc", timeout_nano=2_000_000_000
            )
            data = req.SerializeToString() + b"\x42\x00"  # an unknown field, kept
            await conn.send(encode_frame(2 * stream + 1, MessageType.REQUEST, data))
            frame = await conn.read_frame()
            assert frame is not None
            answers[method] = frame[1]
    finally:
        await conn.close()
        await server.close()
    assert seen[0][0].endswith(b"\x42\x00") and seen[0][2] == 2.0
    assert ttrpc_pb2.Response.FromString(answers["Local"]).payload == b"cba"
    assert answers["Other"] == b"\x12\x02ok"
    refused = ttrpc_pb2.Response.FromString(answers["Refuse"]).status
    assert (refused.code, refused.message) == (Code.PERMISSION_DENIED, "no")
    crashed = ttrpc_pb2.Response.FromString(answers["Crash"]).status
    assert (crashed.code, crashed.message) == (Code.INTERNAL, "internal error")
    huge = ttrpc_pb2.Response.FromString(answers["Huge"]).status
    assert huge.code == Code.INTERNAL
