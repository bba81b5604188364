"""luks.disk: sysfs identification and the uevent-driven wait."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from luks import disk
from luks.errors import StorageError


@dataclass(frozen=True)
class Ref:
    kind: str
    value: str


VDB = disk.BlockInfo("vdb", "pgdisk", "/sys/devices/pci0000:00/0000:00:05.0/virtio3/block/vdb")
SDA = disk.BlockInfo(
    "sda", "", "/sys/devices/pci0000:00/0000:00:03.0/virtio1/host0/target0:0:1/0:0:1:0/block/sda"
)


def test_matches() -> None:
    assert disk.matches("serial", "pgdisk", VDB)
    assert not disk.matches("serial", "pgdisk2", VDB)
    assert not disk.matches("serial", "pgdisk", SDA)  # SDA has no serial
    assert disk.matches("pci", "0000:00:05.0", VDB)
    # a disk behind a SCSI controller carries the controller's address: `find` refuses when
    # that matches several disks (use scsi:H:C:T:L for those)
    assert disk.matches("pci", "0000:00:03.0", SDA)
    assert not disk.matches("pci", "0000:00:05.0", SDA)
    assert disk.matches("scsi", "0:0:1:0", SDA) and not disk.matches("scsi", "0:0:1:1", SDA)
    assert disk.matches("scsi", "1:0", SDA) and not disk.matches("scsi", "0:1", SDA)
    with pytest.raises(StorageError):
        disk.matches("scsi", "1", SDA)
    with pytest.raises(StorageError):
        disk.matches("nvme", "x", VDB)
    for kind, value in (("pci", "zz"), ("pci", "00:05.0"), ("serial", ""), ("scsi", "01:0")):
        with pytest.raises(StorageError):  # one canonical form per kind (test_disk_matcher.py)
            disk.matches(kind, value, VDB)


def fake_sysfs(root: Path, name: str, serial: str, pci: str = "0000:00:05.0") -> None:
    dev = root / "devices" / "pci0000:00" / pci / "virtio3" / "block" / name
    dev.mkdir(parents=True)
    (dev / "serial").write_text(serial + "\n")
    (root / "block").mkdir(exist_ok=True)
    (root / "block" / name).symlink_to(dev)


def test_find_in_fake_sysfs(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    fake_sysfs(sysfs, "vdb", "pgdisk")
    (dev / "vdb").touch()
    assert disk.find(Ref("serial", "pgdisk"), sysfs=sysfs, dev=dev) == dev / "vdb"
    assert disk.find(Ref("pci", "0000:00:05.0"), sysfs=sysfs, dev=dev) == dev / "vdb"
    assert disk.find(Ref("serial", "other"), sysfs=sysfs, dev=dev) is None
    fake_sysfs(sysfs, "vdc", "pgdisk", pci="0000:00:06.0")
    with pytest.raises(StorageError, match="several disks"):
        disk.find(Ref("serial", "pgdisk"), sysfs=sysfs, dev=dev)
    with pytest.raises(StorageError, match="serial id must be"):
        disk.find(Ref("serial", "../x"), sysfs=sysfs, dev=dev)


def test_real_sysfs_scan_finds_whole_disks() -> None:
    infos = disk.scan()
    assert infos, "this machine has block devices"
    for info in infos:
        assert "/" not in info.name and info.devpath.startswith("/sys/devices/")
    with_serial = [i for i in infos if i.serial]
    if with_serial:  # e.g. the host's virtio root disk
        i = with_serial[0]
        assert disk.wait_for_disk(Ref("serial", i.serial), 1.0) == Path("/dev") / i.name


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="uevent netlink + trigger need root")


@needs_root
def test_wait_times_out_cleanly() -> None:
    with pytest.raises(disk.DiskNotFound, match=r"did not appear within 0\.3s"):
        disk.wait_for_disk(Ref("serial", "cva-no-such-disk"), 0.3)


@needs_root
def test_wait_wakes_on_uevent(tmp_path: Path) -> None:
    """The disk 'appears' in a fake sysfs; a real kernel uevent (change on a loop device) wakes
    the waiter, which rescans and finds it — no polling in between."""
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    (sysfs / "block").mkdir(parents=True)
    loops = sorted(p for p in Path("/sys/block").iterdir() if p.name.startswith("loop"))
    if not loops:
        pytest.skip("no loop device to trigger a uevent")

    def plug() -> None:
        time.sleep(0.3)
        fake_sysfs(sysfs, "vdz", "hotplugged")
        (dev / "vdz").touch()
        (loops[0] / "uevent").write_text("change\n")

    t = threading.Thread(target=plug)
    t.start()
    try:
        found = disk.wait_for_disk(Ref("serial", "hotplugged"), 20.0, sysfs=sysfs, dev=dev)
    finally:
        t.join()
    assert found == dev / "vdz"
