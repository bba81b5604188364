"""ttRPC over a real AF_VSOCK connection inside the guest (the vsock loopback transport): what
`listen.ttrpc_vsock_port` serves. The host has no vsock transport to dial, so this is where the
vsock path of cva's ttRPC server gets a real round trip."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator

import pytest

from agent._proto.ttrpc import ttrpc_pb2
from agent.rpc.ttrpc import CallContext, MessageType, TtrpcServer, encode_frame
from agent.rpc.vsock import vsock_listen_socket
from luks.run import run
from tests.ttrpc_peer import RawConnection

if os.environ.get("CVA_IN_GUEST") != "1":  # before any guest-only mark is looked up
    pytest.skip("runs inside the qemu guest (make vm-test)", allow_module_level=True)

pytestmark = [pytest.mark.vm]

PORT = 41041
VMADDR_CID_LOCAL = 1


async def echo(payload: bytes, ctx: CallContext) -> bytes:
    return payload[::-1]


@pytest.fixture
async def vsock_server() -> AsyncIterator[TtrpcServer]:
    run(["modprobe", "vsock_loopback"], timeout=30)
    srv = TtrpcServer()
    srv.register("test.Echo/Echo", echo)
    await srv.listen_socket(vsock_listen_socket(PORT))
    yield srv
    await srv.close(grace=0.5)


async def open_vsock() -> RawConnection:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (VMADDR_CID_LOCAL, PORT))
    reader, writer = await asyncio.open_connection(sock=sock)
    return RawConnection(reader, writer)


async def test_round_trip_and_unknown_method_over_vsock(vsock_server: TtrpcServer) -> None:
    conn = await open_vsock()
    try:
        req = ttrpc_pb2.Request(service="test.Echo", method="Echo", payload=b"vsock")
        await conn.send(encode_frame(1, MessageType.REQUEST, req.SerializeToString()))
        frame = await conn.read_frame()
        assert frame is not None
        resp = ttrpc_pb2.Response.FromString(frame[1])
        assert (resp.status.code, resp.payload) == (0, b"kcosv")
        bad = ttrpc_pb2.Request(service="test.Echo", method="Nope")
        await conn.send(encode_frame(3, MessageType.REQUEST, bad.SerializeToString()))
        frame = await conn.read_frame()
        assert frame is not None
        assert ttrpc_pb2.Response.FromString(frame[1]).status.code == 12  # UNIMPLEMENTED
    finally:
        await conn.close()
