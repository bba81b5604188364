"""The AF_VSOCK front door: accept the host's connections and splice each one to grpc.aio.

PyPI's grpcio is built without vsock, so gRPC listens on a private unix socket (0600, in the
state dir) and this listener copies bytes both ways between each accepted vsock connection and a
fresh connection to that socket. The peer CID of every connection is logged. The splice is
transparent to HTTP/2, so the gRPC server's limits, deadlines and policy apply unchanged.

`SpliceListener` works on any listening stream socket; `vsock_listen_socket` makes the AF_VSOCK
one (tests bind it for real, and exercise accept/splice with a unix listener: there is no vsock
loopback here, and CIDs 1 and 2 are never dialled).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path

CHUNK = 64 * 1024
DEFAULT_MAX_CONNECTIONS = 64


def vsock_listen_socket(
    port: int, *, cid: int = socket.VMADDR_CID_ANY, backlog: int = 16
) -> socket.socket:
    """A non-blocking AF_VSOCK stream socket listening on (cid, port)."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((cid, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def describe_peer(peer: object) -> dict[str, object]:
    """Loggable fields for a peer address (vsock (cid, port) tuples name the CID)."""
    if isinstance(peer, tuple) and len(peer) == 2 and all(isinstance(x, int) for x in peer):
        return {"peer_cid": peer[0], "peer_port": peer[1]}
    return {"peer": str(peer)[:100]}


class SpliceListener:
    """Accept on `listen_sock` and splice every connection to the unix socket `target`."""

    def __init__(
        self,
        listen_sock: socket.socket,
        target: Path,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        log: Callable[..., None] | None = None,
    ) -> None:
        self._listen_sock = listen_sock
        self._target = target
        self._slots = asyncio.Semaphore(max_connections)
        self._log = log or (lambda _event, **_kw: None)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._listen_sock)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        peer = describe_peer(writer.get_extra_info("peername"))
        try:
            if self._slots.locked():
                self._log("vsock_connection_refused", reason="too many connections", **peer)
                return
            async with self._slots:
                self._log("vsock_connection", **peer)
                try:
                    up_r, up_w = await asyncio.open_unix_connection(str(self._target))
                except OSError as exc:
                    self._log("vsock_backend_unreachable", error=exc.strerror, **peer)
                    return
                try:
                    await _pump_both(reader, writer, up_r, up_w)
                except asyncio.CancelledError:
                    # close() cut this connection: end the handler normally (asyncio's stream
                    # callback would otherwise report the cancellation as an error)
                    pass
                finally:
                    await _close(up_w)
        finally:
            await _close(writer)
            if task is not None:
                self._conns.discard(task)

    async def stop_accepting(self) -> None:
        """Close the listening socket; connections already spliced keep running."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 0.1)

    async def close(self) -> None:
        """Stop accepting and cut every spliced connection."""
        await self.stop_accepting()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=5)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
    finally:
        if dst.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                dst.write_eof()


async def _pump_both(
    a_r: asyncio.StreamReader,
    a_w: asyncio.StreamWriter,
    b_r: asyncio.StreamReader,
    b_w: asyncio.StreamWriter,
) -> None:
    tasks = [asyncio.create_task(_pump(a_r, b_w)), asyncio.create_task(_pump(b_r, a_w))]
    try:
        # HTTP/2 never half-closes meaningfully: one side ending ends the connection
        _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1)
