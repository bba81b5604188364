"""cva's ttRPC server driven by containerd's own Go ttrpc client over a unix socket."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent._proto.cdh import api_pb2
from agent.errors import CvaError, InputError
from agent.rpc.ttrpc import (
    MESSAGE_LENGTH_MAX,
    REQUEST_ENVELOPE_BYTES,
    CallContext,
    Code,
    RpcError,
    TtrpcServer,
)
from tests.ttrpc_peer import GoCall, go_calls


@pytest.fixture
def go_binary(go_ttrpc_client: Path) -> Path:
    return go_ttrpc_client


class Handlers:
    """Test services: echo, errors, a barrier for concurrency, a call that never ends."""

    def __init__(self, barrier_parties: int = 0) -> None:
        self.cancelled = asyncio.Event()
        self.barrier = asyncio.Barrier(barrier_parties) if barrier_parties else None
        self.seen_metadata: list[tuple[tuple[str, str], ...]] = []
        self.peer_uids: list[int] = []
        self.timeouts: list[float] = []

    async def echo(self, payload: bytes, ctx: CallContext) -> bytes:
        self.seen_metadata.append(ctx.metadata)
        self.timeouts.append(ctx.timeout)
        if ctx.peer is not None:
            self.peer_uids.append(ctx.peer.uid)
        return payload[::-1]

    async def denied(self, payload: bytes, ctx: CallContext) -> bytes:
        raise RpcError(Code.PERMISSION_DENIED, "the contract does not allow Denied")

    async def input_error(self, payload: bytes, ctx: CallContext) -> bytes:
        raise InputError("field x: must be short")

    async def cva_error(self, payload: bytes, ctx: CallContext) -> bytes:
        raise CvaError("disk pgdisk did not appear; attach it")

    async def crash(self, payload: bytes, ctx: CallContext) -> bytes:
        raise RuntimeError("secret-looking detail 0xdeadbeef")

    async def forever(self, payload: bytes, ctx: CallContext) -> bytes:
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()
        return b""

    async def together(self, payload: bytes, ctx: CallContext) -> bytes:
        assert self.barrier is not None
        await self.barrier.wait()  # returns only once every call is in flight at the same time
        return payload

    async def secure_mount(
        self, req: api_pb2.SecureMountRequest, ctx: CallContext
    ) -> api_pb2.SecureMountResponse:
        if req.volume_type != "block-device":
            raise RpcError(Code.INVALID_ARGUMENT, f"volume_type {req.volume_type!r} not served")
        return api_pb2.SecureMountResponse(mount_path=req.mount_point)


async def start(tmp_path: Path, handlers: Handlers, **limits: float) -> TtrpcServer:
    server = TtrpcServer(**limits)  # type: ignore[arg-type]
    server.register("test.Echo/Echo", handlers.echo)
    big = MESSAGE_LENGTH_MAX - REQUEST_ENVELOPE_BYTES  # a method that needs large requests
    server.register("test.Echo/Big", handlers.echo, max_request_bytes=big)
    server.register("test.Echo/Denied", handlers.denied)
    server.register("test.Echo/InputError", handlers.input_error)
    server.register("test.Echo/CvaError", handlers.cva_error)
    server.register("test.Echo/Crash", handlers.crash)
    server.register("test.Echo/Forever", handlers.forever)
    server.register("test.Echo/Together", handlers.together)
    server.register_unary(
        "api.SecureMountService/SecureMount", api_pb2.SecureMountRequest, handlers.secure_mount
    )
    await server.listen_unix(tmp_path / "cdh.sock")
    return server


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[TtrpcServer, Handlers, Path]]:
    handlers = Handlers(barrier_parties=16)
    server = await start(tmp_path, handlers)
    yield server, handlers, tmp_path / "cdh.sock"
    await server.close()


async def test_round_trip_with_metadata(
    served: tuple[TtrpcServer, Handlers, Path], go_binary: Path
):
    _server, handlers, sock = served
    [res] = await go_calls(
        go_binary, sock, [GoCall("test.Echo", "Echo", b"hello ttrpc", metadata={"who": "go"})]
    )
    assert (res.code, res.transport_error, res.payload) == (0, "", b"cprtt olleh")
    assert ("who", "go") in handlers.seen_metadata[0]
    assert handlers.peer_uids == [os.getuid()]


async def test_secure_mount_shaped_call(
    served: tuple[TtrpcServer, Handlers, Path], go_binary: Path
):
    _server, _handlers, sock = served
    req = api_pb2.SecureMountRequest(
        volume_type="block-device",
        options={"deviceId": "252:16", "sourceType": "empty", "encryptionType": "luks2"},
        mount_point="/run/kata-containers/sandbox/storage/x",
    )
    [res] = await go_calls(
        go_binary, sock, [GoCall("api.SecureMountService", "SecureMount", req.SerializeToString())]
    )
    assert res.code == 0
    assert api_pb2.SecureMountResponse.FromString(res.payload).mount_path == req.mount_point


async def test_unknown_service_and_method(
    served: tuple[TtrpcServer, Handlers, Path], go_binary: Path
):
    _server, _handlers, sock = served
    results = await go_calls(
        go_binary,
        sock,
        [
            GoCall("api.GetResourceService", "GetResource"),
            GoCall("api.SecureMountService", "Unmount"),
            GoCall("test.Echo", "Echo", b"still fine"),
        ],
    )
    assert [(r.code, r.message) for r in results[:2]] == [
        (Code.UNIMPLEMENTED, "service api.GetResourceService"),
        (Code.UNIMPLEMENTED, "method Unmount"),
    ]
    assert (results[2].code, results[2].payload) == (0, b"enif llits")


async def test_handler_errors_become_statuses(
    served: tuple[TtrpcServer, Handlers, Path], go_binary: Path
):
    _server, _handlers, sock = served
    results = await go_calls(
        go_binary,
        sock,
        [
            GoCall("test.Echo", "Denied"),
            GoCall("test.Echo", "InputError"),
            GoCall("test.Echo", "CvaError"),
            GoCall("test.Echo", "Crash"),
            GoCall("api.SecureMountService", "SecureMount", b"\xff\xff\xff"),
            GoCall(
                "api.SecureMountService",
                "SecureMount",
                api_pb2.SecureMountRequest(volume_type="zfs").SerializeToString(),
            ),
        ],
    )
    assert [(r.code, r.message) for r in results] == [
        (Code.PERMISSION_DENIED, "the contract does not allow Denied"),
        (Code.INVALID_ARGUMENT, "field x: must be short"),
        (Code.UNKNOWN, "disk pgdisk did not appear; attach it"),
        (Code.INTERNAL, "internal error"),  # the exception text is not sent
        (
            Code.INVALID_ARGUMENT,
            "ttrpc: api.SecureMountService/SecureMount request payload does not decode",
        ),
        (Code.INVALID_ARGUMENT, "volume_type 'zfs' not served"),
    ]


async def test_concurrent_calls_on_one_connection(
    served: tuple[TtrpcServer, Handlers, Path], go_binary: Path
):
    _server, _handlers, sock = served
    calls = [GoCall("test.Echo", "Together", f"call {i}".encode()) for i in range(16)]
    results = await go_calls(go_binary, sock, calls)
    # The barrier only opens when all 16 calls are in the server at once.
    assert [(r.code, r.payload) for r in results] == [(0, c.payload) for c in calls]


async def test_timeout_nano_cancels_the_handler(
    served: tuple[TtrpcServer, Handlers, Path], go_binary: Path
):
    _server, handlers, sock = served
    [res] = await go_calls(
        go_binary, sock, [GoCall("test.Echo", "Forever", timeout_nano=200_000_000)]
    )
    assert (res.code, res.message) == (Code.DEADLINE_EXCEEDED, "deadline exceeded")
    assert handlers.cancelled.is_set()


async def test_server_cap_bounds_a_call_without_deadline(tmp_path: Path, go_binary: Path):
    handlers = Handlers()
    server = await start(tmp_path, handlers, max_timeout=0.2)
    try:
        results = await go_calls(
            go_binary,
            tmp_path / "cdh.sock",
            [
                GoCall("test.Echo", "Forever"),  # no timeout_nano: the cap applies
                GoCall("test.Echo", "Forever", timeout_nano=3600 * 10**9),  # capped too
                GoCall("test.Echo", "Echo", b"ok"),
            ],
        )
    finally:
        await server.close()
    assert [r.code for r in results] == [Code.DEADLINE_EXCEEDED, Code.DEADLINE_EXCEEDED, 0]


async def test_large_payload_round_trip(
    served: tuple[TtrpcServer, Handlers, Path], go_binary: Path
):
    _server, _handlers, sock = served
    payload = os.urandom(3 << 20)
    [res] = await go_calls(go_binary, sock, [GoCall("test.Echo", "Big", payload)])
    assert res.code == 0
    assert res.payload == payload[::-1]


async def test_requests_over_a_methods_cap_are_refused(
    served: tuple[TtrpcServer, Handlers, Path], go_binary: Path
):
    """Issue 21 #5: 16 KiB by default, what a method registers otherwise (containerd's client)."""
    _server, _handlers, sock = served
    calls = [
        GoCall("test.Echo", "Echo", b"x" * (16 << 10)),  # exactly the default cap
        GoCall("test.Echo", "Echo", b"x" * ((16 << 10) + 1)),  # one byte over: in the frame
        GoCall("test.Echo", "Echo", os.urandom(3 << 20)),  # over the frame limit: skipped
    ]
    results = await go_calls(go_binary, sock, calls)
    assert [r.code for r in results] == [0, Code.RESOURCE_EXHAUSTED, Code.RESOURCE_EXHAUSTED]


async def test_graceful_close_answers_calls_in_flight(tmp_path: Path, go_binary: Path):
    handlers = Handlers(barrier_parties=2)
    server = await start(tmp_path, handlers)
    client = asyncio.create_task(
        go_calls(go_binary, tmp_path / "cdh.sock", [GoCall("test.Echo", "Together", b"late")])
    )
    while handlers.barrier is not None and handlers.barrier.n_waiting == 0:
        await asyncio.sleep(0.01)  # the call is now in flight
    closing = asyncio.create_task(server.close(grace=10))
    await asyncio.sleep(0)
    assert handlers.barrier is not None
    await handlers.barrier.wait()  # let the in-flight call finish during the grace period
    await closing
    [res] = await client
    assert (res.code, res.payload) == (0, b"late")
    assert not (tmp_path / "cdh.sock").exists()


async def test_client_deadline_arrives_as_timeout_nano(
    served: tuple[TtrpcServer, Handlers, Path], go_binary: Path
):
    _server, handlers, sock = served
    # no explicit timeout_nano: the Go client derives it from its context deadline (5 s)
    [res] = await go_calls(go_binary, sock, [GoCall("test.Echo", "Echo", b"x")], deadline_ms=5000)
    assert res.code == 0
    [timeout] = handlers.timeouts
    assert 0 < timeout <= 5.0


async def test_oversized_call_from_the_go_client(
    served: tuple[TtrpcServer, Handlers, Path], go_binary: Path
):
    _server, _handlers, sock = served
    [res] = await go_calls(go_binary, sock, [GoCall("test.Echo", "Echo", b"x" * (5 << 20))])
    assert res.code == Code.RESOURCE_EXHAUSTED
    assert "exceed maximum message size" in res.message
    [ok] = await go_calls(go_binary, sock, [GoCall("test.Echo", "Echo", b"after")])
    assert (ok.code, ok.payload) == (0, b"retfa")
