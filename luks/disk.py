"""Find the contract's disk, waiting for it to be hot-plugged (DESIGN §7).

Kata attaches a volume's disk when the container is created, possibly after cva started. cva
starts a kernel uevent monitor (pyudev netlink, source "kernel": works without udevd), *then*
looks at what is already present, then sleeps in the monitor until a block device appears or
the deadline passes — no busy polling. Identification is from sysfs, not from /dev/disk/by-id
links (those need udevd, which a CoCo guest may not run):

- `serial:NAME`: `/sys/block/X/serial` (virtio-blk) or `/sys/block/X/device/serial` (NVMe);
- `pci:DDDD:BB:DD.F` (or `BB:DD.F`): the last PCI address in the disk's sysfs device path;
- `scsi:H:C:T:L` (or kata's `T:L`): the SCSI address in the disk's sysfs device path.

Partitions are never matched (only /sys/block entries, which are whole disks).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pyudev

from agent.errors import CvaError

PCI_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
SCSI_RE = re.compile(r"^\d+:\d+:\d+:\d+$")
SCSI_TL_RE = re.compile(r"^\d+:\d+$")
SERIAL_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_SERIAL_BYTES = 256


class DiskNotFound(CvaError):
    """The contract's disk did not appear before the deadline."""


class DiskRefLike(Protocol):
    """agent.contract.DiskRef: kind "serial" | "pci" | "scsi", value."""

    @property
    def kind(self) -> str: ...

    @property
    def value(self) -> str: ...


@dataclass(frozen=True)
class BlockInfo:
    """What sysfs says about one whole disk."""

    name: str  # kernel name, e.g. "vdb"
    serial: str
    devpath: str  # resolved /sys/devices/... path of the block device


def normalize_pci(value: str) -> str:
    v = value.lower()
    if re.fullmatch(r"[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", v):
        v = "0000:" + v
    if not PCI_RE.fullmatch(v):
        raise CvaError(f"disk pci address {value!r} is not DDDD:BB:DD.F; fix the contract")
    return v


def matches(kind: str, value: str, info: BlockInfo) -> bool:
    """Does the disk described by `info` satisfy the contract's disk reference? (pure)"""
    segments = info.devpath.split("/")
    if kind == "serial":
        return bool(info.serial) and info.serial == value
    if kind == "pci":
        pci = [s for s in segments if PCI_RE.fullmatch(s)]
        return bool(pci) and pci[-1] == normalize_pci(value)
    if kind == "scsi":
        if SCSI_RE.fullmatch(value):
            return value in segments
        if SCSI_TL_RE.fullmatch(value):  # kata's "target:lun" form
            return any(SCSI_RE.fullmatch(s) and s.split(":", 2)[2] == value for s in segments)
        raise CvaError(f"disk scsi address {value!r} is not H:C:T:L or T:L; fix the contract")
    raise CvaError(f"disk kind {kind!r} is not serial, pci or scsi; fix the contract")


def _read_attr(path: Path) -> str:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SERIAL_BYTES)
    except OSError:
        return ""
    return raw.decode("ascii", errors="replace").strip().strip("\0")


def scan(sysfs: Path = Path("/sys")) -> tuple[BlockInfo, ...]:
    """Every whole disk sysfs lists, with its serial and resolved device path."""
    block = sysfs / "block"
    infos = []
    try:
        entries = sorted(block.iterdir())
    except OSError:
        return ()
    for entry in entries:
        name = entry.name
        serial = _read_attr(entry / "serial") or _read_attr(entry / "device" / "serial")
        try:
            devpath = str(entry.resolve(strict=True))
        except OSError:
            continue
        infos.append(BlockInfo(name, serial, devpath))
    return tuple(infos)


def find(ref: DiskRefLike, *, sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> Path | None:
    """The /dev node of the disk `ref` names if present now; refuses ambiguous matches."""
    if ref.kind == "serial" and not SERIAL_RE.fullmatch(ref.value):
        raise CvaError(f"disk serial {ref.value!r} has characters cva does not accept")
    hits = [info for info in scan(sysfs) if matches(ref.kind, ref.value, info)]
    if len(hits) > 1:
        names = ", ".join(h.name for h in hits)
        raise CvaError(f"disk {ref.kind}:{ref.value} matches several disks ({names}); refusing")
    if not hits:
        return None
    node = dev / hits[0].name
    return node if node.exists() else None


def wait_for_disk(
    ref: DiskRefLike,
    timeout: float,
    *,
    sysfs: Path = Path("/sys"),
    dev: Path = Path("/dev"),
) -> Path:
    """Return the disk's /dev node, waiting on kernel uevents until `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
    monitor.filter_by("block")
    monitor.start()  # before the first look: nothing can slip between look and wait
    while True:
        found = find(ref, sysfs=sysfs, dev=dev)
        if found is not None:
            return found
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DiskNotFound(
                f"disk {ref.kind}:{ref.value} did not appear within {timeout:g}s; check that "
                "the runtime attached it (virtio serial / PCI / SCSI address in the contract)"
            )
        monitor.poll(timeout=remaining)
        # drain what else is queued so one burst of events costs one rescan
        while monitor.poll(timeout=0) is not None:
            pass
