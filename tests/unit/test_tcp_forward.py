"""tests.tools.tcp_forward: the E2E's host->guest front (target parsing, byte-exact forwarding).

The vsock target needs the guest's vsock_loopback (the E2E and tests/guest use it); here the
forwarding core runs against a unix target, which shares every line but the connect.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from tests.tools.tcp_forward import make_handler, parse_target


def test_parse_target() -> None:
    assert parse_target("vsock:1:1040") == (1, 1040)
    assert parse_target("/run/cva/grpc.sock") == Path("/run/cva/grpc.sock")
    for bad in ("vsock:1", "vsock:x:1040", "vsock:1:1040:9", "vsock::1040"):
        with pytest.raises(ValueError, match="vsock:CID:PORT"):
            parse_target(bad)


async def test_forwards_both_ways_and_closes_when_one_side_ends(tmp_path: Path) -> None:
    target = tmp_path / "t.sock"

    async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    backend = await asyncio.start_unix_server(upper, str(target))
    front = await asyncio.start_server(
        make_handler(lambda: asyncio.open_unix_connection(str(target))), "127.0.0.1", 0
    )
    port = front.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = b"grpc-frame" * 20000  # > one 64 KiB chunk
        writer.write(payload)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
        assert got == payload.upper()
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    finally:
        front.close()
        backend.close()


async def test_unreachable_target_closes_the_client(tmp_path: Path) -> None:
    said: list[str] = []
    front = await asyncio.start_server(
        make_handler(lambda: asyncio.open_unix_connection(str(tmp_path / "none")), said.append),
        "127.0.0.1",
        0,
    )
    port = front.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        assert said and "unreachable" in said[0]
    finally:
        front.close()
