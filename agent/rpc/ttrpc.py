"""A small asyncio ttRPC server: containerd's RPC protocol for Kata, unary calls only.

Why: the kata runtime talks ttRPC to kata-agent, and kata-agent talks ttRPC to the Confidential
Data Hub (CDH). Serving ttRPC lets an unmodified Kata stack use cva (issue 9); cva's gRPC API
stays as it is.

Framing (github.com/containerd/ttrpc, channel.go). Every message on the stream socket is::

    +------------------+------------------+---------+---------+------------------------+
    | length: u32 BE   | stream id: u32 BE| type: u8| flags:u8| payload (length bytes) |
    +------------------+------------------+---------+---------+------------------------+

`length` counts the payload only (not the 10-byte header); containerd allows up to 4 MiB, cva's
server reads requests only up to what its methods need (below). Type 1 is a
request (client -> server, payload = `ttrpc.Request{service, method, payload, timeout_nano,
metadata}`), type 2 a response (server -> client, payload = `ttrpc.Response{status, payload}`,
same stream id). Clients number their calls with odd stream ids; calls on one connection run
concurrently and are answered in completion order. `status` is a google.rpc.Status (gRPC codes);
absent or code 0 means success. See `protos/ttrpc/ttrpc.proto`.

What this server does with hostile input, following containerd's server (server.go):

- request size: every call has a cap on its request payload: its method's (`register(...,
  max_request_bytes=)`, or `set_method_limits` for a method served some other way, e.g. by a
  front that forwards it), else the server's `max_request_bytes`, 16 KiB like cva's gRPC (the
  real requests, VolumeAgent's and SecureMount's, are well under 4 KiB); a frame is read
  only up to the largest cap plus `REQUEST_ENVELOPE_BYTES` for the ttrpc.Request around it
  (service and method names, timeout, metadata). A frame longer than that is read and thrown
  away, and RESOURCE_EXHAUSTED is the answer on that stream id, as in containerd; a length
  beyond `max_discard_bytes` (64 MiB) gets the same answer and then the connection is closed
  (cva does not read up to 4 GiB from a hostile peer to stay in sync); a request within the
  frame limit whose payload exceeds its method's cap gets RESOURCE_EXHAUSTED before decoding;
- a truncated header or payload (EOF mid-frame, or a frame not finished within
  `frame_timeout`): the connection is closed and its calls in flight are cancelled (a clean
  EOF between frames lets the calls in flight finish and answers them first);
- no complete first header within `header_timeout` (5 s) of the accept, or a header not complete
  within `header_timeout` of its first byte: the connection is closed;
- at `max_connections`, a new connection evicts an idle one (nothing in flight, between frames):
  the oldest that never completed a header, else the longest idle if idle for at least
  `idle_evict_after` (30 s); when none is idle the new connection is refused. An idle connection
  is otherwise never closed (kata-agent keeps its one connection for the pod's life);
- a frame of another type (a response, or a stream data frame): ignored, as containerd does;
- an even stream id: INVALID_ARGUMENT on that stream id (client streams must be odd);
- a stream id that is already in flight: the connection is closed (two answers on one stream
  id would corrupt the client's view);
- a request that does not decode: INVALID_ARGUMENT;
- an unknown service or method: UNIMPLEMENTED, "service X" / "method Y" as containerd says;
- `timeout_nano`: the call's deadline (capped at the server's `max_timeout`; 0 = the cap;
  negative = already expired); on expiry the handler is cancelled and the answer is
  DEADLINE_EXCEEDED;
- calls in flight: at most `max_inflight` (16) per connection, `max_server_inflight` (64) over
  all the server's connections, and a method's own `max_inflight` when it has one (`register`
  or `set_method_limits`); a call beyond any of them gets RESOURCE_EXHAUSTED at once (its
  request is dropped, so what the server holds is bounded by max_server_inflight x the frame
  limit); these bounds and caps apply to every call, registered or not;
- a handler's `RpcError` becomes its status; a `CvaError` its one-line message (INVALID_ARGUMENT
  for `InputError`, or the exception's `rpc_code`, else UNKNOWN); anything else INTERNAL with a
  fixed message (logged, never sent).

Pointing kata-agent at cva. kata-agent dials CDH at `unix:///run/confidential-containers/cdh.sock`
(a constant in kata-agent, `CDH_SOCKET_URI`) and calls `api.SecureMountService/SecureMount` for
encrypted emptyDir / block volumes. At startup it first launches the guest components named by its
`guest_components_procs` setting (kernel parameter `agent.guest_components_procs=...`) -- and when
that includes the CDH it deletes whatever is at the socket path and starts the real CDH there --
then, if a socket exists at that path, it connects its CDH client to it (once, at startup). So:

1. boot the guest with `agent.guest_components_procs=none` (or `attestation-agent`), so
   kata-agent does not start (and does not replace) a CDH;
2. have cva listen on `/run/confidential-containers/cdh.sock` (config `[listen] ttrpc =
   "unix:///run/confidential-containers/cdh.sock"`; `agent.rpc.ttrpc_service` builds the
   server, the directory is created, the socket is mode 0600) with `agent.securemount`'s service
   registered, *before* kata-agent starts (systemd: cva.service `Before=kata-agent.service`,
   ready only once the socket listens).

Every other CDH call on that socket (image pull, sealed secrets, resources, the ocicrypt key
provider, SecureMount of other volume types) goes to the real CDH on another socket: the CDH
front (`agent.cdh`) is this server's relay (`set_relay`) and forwards those calls unchanged to
`[cdh] upstream`; without one they answer UNIMPLEMENTED naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from agent._proto.ttrpc import ttrpc_pb2
from agent.errors import INPUT_REFUSALS, REFUSALS, CvaError, InputError

log = logging.getLogger("cva.ttrpc")

HEADER_LENGTH = 10
MESSAGE_LENGTH_MAX = 4 << 20  # containerd's messageLengthMax
_HEADER = struct.Struct(">IIBB")

DEFAULT_MAX_TIMEOUT = 300.0  # seconds; the cap on any call, whatever timeout_nano says
DEFAULT_FRAME_TIMEOUT = 30.0  # a started frame must be complete within this
DEFAULT_MAX_INFLIGHT = 16  # calls in flight per connection
DEFAULT_MAX_SERVER_INFLIGHT = 64  # calls in flight over all of a server's connections
DEFAULT_MAX_CONNECTIONS = 64
# A method's request payload cap unless it was registered with its own (issue 21 #5): 16 KiB,
# cva's gRPC cap; VolumeAgent's and SecureMount's requests are well under 4 KiB. A front that
# forwards other CDH methods registers them with the cap they need.
DEFAULT_MAX_REQUEST_BYTES = 16 << 10
# What a ttrpc.Request adds around the payload: service and method names, timeout_nano and the
# metadata pairs (kata-agent sends none or a few short ones).
REQUEST_ENVELOPE_BYTES = 4 << 10
DEFAULT_MAX_DISCARD = 64 << 20  # an oversized frame up to this is skipped, larger ones end the link
# A new connection must deliver its first complete frame header within HEADER_TIMEOUT of being
# accepted, and every frame's header must be complete within HEADER_TIMEOUT of its first byte:
# silent peers, slowloris headers and half-open peers that never spoke are closed quickly.
HEADER_TIMEOUT = 5.0
# Between frames a connection may stay open and idle (kata-agent dials the CDH socket once and
# keeps that connection for the pod's life), but at the connection limit a new connection evicts
# one that has nothing in flight: first the oldest that never completed a header, else the one
# idle longest, if idle for at least IDLE_EVICT_AFTER seconds. Idle peers cannot lock others out.
IDLE_EVICT_AFTER = 30.0


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3  # ttrpc >= 1.2 streaming; not served


class Code(enum.IntEnum):
    """gRPC status codes (google.rpc.Code), as ttRPC carries them."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(CvaError):
    """Raised by a handler to answer with this status code and one-line message."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.rpc_code = code


class FrameError(InputError):
    """A frame header that cannot be used (raised by `parse_header`)."""


@dataclass(frozen=True)
class FrameHeader:
    length: int
    stream_id: int
    type: int
    flags: int


def parse_header(data: bytes) -> FrameHeader:
    """Decode a 10-byte ttRPC frame header."""
    if len(data) != HEADER_LENGTH:
        raise FrameError(f"ttrpc frame header is {len(data)} bytes, expected {HEADER_LENGTH}")
    length, stream_id, mtype, flags = _HEADER.unpack(data)
    return FrameHeader(length=length, stream_id=stream_id, type=mtype, flags=flags)


def encode_frame(stream_id: int, mtype: int, payload: bytes, flags: int = 0) -> bytes:
    """One ttRPC frame: header + payload."""
    if len(payload) > 0xFFFFFFFF:
        raise FrameError("ttrpc payload does not fit a u32 length")
    return _HEADER.pack(len(payload), stream_id, mtype, flags) + payload


def encode_response(stream_id: int, code: Code, message: str = "", payload: bytes = b"") -> bytes:
    """A response frame carrying `payload` (on success) or a status."""
    resp = ttrpc_pb2.Response(payload=payload)
    if code != Code.OK:
        resp.status.code = int(code)
        resp.status.message = message
    return encode_frame(stream_id, MessageType.RESPONSE, resp.SerializeToString())


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class CallContext:
    """What a handler learns about its call besides the payload."""

    service: str
    method: str
    stream_id: int
    metadata: tuple[tuple[str, str], ...]
    timeout: float  # seconds the call may take (after the server's cap)
    peer: PeerCredentials | None = None


RawHandler = Callable[[bytes, CallContext], Awaitable[bytes | Message]]
# Sees a decoded request (with its frame payload, byte for byte) before dispatch: returns a
# serialized ttrpc.Response to send as it is, or None to dispatch the call here (see set_relay).
Relay = Callable[[bytes, ttrpc_pb2.Request, CallContext], Awaitable[bytes | None]]
M = TypeVar("M", bound=Message)


def status_for(exc: BaseException) -> tuple[Code, str]:
    """The default mapping of a handler's exception onto a ttRPC status."""
    code = getattr(exc, "rpc_code", None)
    if isinstance(exc, REFUSALS):
        if isinstance(code, int) and 0 < code <= 16:
            return Code(code), exc.message
        if isinstance(exc, INPUT_REFUSALS):
            return Code.INVALID_ARGUMENT, exc.message
        return Code.UNKNOWN, exc.message
    if isinstance(exc, TimeoutError):
        return Code.DEADLINE_EXCEEDED, "deadline exceeded"
    return Code.INTERNAL, "internal error"


@dataclass
class _Limits:
    """One method's caps (`set_method_limits`) and its calls in flight now."""

    max_request_bytes: int
    max_inflight: int | None  # None: only the connection's and the server's bounds
    inflight: int = 0


@dataclass(eq=False)  # identity-hashed: kept in a set
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: PeerCredentials | None
    inflight: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reader_task: asyncio.Task[None] | None = None
    clean_eof: bool = False  # the peer closed between frames (not a protocol violation)
    accepted_at: float = 0.0  # event loop time of the accept
    proven: bool = False  # a complete frame header arrived
    in_frame: bool = False  # between a frame's first byte and its last
    last_active: float = field(default_factory=time.monotonic)  # accept or last complete frame

    def idle(self) -> bool:
        return not self.in_frame and not self.inflight


class TtrpcServer:
    """Unary ttRPC over unix (or any already-bound stream) sockets."""

    def __init__(
        self,
        *,
        max_timeout: float = DEFAULT_MAX_TIMEOUT,
        max_message_bytes: int = MESSAGE_LENGTH_MAX,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_server_inflight: int = DEFAULT_MAX_SERVER_INFLIGHT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_discard_bytes: int = DEFAULT_MAX_DISCARD,
        header_timeout: float | None = None,
        idle_evict_after: float | None = None,
        error_status: Callable[[BaseException], tuple[Code, str]] = status_for,
    ) -> None:
        self.header_timeout = HEADER_TIMEOUT if header_timeout is None else header_timeout
        self.idle_evict_after = IDLE_EVICT_AFTER if idle_evict_after is None else idle_evict_after
        if (
            min(max_timeout, frame_timeout, self.header_timeout) <= 0
            or self.idle_evict_after < 0
            or max_inflight < 1
            or max_server_inflight < 1
            or max_connections < 1
            or max_request_bytes < 1
        ):
            raise ValueError("ttrpc server limits must be positive")
        self.max_timeout = max_timeout
        self.max_message_bytes = min(max_message_bytes, MESSAGE_LENGTH_MAX)  # responses, and
        # the ceiling of any request frame
        self.max_request_bytes = max_request_bytes
        self.frame_timeout = frame_timeout
        self.max_inflight = max_inflight
        self.max_server_inflight = max_server_inflight
        self._server_inflight = 0
        self.max_connections = max_connections
        self.max_discard_bytes = max_discard_bytes
        self._error_status = error_status
        self._handlers: dict[tuple[str, str], RawHandler] = {}
        self._limits: dict[tuple[str, str], _Limits] = {}
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[Path] = []
        self._connections: set[_Connection] = set()
        self._closing = False
        self._relay: Relay | None = None
        self._relay_max_request_bytes: int | None = None

    # -- registry ---------------------------------------------------------------------------

    def register(
        self,
        full_method: str,
        handler: RawHandler,
        *,
        max_request_bytes: int | None = None,
        max_inflight: int | None = None,
    ) -> None:
        """Serve `handler` for "package.Service/Method"; it gets the request payload bytes and
        returns the response message (or its bytes). `max_request_bytes`: this method's cap on
        its request payload (default: the server's); `max_inflight`: at most this many of its
        calls at once (default: only the connection's and the server's bounds)."""
        key = _method_key(full_method)
        if key in self._handlers:
            raise ValueError(f"ttrpc method {full_method!r} is already registered")
        if max_request_bytes is not None or max_inflight is not None:
            self.set_method_limits(
                full_method, max_request_bytes=max_request_bytes, max_inflight=max_inflight
            )
        self._handlers[key] = handler

    def set_method_limits(
        self,
        full_method: str,
        *,
        max_request_bytes: int | None = None,
        max_inflight: int | None = None,
    ) -> None:
        """Caps for one method, whoever serves it (a registered handler, or a front that
        forwards it): its request payload cap (default: the server's `max_request_bytes`) and
        its calls in flight (default: only the connection's and the server's bounds)."""
        key = _method_key(full_method)
        cap = self.max_request_bytes if max_request_bytes is None else max_request_bytes
        if not 0 < cap <= self.max_message_bytes - REQUEST_ENVELOPE_BYTES:
            raise ValueError(f"ttrpc method {full_method!r}: max_request_bytes out of range")
        if max_inflight is not None and max_inflight < 1:
            raise ValueError(f"ttrpc method {full_method!r}: max_inflight must be positive")
        if key in self._limits and self._limits[key].inflight:
            raise ValueError(f"ttrpc method {full_method!r}: limits changed with calls in flight")
        self._limits[key] = _Limits(cap, max_inflight)

    @property
    def request_frame_limit(self) -> int:
        """The longest request frame read: the largest method cap plus the envelope."""
        caps = [m.max_request_bytes for m in self._limits.values()]
        if self._relay_max_request_bytes is not None:
            caps.append(self._relay_max_request_bytes)
        largest = max([self.max_request_bytes, *caps])
        return min(self.max_message_bytes, largest + REQUEST_ENVELOPE_BYTES)

    def request_limit(self, full_method: str) -> int:
        """The request payload cap of calls to `full_method`."""
        return self._request_cap(*_method_key(full_method))

    def _request_cap(self, service: str, method: str) -> int:
        """A method's own cap; else, for a method no handler serves while a relay is set, the
        relay's cap (`set_relay`); else the server's."""
        limits = self._limits.get((service, method))
        if limits is not None:
            return limits.max_request_bytes
        relayed = self._relay_max_request_bytes
        if relayed is not None and (service, method) not in self._handlers:
            return relayed
        return self.max_request_bytes

    def register_unary(
        self,
        full_method: str,
        request_type: type[M],
        handler: Callable[[M, CallContext], Awaitable[Message]],
        *,
        max_request_bytes: int | None = None,
        max_inflight: int | None = None,
    ) -> None:
        """Like `register`, decoding the payload into `request_type` first (INVALID_ARGUMENT
        when it does not decode)."""

        async def decode_and_call(payload: bytes, ctx: CallContext) -> Message:
            request = request_type()
            try:
                request.ParseFromString(payload)
            except (DecodeError, ValueError, RecursionError) as exc:
                raise RpcError(
                    Code.INVALID_ARGUMENT,
                    f"ttrpc: {ctx.service}/{ctx.method} request payload does not decode",
                ) from exc
            return await handler(request, ctx)

        self.register(
            full_method,
            decode_and_call,
            max_request_bytes=max_request_bytes,
            max_inflight=max_inflight,
        )

    @property
    def methods(self) -> frozenset[str]:
        return frozenset(f"{s}/{m}" for s, m in self._handlers)

    def set_relay(self, relay: Relay | None, *, max_request_bytes: int | None = None) -> None:
        """Hand every decoded request (its frame payload as received, the decoded Request and
        its context) to `relay` first; an answer other than None is sent as the response
        payload unchanged (a serialized ttrpc.Response, at most MESSAGE_LENGTH_MAX bytes), None
        dispatches the call to the registered handlers as usual. A relay's exception becomes a
        status like a handler's. Every other limit of the server applies to relayed calls too
        (frame size, calls in flight, connections); the relay keeps its own deadline.
        `max_request_bytes`: the request cap of calls to methods no handler serves (those a
        relay forwards), default the server's; a method's own limits still win."""
        if max_request_bytes is not None and not (
            0 < max_request_bytes <= self.max_message_bytes - REQUEST_ENVELOPE_BYTES
        ):
            raise ValueError("ttrpc relay: max_request_bytes out of range")
        self._relay = relay
        self._relay_max_request_bytes = None if relay is None else max_request_bytes

    # -- listeners --------------------------------------------------------------------------

    async def listen_unix(self, path: str | Path, *, mode: int = 0o600) -> None:
        """Listen on a unix socket at `path` (its directory is created 0755 if missing; a stale
        socket file is replaced, anything else at `path` is refused)."""
        sock_path = Path(path)
        sock_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            st = sock_path.lstat()
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise CvaError(f"ttrpc: {sock_path} exists and is not a socket; remove it")
            sock_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Linux creates the socket file with the socket inode's mode (minus the umask):
            # set it before bind so there is no window with wider permissions. No process-wide
            # umask change: other threads may be creating files.
            os.fchmod(sock.fileno(), mode)
            sock.bind(str(sock_path))
            sock_path.chmod(mode)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise CvaError(f"ttrpc: cannot listen on {sock_path}: {exc.strerror}") from exc
        await self.listen_socket(sock)
        self._unix_paths.append(sock_path)

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve on an already bound and listening stream socket (unix or AF_VSOCK)."""
        sock.setblocking(False)
        server = await asyncio.start_server(self._accept, sock=sock, limit=2**16)
        self._servers.append(server)

    # -- connections ------------------------------------------------------------------------

    def _evict_one(self) -> bool:
        """At the connection limit: close one idle connection to make room (see the module
        docstring); False when every connection is busy."""
        now = time.monotonic()
        idle = [c for c in self._connections if c.idle()]
        silent = [c for c in idle if not c.proven]
        if silent:
            victim = min(silent, key=lambda c: c.last_active)
        else:
            stale = [c for c in idle if now - c.last_active >= self.idle_evict_after]
            if not stale:
                return False
            victim = min(stale, key=lambda c: c.last_active)
        log.warning(
            "ttrpc: at the connection limit; evicting a connection idle for %.1fs%s",
            now - victim.last_active,
            "" if victim.proven else " that never sent a frame header",
        )
        self._connections.discard(victim)
        if victim.reader_task is not None:
            victim.reader_task.cancel()
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or (
            len(self._connections) >= self.max_connections and not self._evict_one()
        ):
            log.warning("ttrpc: connection refused (closing or at the connection limit)")
            writer.close()
            return
        conn = _Connection(
            reader=reader,
            writer=writer,
            peer=_peer_credentials(writer),
            accepted_at=asyncio.get_running_loop().time(),
        )
        self._connections.add(conn)
        conn.reader_task = asyncio.current_task()
        try:
            await self._serve_connection(conn)
            if conn.clean_eof and conn.inflight:
                # a peer that half-closed after its requests still gets the answers
                await asyncio.wait(list(conn.inflight.values()))
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(conn)
            for task in list(conn.inflight.values()):
                task.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_frame(self, conn: _Connection) -> tuple[FrameHeader, bytes | None] | None:
        """The next frame; its payload is None when it was oversized and skipped. None when the
        connection must end (EOF, truncation, stall, a length too large to skip)."""
        conn.in_frame = False
        conn.last_active = time.monotonic()
        loop = asyncio.get_running_loop()
        first_header_due = None if conn.proven else conn.accepted_at + self.header_timeout
        try:
            # between frames a proven connection may idle as long as it likes (see _evict_one)
            async with asyncio.timeout_at(first_header_due):
                first = await conn.reader.readexactly(1)
        except (asyncio.IncompleteReadError, ConnectionError):
            conn.clean_eof = True  # EOF between frames
            return None
        except TimeoutError:
            log.warning("ttrpc: no frame within %.1fs of connecting; closing", self.header_timeout)
            return None
        conn.in_frame = True
        header_due = loop.time() + self.header_timeout
        if first_header_due is not None:
            header_due = min(header_due, first_header_due)
        try:
            async with asyncio.timeout(self.frame_timeout):
                async with asyncio.timeout_at(header_due):
                    rest = await conn.reader.readexactly(HEADER_LENGTH - 1)
                header = parse_header(first + rest)
                conn.proven = True
                if header.length <= self.request_frame_limit:
                    return header, await conn.reader.readexactly(header.length)
                if header.length > self.max_discard_bytes:
                    log.warning(
                        "ttrpc: frame of %d bytes is too large to skip; closing", header.length
                    )
                    await self._send(conn, self._oversized(header))
                    return None
                await _discard(conn.reader, header.length)  # as containerd: skip, answer, go on
                log.warning("ttrpc: skipped an oversized frame of %d bytes", header.length)
                return header, None
        except (asyncio.IncompleteReadError, ConnectionError):
            log.warning("ttrpc: truncated frame; closing the connection")
            return None
        except TimeoutError:
            log.warning(
                "ttrpc: frame not completed in time (header %.1fs, frame %.1fs); closing",
                self.header_timeout,
                self.frame_timeout,
            )
            return None

    def _oversized(self, header: FrameHeader) -> bytes:
        return encode_response(
            header.stream_id,
            Code.RESOURCE_EXHAUSTED,
            f"message length {header.length} exceed maximum message size of "
            f"{self.request_frame_limit}",
        )

    async def _serve_connection(self, conn: _Connection) -> None:
        while not self._closing:
            frame = await self._read_frame(conn)
            if frame is None:
                return
            header, payload = frame
            if payload is None:
                await self._send(conn, self._oversized(header))
                continue
            if header.type != MessageType.REQUEST:
                log.debug("ttrpc: ignoring a frame of type %d", header.type)
                continue
            try:
                request = ttrpc_pb2.Request()
                request.ParseFromString(payload)
            except (DecodeError, ValueError, RecursionError):
                await self._send(
                    conn,
                    encode_response(
                        header.stream_id, Code.INVALID_ARGUMENT, "unmarshal request error"
                    ),
                )
                continue
            if header.stream_id % 2 != 1:
                await self._send(
                    conn,
                    encode_response(
                        header.stream_id,
                        Code.INVALID_ARGUMENT,
                        "StreamID must be odd for client initiated streams",
                    ),
                )
                continue
            if header.stream_id in conn.inflight:
                log.warning("ttrpc: stream id %d reused while in flight; closing", header.stream_id)
                return
            if self._closing:
                await self._send(
                    conn,
                    encode_response(header.stream_id, Code.UNAVAILABLE, "server is shutting down"),
                )
                continue
            refusal = self._admit(conn, request)
            if refusal is not None:
                await self._send(
                    conn, encode_response(header.stream_id, Code.RESOURCE_EXHAUSTED, refusal)
                )
                continue
            entry = self._limits.get((request.service, request.method))
            self._server_inflight += 1
            if entry is not None:
                entry.inflight += 1
            task = asyncio.create_task(self._call(conn, header.stream_id, request, payload))
            conn.inflight[header.stream_id] = task
            task.add_done_callback(_forget(conn.inflight, header.stream_id))
            task.add_done_callback(self._release(entry))

    def _admit(self, conn: _Connection, request: ttrpc_pb2.Request) -> str | None:
        """Why this call is refused (RESOURCE_EXHAUSTED) before it starts, or None."""
        if len(conn.inflight) >= self.max_inflight:
            return f"more than {self.max_inflight} calls in flight on this connection"
        if self._server_inflight >= self.max_server_inflight:
            return f"more than {self.max_server_inflight} calls in flight on this server"
        entry = self._limits.get((request.service, request.method))
        cap = self._request_cap(request.service, request.method)
        name = f"{_clip(request.service)}/{_clip(request.method)}"
        if len(request.payload) > cap:
            return f"request of {len(request.payload)} bytes exceeds the {cap} bytes {name} accepts"
        bound = None if entry is None else entry.max_inflight
        if entry is not None and bound is not None and entry.inflight >= bound:
            return f"more than {bound} {name} calls in flight"
        return None

    def _release(self, entry: _Limits | None) -> Callable[[object], None]:
        def done(_task: object) -> None:
            self._server_inflight -= 1
            if entry is not None:
                entry.inflight -= 1

        return done

    async def _call(
        self, conn: _Connection, stream_id: int, request: ttrpc_pb2.Request, raw: bytes = b""
    ) -> None:
        if self._relay is not None:
            answer = await self._relayed(self._relay, conn, stream_id, request, raw)
            if answer is not None:
                await self._send(conn, answer)
                return
        code, message, payload = await self._dispatch(conn, stream_id, request)
        if len(payload) > self.max_message_bytes:
            code, message, payload = Code.INTERNAL, "response exceeds the message size limit", b""
        frame = encode_response(stream_id, code, message, payload)
        await self._send(conn, frame)

    async def _relayed(
        self,
        relay: Relay,
        conn: _Connection,
        stream_id: int,
        request: ttrpc_pb2.Request,
        raw: bytes,
    ) -> bytes | None:
        """The relay's answer as a whole response frame, or None (dispatch here)."""
        ctx = self._call_context(conn, stream_id, request)
        try:
            answer = await relay(raw, request, ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a relay failure becomes a status, as a handler's
            code, message = self._error_status(exc)
            return encode_response(stream_id, code, message)
        if answer is None:
            return None
        if len(answer) > MESSAGE_LENGTH_MAX:
            return encode_response(
                stream_id, Code.INTERNAL, "response exceeds the message size limit"
            )
        return encode_frame(stream_id, MessageType.RESPONSE, answer)

    def _call_context(
        self, conn: _Connection, stream_id: int, request: ttrpc_pb2.Request
    ) -> CallContext:
        """The call's context; its timeout is the server's cap, lowered by a positive
        timeout_nano (a negative one is the caller's to judge)."""
        timeout = self.max_timeout
        if request.timeout_nano > 0:
            timeout = min(timeout, request.timeout_nano / 1e9)
        return CallContext(
            service=request.service,
            method=request.method,
            stream_id=stream_id,
            metadata=tuple((kv.key, kv.value) for kv in request.metadata),
            timeout=timeout,
            peer=conn.peer,
        )

    async def _dispatch(
        self, conn: _Connection, stream_id: int, request: ttrpc_pb2.Request
    ) -> tuple[Code, str, bytes]:
        handler = self._handlers.get((request.service, request.method))
        if handler is None:
            if not any(s == request.service for s, _ in self._handlers):
                return Code.UNIMPLEMENTED, f"service {_clip(request.service)}", b""
            return Code.UNIMPLEMENTED, f"method {_clip(request.method)}", b""
        if request.timeout_nano < 0:
            return Code.DEADLINE_EXCEEDED, "deadline exceeded", b""
        ctx = self._call_context(conn, stream_id, request)
        try:
            async with asyncio.timeout(ctx.timeout):
                result = await handler(bytes(request.payload), ctx)
            data = result if isinstance(result, bytes) else result.SerializeToString()
        except TimeoutError:
            log.warning("ttrpc: %s/%s exceeded its deadline", request.service, request.method)
            return Code.DEADLINE_EXCEEDED, "deadline exceeded", b""
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every handler failure becomes a status
            code, message = self._error_status(exc)
            if code == Code.INTERNAL:
                log.error(  # noqa: TRY400 - no traceback: exception text may hold request data
                    "ttrpc: %s/%s failed: %s",
                    request.service,
                    request.method,
                    type(exc).__name__,
                )
            return code, message, b""
        return Code.OK, "", data

    async def _send(self, conn: _Connection, frame: bytes) -> None:
        async with conn.write_lock:
            if conn.writer.is_closing():
                return
            conn.writer.write(frame)
            conn.last_active = time.monotonic()
            try:
                await conn.writer.drain()
            except ConnectionError:
                log.info("ttrpc: peer went away before its answer was sent")

    # -- shutdown ---------------------------------------------------------------------------

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, stop reading new calls, let calls in flight finish for up to `grace`
        seconds (then cancel them), close every connection and remove the unix socket files."""
        self._closing = True
        for server in self._servers:
            server.close()
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        conns = list(self._connections)
        inflight = [t for c in conns for t in c.inflight.values()]
        if inflight:
            _done, pending = await asyncio.wait(inflight, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for conn in conns:
            if conn.reader_task is not None:
                conn.reader_task.cancel()
        readers = [c.reader_task for c in conns if c.reader_task is not None]
        if readers:
            await asyncio.wait(readers, timeout=1.0)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
        self._servers.clear()
        self._unix_paths.clear()


async def _discard(reader: asyncio.StreamReader, length: int) -> None:
    remaining = length
    while remaining:
        chunk = await reader.read(min(remaining, 1 << 16))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", remaining)
        remaining -= len(chunk)


def _method_key(full_method: str) -> tuple[str, str]:
    service, sep, method = full_method.lstrip("/").rpartition("/")
    if not sep or not service or not method:
        raise ValueError(f"ttrpc method name {full_method!r} is not 'package.Service/Method'")
    return service, method


def _clip(name: str, limit: int = 200) -> str:
    """A peer-chosen name, shortened for a status line."""
    return name if len(name) <= limit else name[:limit] + "..."


def _forget(inflight: dict[int, asyncio.Task[None]], stream_id: int) -> Callable[[object], None]:
    def done(_task: object) -> None:
        inflight.pop(stream_id, None)

    return done


def _peer_credentials(writer: asyncio.StreamWriter) -> PeerCredentials | None:
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def metadata_dict(ctx: CallContext) -> Mapping[str, tuple[str, ...]]:
    """The call's metadata grouped by key (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for key, value in ctx.metadata:
        out.setdefault(key, []).append(value)
    return {k: tuple(v) for k, v in out.items()}
