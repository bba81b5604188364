"""A minimal ttRPC client for the Attestation Agent: one unary call per connection, blocking,
with a connect timeout and a whole-call deadline (run it in a worker thread).

Framing is containerd's (agent/rpc/ttrpc.py has the server side): a 10-byte header
`u32 BE length | u32 BE stream id | u8 type | u8 flags`, then `ttrpc.Request` (type 1) /
`ttrpc.Response` (type 2). This client sends one request on stream 1 and reads frames until the
response on stream 1 arrives; other frame types are ignored (as containerd's client does), a
response on another stream, a frame over the 4 MiB limit, EOF or the deadline end the call.

`extend_runtime_measurement` is the AA's `ExtendRuntimeMeasurement` (SPEC.md §e.6, the message
bytes from `evidence.aa_wire`): only `Result = OK` counts as measured; NOT_SUPPORTED,
NOT_ENABLED (the AA's `[eventlog_config] enable_eventlog = false`), unknown results, a ttRPC
error status, a malformed answer and every socket error are `AaUnavailable` (one line, no
payload bytes in it).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from google.protobuf.message import DecodeError

from agent._proto.ttrpc import ttrpc_pb2
from agent.errors import CvaError
from agent.rpc.ttrpc import (
    HEADER_LENGTH,
    MESSAGE_LENGTH_MAX,
    MessageType,
    encode_frame,
    parse_header,
)
from evidence import aa_wire

CONNECT_TIMEOUT = 2.0
CALL_TIMEOUT = 10.0
STREAM_ID = 1
MAX_SKIPPED_FRAMES = 16


class AaUnavailable(CvaError):
    """The Attestation Agent could not be reached or did not measure the event."""


def _recv_exact(sock: socket.socket, size: int, deadline: float, what: str) -> bytes:
    out = bytearray()
    while len(out) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AaUnavailable(f"attestation agent: no complete {what} before the deadline")
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(size - len(out), 1 << 16))
        except TimeoutError:
            raise AaUnavailable(
                f"attestation agent: no complete {what} before the deadline"
            ) from None
        if not chunk:
            raise AaUnavailable(f"attestation agent closed the connection mid-{what}")
        out += chunk
    return bytes(out)


def call_unary(
    path: Path,
    service: str,
    method: str,
    payload: bytes,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    timeout: float = CALL_TIMEOUT,
) -> bytes:
    """One ttRPC unary call on a unix socket; the response payload, or AaUnavailable."""
    request = ttrpc_pb2.Request(
        service=service, method=method, payload=payload, timeout_nano=int(timeout * 1e9)
    )
    frame = encode_frame(STREAM_ID, MessageType.REQUEST, request.SerializeToString())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(connect_timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise AaUnavailable(
                f"attestation agent at {path}: cannot connect ({exc.strerror or 'timed out'})"
            ) from None
        deadline = time.monotonic() + timeout
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(frame)
            for _ in range(MAX_SKIPPED_FRAMES):
                header = parse_header(_recv_exact(sock, HEADER_LENGTH, deadline, "frame header"))
                if header.length > MESSAGE_LENGTH_MAX:
                    raise AaUnavailable(
                        f"attestation agent sent a {header.length}-byte frame (limit"
                        f" {MESSAGE_LENGTH_MAX})"
                    )
                body = _recv_exact(sock, header.length, deadline, "frame")
                if header.type != MessageType.RESPONSE:
                    continue
                if header.stream_id != STREAM_ID:
                    raise AaUnavailable(
                        f"attestation agent answered on stream {header.stream_id}, not {STREAM_ID}"
                    )
                return _response_payload(body, f"{service}/{method}")
            raise AaUnavailable(f"attestation agent sent {MAX_SKIPPED_FRAMES} non-response frames")
        except TimeoutError:
            raise AaUnavailable("attestation agent: no answer before the deadline") from None
        except OSError as exc:
            raise AaUnavailable(f"attestation agent: {exc.strerror or 'socket error'}") from None
    finally:
        sock.close()


def _response_payload(body: bytes, what: str) -> bytes:
    try:
        response = ttrpc_pb2.Response.FromString(body)
    except DecodeError:
        raise AaUnavailable(
            "attestation agent sent a ttRPC response that does not decode"
        ) from None
    if response.HasField("status") and response.status.code != 0:
        text = " ".join(response.status.message.split())[:200]
        raise AaUnavailable(
            f"attestation agent refused {what}: status {response.status.code} {text!r}"
        )
    return bytes(response.payload)


def extend_runtime_measurement(
    path: Path,
    domain: str,
    operation: str,
    content: str,
    register_index: int | None,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    timeout: float = CALL_TIMEOUT,
) -> None:
    """ExtendRuntimeMeasurement; returns only when the AA answered OK."""
    payload = aa_wire.encode_request(
        aa_wire.ExtendRuntimeMeasurementRequest(domain, operation, content, register_index)
    )
    answer = call_unary(
        path,
        aa_wire.SERVICE,
        aa_wire.METHOD,
        payload,
        connect_timeout=connect_timeout,
        timeout=timeout,
    )
    try:
        result = aa_wire.decode_response(answer)
    except aa_wire.AaWireError as exc:
        raise AaUnavailable(f"attestation agent: {exc.message}") from None
    if result != aa_wire.RuntimeMeasurementResult.OK:
        try:
            name = aa_wire.RuntimeMeasurementResult(result).name
        except ValueError:
            name = f"unknown result {result}"
        hint = (
            " (set [eventlog_config] enable_eventlog = true in the AA's config)"
            if result == aa_wire.RuntimeMeasurementResult.NOT_ENABLED
            else ""
        )
        raise AaUnavailable(f"attestation agent did not measure the event: {name}{hint}")
