"""Test-only TCP front for cva inside the VM guest: `python -m tests.tools.tcp_forward PORT TARGET`.

qemu's user-mode `hostfwd` delivers to the guest's NIC address, and this host has no
/dev/vhost-vsock, so the host cannot open a vsock to the guest. The VM suite runs this next to
cva: it listens on 0.0.0.0:PORT in the guest and copies every connection, byte for byte, to
TARGET:

- `vsock:CID:PORT` (what the E2E uses: `vsock:1:1040`): an AF_VSOCK connection over the guest's
  `vsock_loopback` transport (CID 1 = VMADDR_CID_LOCAL) to cva's real vsock listener, which
  splices it into its private gRPC socket and logs the peer CID -- the path a kata runtime's
  call takes, minus the hypervisor's virtio-vsock;
- a unix socket path: straight into that socket.

The host side then dials 127.0.0.1:HOSTPORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

CHUNK = 64 * 1024
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def parse_target(text: str) -> tuple[int, int] | Path:
    """`vsock:CID:PORT` -> (cid, port); anything else is a unix socket path."""
    if text.startswith("vsock:"):
        parts = text.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise ValueError(f"bad vsock target {text!r}: want vsock:CID:PORT")
        return int(parts[1]), int(parts[2])
    return Path(text)


async def open_vsock(cid: int, port: int) -> Streams:
    """An asyncio stream pair over a fresh AF_VSOCK connection to (cid, port)."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (cid, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


def connector(target: tuple[int, int] | Path) -> Callable[[], Awaitable[Streams]]:
    if isinstance(target, tuple):
        cid, port = target
        return lambda: open_vsock(cid, port)
    return lambda: asyncio.open_unix_connection(str(target))


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
    finally:
        if dst.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                dst.write_eof()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1)


def make_handler(
    connect: Callable[[], Awaitable[Streams]], log: Callable[[str], None] = print
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                up_r, up_w = await connect()
            except OSError as exc:
                log(f"tcp_forward: target unreachable: {exc}")
                return
            try:
                tasks = [
                    asyncio.create_task(_pump(reader, up_w)),
                    asyncio.create_task(_pump(up_r, writer)),
                ]
                _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                await _close(up_w)
        finally:
            await _close(writer)

    return handle


async def serve(port: int, target: str, host: str = "0.0.0.0") -> None:
    connect = connector(parse_target(target))
    server = await asyncio.start_server(
        make_handler(connect, log=lambda s: print(s, flush=True)),
        host,
        port,
        reuse_address=True,
        backlog=64,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"tcp_forward: {host}:{port} -> {target}", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
