"""systemd's notify protocol, by hand: READY=1, STATUS=..., STOPPING=1.

`$NOTIFY_SOCKET` is a filesystem path or, starting with '@', an abstract socket name. Without it
(not under systemd) every call is a no-op. A send that fails is reported (logged by the caller),
never swallowed silently: under Type=notify a lost READY=1 means systemd kills the service.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

MAX_STATUS = 400


class Notifier:
    def __init__(self, address: str | None) -> None:
        self._address = _sockaddr(address) if address else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        return cls((os.environ if env is None else env).get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram; True when sent, False when not under systemd.

        Raises OSError when the socket is configured but the send fails.
        """
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode("utf-8", errors="replace")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, self._address)
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *((_status(status),) if status else ()))

    def status(self, text: str) -> bool:
        return self.send(_status(text))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *((_status(status),) if status else ()))


def _status(text: str) -> str:
    one_line = " ".join(text.split())[:MAX_STATUS]
    return f"STATUS={one_line}"


def _sockaddr(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    if not address.startswith("/"):
        raise ValueError("NOTIFY_SOCKET must be an absolute path or start with '@'")
    return address
