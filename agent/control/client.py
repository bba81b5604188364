"""The CLI side of the control socket (agent.control.server): one request, one JSON answer."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from agent.control.server import WIRE_VERSION

MAX_ANSWER = 4 * 1024 * 1024


class ControlError(Exception):
    """The daemon could not be asked, or refused; the message says which and what to do."""


def request(path: Path, name: str, timeout: float = 30.0) -> dict[str, object]:
    """Send request `name` and return the daemon's answer object (`status` for status)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}; is cva serve running?") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied; run as root") from None
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror}") from None
        try:
            sock.sendall(json.dumps({"v": WIRE_VERSION, "request": name}).encode() + b"\n")
            data = b""
            while len(data) <= MAX_ANSWER:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise ControlError(f"no answer from {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise ControlError(f"the answer from {path} is not JSON") from None
    if not isinstance(doc, dict):
        raise ControlError(f"the answer from {path} is not a JSON object")
    if doc.get("ok") is not True:
        raise ControlError(f"cva refused: {doc.get('error', 'no reason given')}")
    answer = doc.get(name)
    if not isinstance(answer, dict):
        raise ControlError(f"the answer from {path} has no {name!r} object")
    return answer
