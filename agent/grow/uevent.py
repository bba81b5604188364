"""Kernel uevents from NETLINK_KOBJECT_UEVENT: the parser (pure, hostile input) and the socket.

A kernel uevent is `ACTION@DEVPATH\\0KEY=VALUE\\0...`. The host shapes what the guest kernel
reports (device names, sizes, how many events), so every message is parsed as hostile: size
capped, keys and values checked, duplicates refused; anything not a well-formed block `change`
event is ignored (None), never an error that stops the listener. Messages udev re-broadcasts
(`libudev` magic, group 2) are not read: cva joins the kernel's group 1 only, and drops any
message whose sender is not the kernel (port id 0).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

MAX_MESSAGE = 8192  # the kernel's env buffer is 2 KiB (UEVENT_BUFFER_SIZE)
MAX_FIELDS = 64  # the kernel allows 64 env entries (UEVENT_NUM_ENVP)
KERNEL_GROUP = 1
NETLINK_KOBJECT_UEVENT = 15  # linux/netlink.h (typeshed does not name it)
_KEY_RE = re.compile(rb"[A-Z0-9_]{1,32}")
_VALUE_RE = re.compile(rb"[\x20-\x7e]{0,1024}")
_DEVNO_RE = re.compile(r"[0-9]{1,7}")


@dataclass(frozen=True)
class BlockResize:
    """A block device's capacity changed: `change` with RESIZE=1 (virtio-blk, loop -c, ...)."""

    devno: str  # "MAJ:MIN"
    devname: str  # the kernel's name, e.g. "vdb" (informational only; matching is by devno)


def parse_uevent(data: bytes) -> dict[str, str] | None:
    """The KEY=VALUE fields of one kernel uevent, or None if it is not well formed."""
    if not data or len(data) > MAX_MESSAGE or data.startswith(b"libudev\0"):
        return None
    parts = data.rstrip(b"\0").split(b"\0")
    head, fields = parts[0], parts[1:]
    if b"@" not in head or len(fields) > MAX_FIELDS or not _VALUE_RE.fullmatch(head):
        return None
    action = head.split(b"@", 1)[0]
    out: dict[str, str] = {}
    for field in fields:
        key, sep, value = field.partition(b"=")
        if not sep or not _KEY_RE.fullmatch(key) or not _VALUE_RE.fullmatch(value):
            return None
        k = key.decode("ascii")
        if k in out:
            return None
        out[k] = value.decode("ascii")
    if out.get("ACTION", "").encode("ascii") != action:
        return None
    return out


def block_resize(data: bytes) -> BlockResize | None:
    """The resize a uevent reports, or None (not a block disk/partition `change` with
    RESIZE=1, or not well formed)."""
    fields = parse_uevent(data)
    if fields is None:
        return None
    if (
        fields.get("ACTION") != "change"
        or fields.get("SUBSYSTEM") != "block"
        or fields.get("RESIZE") != "1"
    ):
        return None
    major, minor = fields.get("MAJOR", ""), fields.get("MINOR", "")
    if not _DEVNO_RE.fullmatch(major) or not _DEVNO_RE.fullmatch(minor):
        return None
    return BlockResize(f"{int(major)}:{int(minor)}", fields.get("DEVNAME", "")[:64])


def open_socket() -> socket.socket:
    """A non-blocking NETLINK_KOBJECT_UEVENT socket on the kernel's group (needs root)."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT
    )
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        sock.bind((0, KERNEL_GROUP))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def receive(sock: socket.socket) -> bytes | None:
    """One message (None: nothing to read now; b"": not from the kernel, to be ignored)."""
    try:
        data, addr = sock.recvfrom(MAX_MESSAGE + 1)
    except BlockingIOError:
        return None
    pid = addr[0] if isinstance(addr, tuple) and addr else None
    if pid != 0:  # only the kernel (port id 0) sends kernel uevents
        return b""
    return data
