"""Identify the guest block device a SecureMount request names, through sysfs.

`deviceId` ("MAJ:MIN") is looked up as `/sys/dev/block/MAJ:MIN` (its `uevent` gives `DEVNAME`, as
CDH does); `devicePath` is stat()ed for its device number and then looked up the same way. The
result carries what `agent.securemount.decisions` matches against the contract's disks: the serial
(virtio `serial` or NVMe `device/serial`) and the resolved sysfs path (whose components hold the
PCI address / SCSI H:C:T:L), both built by `luks.disk.block_info` exactly as for a contract
volume's disk, and the devices stacked on it (holders). A device that is not a whole disk or is
a device-mapper node is refused here; one with holders is refused by the ephemeral path
(SecureMount must never format something already in use) unless it is cva's own volume already
in place at that mount point.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from agent.rpc.ttrpc import Code
from agent.securemount.decisions import DeviceIdentity, DeviceSelector, SecureMountRefused
from luks.disk import block_info

_DEVNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}(/[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}){0,3}")
MAX_SYSFS_READ = 4096
MAX_HOLDERS = 64


class DeviceNotFound(SecureMountRefused):
    """The requested block device does not exist in this guest."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.NOT_FOUND, "device-not-found", message)


class DeviceRefused(SecureMountRefused):
    """The requested device exists but must not be used."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.FAILED_PRECONDITION, "device-unusable", message)


def _read_small(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SYSFS_READ + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_SYSFS_READ:
        raise DeviceRefused(f"{path} is larger than {MAX_SYSFS_READ} bytes")
    return data.decode("utf-8", "replace")


def identify_block_device(
    selector: DeviceSelector, *, sys_root: Path = Path("/sys"), dev_root: Path = Path("/dev")
) -> DeviceIdentity:
    """The `DeviceIdentity` of the selected device; raises DeviceNotFound / DeviceRefused."""
    if selector.device_id is not None:
        major, minor = selector.device_id
    elif selector.device_path is not None:
        try:
            st = Path(selector.device_path).stat()
        except FileNotFoundError as exc:
            raise DeviceNotFound(f"devicePath {selector.device_path} does not exist") from exc
        except OSError as exc:
            raise DeviceRefused(f"devicePath {selector.device_path}: {exc.strerror}") from exc
        if not stat.S_ISBLK(st.st_mode):
            raise DeviceRefused(f"devicePath {selector.device_path} is not a block device")
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        raise DeviceRefused("no device given (deviceId or devicePath)")
    sysdir = sys_root / "dev" / "block" / f"{major}:{minor}"
    uevent = _read_small(sysdir / "uevent")
    if uevent is None:
        raise DeviceNotFound(f"no block device {major}:{minor} in this guest")
    fields = dict(line.split("=", 1) for line in uevent.splitlines() if "=" in line)
    devname = fields.get("DEVNAME", "")
    if _DEVNAME.fullmatch(devname) is None or ".." in devname.split("/"):
        raise DeviceRefused(f"block device {major}:{minor} has an unusable DEVNAME")
    if fields.get("DEVTYPE") != "disk":
        raise DeviceRefused(f"block device {devname} is not a whole disk")
    if devname.startswith("dm-") or (sysdir / "dm").exists():
        raise DeviceRefused(f"block device {devname} is a device-mapper node")
    holders = _holders(sysdir / "holders")
    # the storage layer's one identity builder (virtio `serial`, NVMe `device/serial`, the
    # resolved path), exactly what luks.disk.scan sees when it opens a contract volume
    info = block_info(sysdir, devname)
    if info is None:
        raise DeviceNotFound(f"block device {major}:{minor} vanished from sysfs")
    return DeviceIdentity(
        path=str(dev_root / devname),
        major=major,
        minor=minor,
        serial=info.serial or None,  # empty or unprintable: None, matches no contract disk
        sysfs_path=info.devpath,
        holders=holders,
    )


def _holders(holders_dir: Path) -> tuple[str, ...]:
    """The devices stacked on this disk (dm-crypt, LVM, md: `dm-3`, ...). Reported, not refused
    here: a contract volume's disk is held by cva's own mapping once open, and an ephemeral
    request decides with cva's record of what it mounted (agent.securemount.volumes)."""
    try:
        names = sorted(p.name for p in holders_dir.iterdir())
    except FileNotFoundError:
        return ()
    if len(names) > MAX_HOLDERS or any(_DEVNAME.fullmatch(n) is None for n in names):
        raise DeviceRefused(f"{holders_dir} lists more or stranger holders than a disk has")
    return tuple(names)
