"""cva's gRPC vsock front door (agent.rpc.vsock) under hostile peers, over a real AF_VSOCK
transport.

In the guest, `vsock_loopback` gives AF_VSOCK connections to CID 1 (VMADDR_CID_LOCAL). The
listener is cva's own (`vsock_listen_socket` + `SpliceListener` with its default connection
limit) in front of a grpc.aio server with the Health service on a private unix socket, as in
`cva serve`. grpcio cannot dial vsock, so the real gRPC calls go through a client-side bridge
(unix socket -> AF_VSOCK, `tests.tools.tcp_forward`); every byte still crosses cva's vsock
listener and splice.

The host is hostile: it may open connections as fast as it likes, leave them silent, send half a
preface, half-close them. None of that may stop a real call from succeeding: silent peers and
unfinished prefaces are closed after PREFACE_TIMEOUT, and at the limit they are evicted first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from luks.run import run

if os.environ.get("CVA_IN_GUEST") != "1":  # before any guest-only mark is looked up
    pytest.skip("runs inside the qemu guest (make vm-test)", allow_module_level=True)

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from agent.rpc.vsock import DEFAULT_MAX_CONNECTIONS, SpliceListener, vsock_listen_socket
from tests.tools.tcp_forward import make_handler, open_vsock

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]

VMADDR_CID_LOCAL = 1
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Front:
    port: int
    bridge: Path  # unix socket: grpc client -> AF_VSOCK (CID 1, port) -> cva's splice
    events: list[tuple[str, dict[str, Any]]]

    async def health(self, timeout: float = 10.0) -> int:
        async with grpc.aio.insecure_channel(f"unix:{self.bridge}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return int(answer.status)

    async def peer(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await open_vsock(VMADDR_CID_LOCAL, self.port)

    def count(self, event: str) -> int:
        return sum(1 for name, _ in self.events if name == event)


@pytest.fixture
async def front(tmp_path: Path) -> AsyncIterator[Front]:
    run(["modprobe", "vsock_loopback"], timeout=30)
    private = tmp_path / "grpc.sock"
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    server.add_insecure_port(f"unix:{private}")
    await server.start()
    port = 42000 + uuid.uuid4().int % 20000
    events: list[tuple[str, dict[str, Any]]] = []
    splice = SpliceListener(
        vsock_listen_socket(port), private, log=lambda e, **kw: events.append((e, kw))
    )
    await splice.start()
    bridge_path = tmp_path / "bridge.sock"
    bridge = await asyncio.start_unix_server(
        make_handler(lambda: open_vsock(VMADDR_CID_LOCAL, port), log=lambda _s: None),
        str(bridge_path),
    )
    try:
        yield Front(port, bridge_path, events)
    finally:
        bridge.close()
        await splice.close()
        await server.stop(0)


SERVING = health_pb2.HealthCheckResponse.SERVING


async def test_a_real_grpc_call_over_vsock_logs_the_peer_cid(front: Front) -> None:
    assert await front.health() == SERVING
    conns = [kw for name, kw in front.events if name == "vsock_connection"]
    assert conns and conns[0]["peer_cid"] == VMADDR_CID_LOCAL
    assert isinstance(conns[0]["peer_port"], int)


async def test_a_flood_of_short_connections_does_not_stop_a_real_call(front: Front) -> None:
    async def churn(n: int) -> None:
        for _ in range(n):
            with contextlib.suppress(OSError):
                _r, w = await front.peer()
                w.write(b"\x00" * 64)
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    flood = asyncio.gather(*(churn(25) for _ in range(16)))  # 400 connections, 16 at a time
    during = await asyncio.gather(*(front.health(timeout=30) for _ in range(5)))
    await flood
    assert during == [SERVING] * 5
    assert await front.health() == SERVING
    assert front.count("vsock_connection") >= 400


async def test_half_open_and_garbage_peers_do_not_stop_a_real_call(front: Front) -> None:
    peers = []
    for i in range(40):
        r, w = await front.peer()
        if i % 2:
            w.write(PREFACE[:10])  # half a preface, then half-close (SHUT_WR)
            w.write_eof()
        else:
            w.write(b"GET / HTTP/1.1\r\n\r\n" + os.urandom(512))  # not HTTP/2 at all
        peers.append((r, w))
    assert await front.health() == SERVING
    # every one of them is cut (gRPC closes a bad preface; the splice ends on a half-close)
    for r, _w in peers:
        await asyncio.wait_for(r.read(), 20)
    for _r, w in peers:
        w.close()
    assert await front.health() == SERVING


async def test_silent_peers_below_the_limit_and_gone_peers_leave_room(front: Front) -> None:
    silent = [await front.peer() for _ in range(DEFAULT_MAX_CONNECTIONS - 4)]
    assert await front.health() == SERVING  # the limit still has room
    for _r, w in silent:
        w.close()
    await asyncio.sleep(3)  # the splice sees each EOF and gives its slot back
    # the slots come back once the peers go: a second full round still leaves room
    silent = [await front.peer() for _ in range(DEFAULT_MAX_CONNECTIONS - 4)]
    try:
        assert await front.health() == SERVING
    finally:
        for _r, w in silent:
            w.close()


async def test_silent_peers_filling_every_slot_do_not_stop_a_real_call(front: Front) -> None:
    silent = []
    for i in range(DEFAULT_MAX_CONNECTIONS + 8):
        r, w = await front.peer()
        if i % 2:
            w.write(PREFACE[:8])  # a header that never completes
        silent.append((r, w))
    try:
        deadline = asyncio.get_running_loop().time() + 45
        last: Exception | None = None
        while asyncio.get_running_loop().time() < deadline:
            try:
                assert await front.health(timeout=10) == SERVING
                return
            except grpc.aio.AioRpcError as exc:
                last = exc
                await asyncio.sleep(1)
        raise AssertionError(f"no real call got through in 45 s: {last}")
    finally:
        for _r, w in silent:
            w.close()


async def test_the_listener_is_af_vsock(front: Front) -> None:
    """The listening socket really is AF_VSOCK (not a unix stand-in)."""
    _r, w = await front.peer()
    try:
        sock = w.get_extra_info("socket")
        assert sock.family == socket.AF_VSOCK
        assert w.get_extra_info("peername") == (VMADDR_CID_LOCAL, front.port)
    finally:
        w.close()
