"""One forwarded ttRPC call to the real CDH: the client's request bytes out, CDH's response
bytes back, neither decoded nor re-encoded (kata's copy of the CDH proto differs from CDH's own,
e.g. an empty `ImagePullResponse`, so re-encoding could drop fields).

Each call gets its own connection (stream id 1): a slow or stuck call cannot hold up another,
nothing is shared between callers, and a CDH restart costs nothing but the calls in flight. The
caller's deadline bounds the whole exchange (connect, write, the answer); the answer frame may
be at most `MESSAGE_LENGTH_MAX` (4 MiB, containerd's limit, which kata-agent's client enforces
too). Frames of other types or stream ids are skipped, as containerd's client does.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from google.protobuf.message import DecodeError

from agent._proto.ttrpc import ttrpc_pb2
from agent.rpc.ttrpc import (
    HEADER_LENGTH,
    MESSAGE_LENGTH_MAX,
    Code,
    MessageType,
    RpcError,
    encode_frame,
    parse_header,
)

STREAM_ID = 1
MAX_SKIPPED_FRAMES = 16  # frames that are not our answer before the upstream is given up


def _unavailable(address: str, what: str) -> RpcError:
    return RpcError(
        Code.UNAVAILABLE,
        f"cva: the CDH upstream unix://{address} ([cdh] upstream in the image config) {what}",
    )


async def forward(socket_path: Path, request: bytes, *, timeout: float) -> bytes:
    """Send `request` (a serialized ttrpc.Request, as received) to the ttRPC server at
    `socket_path` and return its serialized ttrpc.Response as received. Raises RpcError:
    UNAVAILABLE (cannot connect, connection lost), DEADLINE_EXCEEDED (`timeout` passed),
    RESOURCE_EXHAUSTED (an answer above 4 MiB), INTERNAL (an answer that is not a Response)."""
    address = str(socket_path)
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(address, request)
    except TimeoutError:
        raise RpcError(
            Code.DEADLINE_EXCEEDED,
            f"cva: the CDH upstream unix://{address} did not answer within {timeout:g}s",
        ) from None


async def _exchange(address: str, request: bytes) -> bytes:
    try:
        reader, writer = await asyncio.open_unix_connection(address, limit=1 << 16)
    except OSError as exc:
        raise _unavailable(address, f"cannot be reached ({exc.strerror or exc})") from None
    try:
        writer.write(encode_frame(STREAM_ID, MessageType.REQUEST, request))
        await writer.drain()
        for _ in range(MAX_SKIPPED_FRAMES):
            header = parse_header(await reader.readexactly(HEADER_LENGTH))
            if header.length > MESSAGE_LENGTH_MAX:
                raise RpcError(
                    Code.RESOURCE_EXHAUSTED,
                    f"cva: the CDH upstream answered with {header.length} bytes, above the"
                    f" ttRPC limit of {MESSAGE_LENGTH_MAX}",
                )
            payload = await reader.readexactly(header.length)
            if header.type == MessageType.RESPONSE and header.stream_id == STREAM_ID:
                _check_response(payload)
                return payload
        raise RpcError(Code.INTERNAL, "cva: the CDH upstream sent frames but no answer")
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise _unavailable(address, f"closed the connection before answering ({exc})") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _check_response(payload: bytes) -> None:
    try:
        ttrpc_pb2.Response.FromString(payload)
    except (DecodeError, ValueError, RecursionError):
        raise RpcError(
            Code.INTERNAL, "cva: the CDH upstream answered with a response that does not decode"
        ) from None
