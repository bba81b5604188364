"""Find the contract's disk, waiting for it to be hot-plugged (DESIGN §7).

Kata attaches a volume's disk when the container is created, possibly after cva started. cva
starts a kernel uevent monitor (pyudev netlink, source "kernel": works without udevd), *then*
looks at what is already present, then sleeps in the monitor until a block device appears or
the deadline passes — no busy polling. Identification is from sysfs, not from /dev/disk/by-id
links (those need udevd, which a CoCo guest may not run):

- `serial:NAME`: `/sys/block/X/serial` (virtio-blk) or `/sys/block/X/device/serial` (NVMe);
- `pci:DDDD:BB:DD.F`: the last PCI address in the disk's sysfs device path;
- `scsi:H:C:T:L` (or kata's `T:L`): the SCSI address in the disk's sysfs device path.

Partitions are never matched (only /sys/block entries, which are whole disks).
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from luks.errors import StorageError

# The one canonical form of each contract disk reference (agent.contract parses with these same
# patterns). The matcher refuses anything else instead of answering "no match": a reference that
# can never match would make the SecureMount "never a contract disk" guard pass silently.
_DEC = r"(?:0|[1-9][0-9]{0,4})"  # decimal as the kernel prints it: no sign, no leading zero
SERIAL_REF_RE = re.compile(r"[A-Za-z0-9_.-]{1,20}")  # virtio-blk / NVMe serials are <= 20 bytes
PCI_REF_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]")
SCSI_REF_RE = re.compile(rf"{_DEC}:{_DEC}(?::{_DEC}:{_DEC})?")  # H:C:T:L or kata's T:L
PCI_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")  # a sysfs path component
SCSI_RE = re.compile(r"[0-9]+:[0-9]+:[0-9]+:[0-9]+")  # a sysfs H:C:T:L path component
SYSFS_SERIAL_RE = re.compile(r"[\x21-\x7e]{1,64}")  # printable ASCII, no spaces
MAX_SERIAL_BYTES = 256
_REF_PATTERNS = {"serial": SERIAL_REF_RE, "pci": PCI_REF_RE, "scsi": SCSI_REF_RE}
_REF_RULES = {
    "serial": "[A-Za-z0-9_.-]{1,20} (virtio serial)",
    "pci": "DDDD:BB:SS.F in lower-case hex",
    "scsi": "H:C:T:L or T:L in decimal",
}


# `container:<devicePath>` (agent.hook.devices) and what it resolves to, `devno:MAJ:MIN`
RESOLVED_PER_CONTAINER = ("container", "devno")
DEVNO_RE = re.compile(r"(0|[1-9][0-9]{0,9}):(0|[1-9][0-9]{0,9})")


class DiskNotFound(StorageError):
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
    serial: str  # "" when absent or unusable (see serial_from_sysfs)
    devpath: str  # resolved /sys/devices/... path of the block device


def ref_rule(kind: str, value: str) -> str | None:
    """Why `kind:value` is not a canonical disk reference, or None when it is (pure)."""
    pattern = _REF_PATTERNS.get(kind)
    if pattern is None:
        return f"disk kind {kind!r} is not serial, pci or scsi"
    if not pattern.fullmatch(value):
        return f"{kind} id must be {_REF_RULES[kind]}"
    return None


def serial_from_sysfs(text: str | None) -> str:
    """The serial a disk's sysfs `serial` attribute names, "" when absent or unusable. The same
    cleaning for every path that identifies disks (luks.disk.scan, agent.securemount.blockdev)."""
    if text is None:
        return ""
    serial = text.strip().strip("\0")
    return serial if SYSFS_SERIAL_RE.fullmatch(serial) else ""


def matches(kind: str, value: str, info: BlockInfo) -> bool:
    """Is the disk `info` the contract's disk reference `kind:value`? (pure)

    The one matcher: `find` (opening a contract volume) and SecureMount's "never a contract
    disk" guard both use it, so the guard refuses exactly the disks `find` would open.
    - serial: the disk's non-empty serial equals `value`;
    - pci: the last PCI address on the disk's sysfs path (the disk's own function, or its SCSI
      controller) equals `value`;
    - scsi: an H:C:T:L component of the sysfs path equals `value`, or for kata's T:L its last
      two fields do.
    A reference not in its canonical form raises StorageError (never a silent "no match")."""
    if kind in RESOLVED_PER_CONTAINER:
        raise StorageError(
            f"disk {kind}:{value[:80]!r} is resolved per container by cva's prestart hook; whether"
            " this device is it cannot be told here, so it is refused"
        )
    rule = ref_rule(kind, value)
    if rule is not None:
        raise StorageError(f"disk {kind}:{value!r}: {rule}; fix the contract")
    segments = info.devpath.split("/")
    if kind == "serial":
        return bool(info.serial) and info.serial == value
    if kind == "pci":
        pci = [s for s in segments if PCI_RE.fullmatch(s)]
        return bool(pci) and pci[-1] == value
    hctl = [s for s in segments if SCSI_RE.fullmatch(s)]
    if value.count(":") == 3:
        return value in hctl
    return any(s.split(":", 2)[2] == value for s in hctl)  # kata's "target:lun" form


def _read_attr(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SERIAL_BYTES)
    except OSError:
        return None
    return raw.decode("ascii", errors="replace")


def disk_serial(sysdir: Path) -> str:
    """A whole disk's serial from its sysfs directory (`/sys/block/X` or `/sys/dev/block/M:m`):
    `serial` (virtio-blk), else `device/serial` (NVMe: the namespace's `device` is its
    controller, whose serial every namespace of it shares). "" when neither is usable."""
    return serial_from_sysfs(_read_attr(sysdir / "serial")) or serial_from_sysfs(
        _read_attr(sysdir / "device" / "serial")
    )


def block_info(sysdir: Path, name: str) -> BlockInfo | None:
    """The one builder of a disk's identity, used by `scan` (opening a contract volume) and by
    SecureMount's device lookup (agent.securemount.blockdev), so both see the same serial and
    device path. None when the sysfs entry vanished."""
    try:
        devpath = str(sysdir.resolve(strict=True))
    except OSError:
        return None
    return BlockInfo(name, disk_serial(sysdir), devpath)


def scan(sysfs: Path = Path("/sys")) -> tuple[BlockInfo, ...]:
    """Every whole disk sysfs lists, with its serial and resolved device path."""
    block = sysfs / "block"
    try:
        entries = sorted(block.iterdir())
    except OSError:
        return ()
    infos = (block_info(entry, entry.name) for entry in entries)
    return tuple(info for info in infos if info is not None)


def find(ref: DiskRefLike, *, sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> Path | None:
    """The /dev node of the disk `ref` names if present now; refuses ambiguous matches."""
    rule = ref_rule(ref.kind, ref.value)
    if rule is not None:
        raise StorageError(f"disk {ref.kind}:{ref.value!r}: {rule}; fix the contract")
    hits = [info for info in scan(sysfs) if matches(ref.kind, ref.value, info)]
    if len(hits) > 1:
        names = ", ".join(h.name for h in hits)
        raise StorageError(f"disk {ref.kind}:{ref.value} matches several disks ({names}); refusing")
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
    try:
        import pyudev  # noqa: PLC0415 - only the waiter needs it; the matcher is imported widely
    except ImportError:
        raise StorageError(
            "waiting for a disk needs pyudev, which is not installed; install cva with its"
            " udev extra: pip install 'confidential-volume-agent[udev]' (image/install.sh does)"
        ) from None

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


def node_by_devno(devno: str, *, sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> Path:
    """The /dev node of whole disk MAJ:MIN (a container's device, resolved from its spec):
    a whole disk (no partition, no device-mapper), its node a block device with that st_rdev."""
    m = DEVNO_RE.fullmatch(devno)
    if m is None:
        raise StorageError(f"device number {devno[:40]!r} is not MAJ:MIN")
    entry = sysfs / "dev" / "block" / devno
    try:
        resolved = entry.resolve(strict=True)
    except OSError:
        raise DiskNotFound(
            f"no block device {devno} in this guest (the container's spec names it; was it"
            " attached?)"
        ) from None
    name = resolved.name
    if (resolved / "partition").exists() or (resolved / "dm").exists():
        raise StorageError(
            f"block device {devno} ({name}) is a partition or a dm device, not a disk"
        )
    uevent = _read_attr(resolved / "uevent") or ""
    devname = next((ln[8:] for ln in uevent.splitlines() if ln.startswith("DEVNAME=")), name)
    if (
        not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}(/[A-Za-z0-9_.-]{1,64})?", devname)
        or ".." in devname
    ):
        raise StorageError(f"block device {devno} has an unusable name {devname[:64]!r}")
    node = dev / devname
    try:
        st = node.stat()
    except OSError:
        raise DiskNotFound(f"block device {devno} has no node {node}") from None
    major, minor = int(m.group(1)), int(m.group(2))
    if not stat.S_ISBLK(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (
        major,
        minor,
    ):
        raise StorageError(f"{node} is not block device {devno}")
    return node
