"""The QGS (Quote Generation Service) wire protocol, pure (SPEC §d.4), plus a vsock transport.

Messages are little-endian: header `major u16 = 1, minor u16 = 1, type u32, size u32 (whole
message), error_code u32`; GET_QUOTE_REQ adds `report_size u32, id_list_size u32, TDREPORT`;
GET_QUOTE_RESP adds `selected_id_size u32, quote_size u32, selected id, quote`. On the socket
every message is prefixed with a 4-byte big-endian length.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path

from evidence.errors import AttesterUnavailable, EvidenceError
from evidence.reader import Reader

GET_QUOTE_REQ = 0
GET_QUOTE_RESP = 1
HEADER = struct.Struct("<HHIII")
MAX_MESSAGE = 1024 * 1024
VMADDR_CID_HOST = 2
CONFIG = Path("etc/tdx-attest.conf")


def encode_get_quote(tdreport: bytes) -> bytes:
    if len(tdreport) != 1024:
        raise EvidenceError(f"QGS request needs a 1024-byte TDREPORT, got {len(tdreport)}")
    body = struct.pack("<II", 1024, 0) + tdreport
    msg = HEADER.pack(1, 1, GET_QUOTE_REQ, HEADER.size + len(body), 0) + body
    return struct.pack(">I", len(msg)) + msg


def decode_get_quote_response(msg: bytes) -> bytes:
    """The quote from a GET_QUOTE_RESP message (without the 4-byte frame length)."""
    if len(msg) > MAX_MESSAGE:
        raise EvidenceError(f"QGS response is {len(msg)} bytes; the limit is {MAX_MESSAGE}")
    r = Reader(bytes(msg), "QGS response")
    major, _minor = r.u16le("major"), r.u16le("minor")
    mtype, size, error = r.u32le("type"), r.u32le("size"), r.u32le("error_code")
    if major != 1:
        raise EvidenceError(f"QGS response major version {major} is not 1")
    if mtype != GET_QUOTE_RESP:
        raise EvidenceError(f"QGS response type {mtype} is not GET_QUOTE_RESP (1)")
    if size != len(msg):
        raise EvidenceError(f"QGS response size field {size} != message length {len(msg)}")
    if error != 0:
        raise AttesterUnavailable(f"QGS refused the quote request (error {error:#x})")
    id_size = r.u32le("selected_id_size")
    quote_size = r.u32le("quote_size")
    r.take(id_size, "selected id")
    quote = r.take(quote_size, "quote")
    if r.remaining:
        raise EvidenceError(f"QGS response has {r.remaining} trailing bytes")
    return quote


def qgs_port(root: Path) -> int | None:
    """`port = N` from /etc/tdx-attest.conf (Intel's config), or None."""
    try:
        text = (root / CONFIG).read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "port" and value.strip().isdigit():
            port = int(value.strip())
            return port if 0 < port < (1 << 32) else None
    return None


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = sock.recv(min(65536, size - len(out)))
        if not chunk:
            raise AttesterUnavailable("QGS closed the connection mid-message")
        out += chunk
    return bytes(out)


def vsock_connect(port: int, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect((VMADDR_CID_HOST, port))
    return sock


def get_quote(
    tdreport: bytes,
    port: int,
    *,
    timeout: float = 30.0,
    connect: Callable[[int, float], socket.socket] = vsock_connect,
) -> bytes:
    """One GET_QUOTE round trip to the host's QGS."""
    request = encode_get_quote(tdreport)
    try:
        with connect(port, timeout) as sock:
            sock.sendall(request)
            (length,) = struct.unpack(">I", _recv_exact(sock, 4))
            if length > MAX_MESSAGE:
                raise EvidenceError(f"QGS announced a {length}-byte message (limit {MAX_MESSAGE})")
            return decode_get_quote_response(_recv_exact(sock, length))
    except OSError as exc:
        raise AttesterUnavailable(f"QGS on vsock port {port}: {exc}") from None
