"""A small QMP client (stdlib only): send commands to a running qemu, wait for its events."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QmpError(RuntimeError):
    """qemu answered a QMP command with an error, or the socket failed."""


class Qmp:
    def __init__(self, socket_path: Path, *, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.connect(str(socket_path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP socket at {socket_path}") from exc
                time.sleep(0.1)
        self._reader = self._sock.makefile("r", encoding="utf-8")
        self._pending: list[dict[str, Any]] = []
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._reader.readline()
        if not line:
            raise QmpError("qemu closed the QMP socket")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read()
            if "event" in message:
                self._pending.append(message)
                continue
            if "error" in message:
                raise QmpError(f"{command}: {message['error'].get('desc', message['error'])}")
            return message.get("return")

    def wait_event(self, name: str, *, timeout: float = 60.0) -> dict[str, Any]:
        for i, event in enumerate(self._pending):
            if event.get("event") == name:
                return self._pending.pop(i)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                message = self._read()
            except TimeoutError:
                break
            if message.get("event") == name:
                return message
            self._pending.append(message)
        raise QmpError(f"no {name} event from qemu within {timeout:.0f} s")

    def add_disk(self, node: str, image: Path, serial: str) -> None:
        """Hot-plug a raw image as a virtio disk: /dev/disk/by-id/virtio-SERIAL in the guest."""
        self.execute(
            "blockdev-add",
            **{
                "driver": "raw",
                "node-name": node,
                "file": {"driver": "file", "filename": str(image)},
            },
        )
        self.execute("device_add", driver="virtio-blk-pci", id=node, drive=node, serial=serial)

    def block_resize(self, device: str, size_bytes: int) -> None:
        """The host grows (or shrinks) a disk under the running guest: qemu resizes the image
        and virtio-blk tells the guest (a block `change` uevent with RESIZE=1)."""
        self.execute("block_resize", device=device, size=size_bytes)

    def remove_disk(self, node: str, *, timeout: float = 60.0) -> None:
        self.execute("device_del", id=node)
        self.wait_event("DEVICE_DELETED", timeout=timeout)
        self.execute("blockdev-del", **{"node-name": node})

    def close(self) -> None:
        self._reader.close()
        self._sock.close()
