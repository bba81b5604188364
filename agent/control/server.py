"""The control socket: `<state_dir>/control.sock`, a unix stream socket, 0600, in cva's 0700
state directory; the kernel's peer credentials must say root (or the daemon's own user).

Wire: the client sends one JSON line (at most 4 KiB) `{"v": 1, "request": "status"}` within
5 s of connecting; the daemon answers one JSON line `{"ok": true, "status": {...}}`
(agent.control.report) or `{"ok": false, "error": "<one line>"}` and closes. This socket is
not reachable from the host (no vsock splice in front of it) and is not subject to the
contract's `[api] allow` (that list governs the host-facing API).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.log import get_logger

log = get_logger("cva.control")

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0
WIRE_VERSION = 1
_UCRED = struct.Struct("3i")  # pid, uid, gid

StatusHandler = Callable[[], Awaitable[dict[str, object]]]


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return int(uid)


def parse_request(line: bytes) -> str:
    """The request name of one request line; ValueError naming what is wrong."""
    if len(line) > MAX_REQUEST:
        raise ValueError(f"request longer than {MAX_REQUEST} bytes")
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        raise ValueError("request is not one JSON object") from None
    if not isinstance(doc, dict) or set(doc) != {"v", "request"}:
        raise ValueError('request must be {"v": 1, "request": NAME}')
    if doc["v"] != WIRE_VERSION or isinstance(doc["v"], bool):
        raise ValueError(f"request version must be {WIRE_VERSION}")
    if doc["request"] != "status":
        raise ValueError('unknown request (known: "status")')
    return "status"


class ControlServer:
    def __init__(self, path: Path, status: StatusHandler) -> None:
        self._path = path
        self._status = status
        self._server: asyncio.AbstractServer | None = None
        self._allowed_uids = frozenset({0, os.geteuid()})

    @property
    def path(self) -> Path:
        return self._path

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(self._path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        self._path.chmod(0o600)
        sock.listen(16)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(OSError):
            self._path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await self._answer(reader, writer)
            writer.write(json.dumps(answer, sort_keys=True).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), REQUEST_TIMEOUT)

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, object]:
        sock = writer.get_extra_info("socket")
        uid = peer_uid(sock) if sock is not None else -1
        if uid not in self._allowed_uids:
            log.warning("control_refused", uid=uid)
            return {"ok": False, "error": "cva's control socket is for root only"}
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
        except ValueError:  # over the stream limit
            return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
        try:
            parse_request(line.strip())
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        try:
            return {"ok": True, "status": await self._status()}
        except Exception as exc:  # noqa: BLE001 - a status failure must not end the daemon
            log.warning("control_status_failed", error=str(exc))
            return {"ok": False, "error": f"status failed: {type(exc).__name__}"}
