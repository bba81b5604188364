"""The AF_VSOCK front door: accept the host's connections and splice each one to grpc.aio.

PyPI's grpcio is built without vsock, so gRPC listens on a private unix socket (0600, in the
state dir) and this listener copies bytes both ways between each accepted vsock connection and a
fresh connection to that socket. The peer CID of every connection is logged. The splice is
transparent to HTTP/2, so the gRPC server's limits, deadlines and policy apply unchanged.
Before splicing, a connection must send the HTTP/2 client preface within PREFACE_TIMEOUT (5 s);
at the connection limit an idle connection is evicted for a new one (see `SpliceListener`).

`SpliceListener` works on any listening stream socket; `vsock_listen_socket` makes the AF_VSOCK
one (tests bind it for real, and exercise accept/splice with a unix listener: there is no vsock
loopback here, and CIDs 1 and 2 are never dialled).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHUNK = 64 * 1024
DEFAULT_MAX_CONNECTIONS = 64
# Every gRPC (HTTP/2 prior-knowledge) client opens with this preface (RFC 9113 §3.4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# A connection that has not sent the whole preface this long after its accept is closed.
PREFACE_TIMEOUT = 5.0
# At the connection limit, a spliced connection silent (no byte either way) this long makes room.
IDLE_EVICT_AFTER = 60.0


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


@dataclass(eq=False)  # identity-hashed
class _Splice:
    """One accepted connection: whether it sent the HTTP/2 preface, and when it last moved."""

    task: asyncio.Task[None] | None
    accepted_at: float  # time.monotonic()
    last_active: float
    spliced: bool = False

    def touch(self) -> None:
        self.last_active = time.monotonic()


class SpliceListener:
    """Accept on `listen_sock` and splice every connection to the unix socket `target`.

    A connection must send the 24-byte HTTP/2 client preface (every gRPC client opens with it)
    within `preface_timeout` of its accept, else it is closed before the gRPC server sees it;
    anything else than the preface is closed too. At `max_connections`, a new connection evicts
    one that has not sent its preface yet (the oldest), else the one with no byte in either
    direction for the longest time if that is at least `idle_evict_after`; otherwise it is
    refused. Idle spliced connections are otherwise kept (a client may hold one open)."""

    def __init__(
        self,
        listen_sock: socket.socket,
        target: Path,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        preface_timeout: float | None = None,
        idle_evict_after: float | None = None,
        log: Callable[..., None] | None = None,
    ) -> None:
        self._listen_sock = listen_sock
        self._target = target
        self._max_connections = max_connections
        self._preface_timeout = PREFACE_TIMEOUT if preface_timeout is None else preface_timeout
        self._idle_evict_after = IDLE_EVICT_AFTER if idle_evict_after is None else idle_evict_after
        self._log = log or (lambda _event, **_kw: None)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._live: set[_Splice] = set()  # what counts against max_connections

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._listen_sock)

    def _evict_one(self) -> dict[str, object] | None:
        """Make room by closing one idle connection; what it was (for the log), or None."""
        now = time.monotonic()
        waiting = [c for c in self._live if not c.spliced]
        if waiting:
            victim = min(waiting, key=lambda c: c.accepted_at)
        else:
            stale = [c for c in self._live if now - c.last_active >= self._idle_evict_after]
            if not stale:
                return None
            victim = min(stale, key=lambda c: c.last_active)
        self._live.discard(victim)
        if victim.task is not None:
            victim.task.cancel()
        return {"idle_s": round(now - victim.last_active, 1), "spliced": victim.spliced}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        peer = describe_peer(writer.get_extra_info("peername"))
        now = time.monotonic()
        me = _Splice(task, now, now)
        try:
            if len(self._live) >= self._max_connections:
                evicted = self._evict_one()
                if evicted is None:
                    self._log("vsock_connection_refused", reason="too many connections", **peer)
                    return
                self._log("vsock_connection_evicted", **evicted)
            self._live.add(me)
            self._log("vsock_connection", **peer)
            try:
                async with asyncio.timeout(self._preface_timeout):
                    preface = await reader.readexactly(len(HTTP2_PREFACE))
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                self._log(
                    "vsock_connection_closed",
                    reason=f"no HTTP/2 preface within {self._preface_timeout:g}s",
                    **peer,
                )
                return
            if preface != HTTP2_PREFACE:
                self._log("vsock_connection_closed", reason="not an HTTP/2 (gRPC) client", **peer)
                return
            me.spliced = True
            me.touch()
            try:
                up_r, up_w = await asyncio.open_unix_connection(str(self._target))
            except OSError as exc:
                self._log("vsock_backend_unreachable", error=exc.strerror, **peer)
                return
            try:
                up_w.write(preface)
                await _pump_both(reader, writer, up_r, up_w, me.touch)
            finally:
                await _close(up_w)
        except asyncio.CancelledError:
            # close() or an eviction cut this connection: end the handler normally (asyncio's
            # stream callback would otherwise report the cancellation as an error)
            pass
        finally:
            self._live.discard(me)
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


async def _pump(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, on_data: Callable[[], None]
) -> None:
    try:
        while data := await src.read(CHUNK):
            on_data()
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
    on_data: Callable[[], None],
) -> None:
    tasks = [
        asyncio.create_task(_pump(a_r, b_w, on_data)),
        asyncio.create_task(_pump(b_r, a_w, on_data)),
    ]
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
