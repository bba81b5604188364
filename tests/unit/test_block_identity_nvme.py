"""One block-identity builder (luks.disk.block_info) for opening a contract volume's disk and for
SecureMount's never-a-contract-disk guard, with NVMe (issue 21 item 5): an NVMe namespace has
no `serial` of its own; its `device` (the controller, or the subsystem with native multipath)
carries the serial, space padded to 20 bytes. Fake sysfs trees laid out as the kernel does."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.securemount.blockdev import identify_block_device
from agent.securemount.decisions import DeviceSelector
from luks import disk


@dataclass(frozen=True)
class Ref:
    kind: str
    value: str


PCI = "0000:00:04.0"


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def fake_nvme(sys_root: Path, *, layout: str, serial: str = "pgdisk", namespaces: int = 1) -> None:
    """nvme0 (serial) with namespaces nvme0n1..; `layout` "pci": the namespace under the
    controller; "subsystem": under /sys/devices/virtual/nvme-subsystem (native multipath)."""
    ctrl = sys_root / "devices" / "pci0000:00" / PCI / "nvme" / "nvme0"
    ctrl.mkdir(parents=True)
    (ctrl / "serial").write_text(serial.ljust(20) + "\n")
    parent = ctrl
    if layout == "subsystem":
        parent = sys_root / "devices" / "virtual" / "nvme-subsystem" / "nvme-subsys0"
        parent.mkdir(parents=True)
        (parent / "serial").write_text(serial.ljust(20) + "\n")
    for n in range(1, namespaces + 1):
        name = f"nvme0n{n}"
        ns = parent / name
        ns.mkdir()
        (ns / "uevent").write_text(f"MAJOR=259\nMINOR={n - 1}\nDEVNAME={name}\nDEVTYPE=disk\n")
        (ns / "holders").mkdir()
        _link(ns / "device", parent)
        _link(sys_root / "block" / name, ns)
        _link(sys_root / "dev" / "block" / f"259:{n - 1}", ns)


@pytest.mark.parametrize("layout", ["pci", "subsystem"])
def test_an_nvme_serial_is_seen_by_both_the_opener_and_the_securemount_guard(
    tmp_path: Path, layout: str
) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    (dev / "nvme0n1").touch()
    fake_nvme(sysfs, layout=layout)
    # opening the contract volume finds the namespace by its controller's serial ...
    assert disk.find(Ref("serial", "pgdisk"), sysfs=sysfs, dev=dev) == dev / "nvme0n1"
    # ... and SecureMount sees the same identity, so it never formats that disk as ephemeral
    ident = identify_block_device(DeviceSelector((259, 0), None), sys_root=sysfs)
    assert ident.serial == "pgdisk"
    assert ident.matches("serial", "pgdisk")
    [scanned] = disk.scan(sysfs)
    assert (ident.serial, ident.sysfs_path) == (scanned.serial, scanned.devpath)
    if layout == "pci":
        assert ident.matches("pci", PCI)


def test_every_namespace_of_a_contract_controller_is_guarded_and_find_refuses_the_ambiguity(
    tmp_path: Path,
) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    fake_nvme(sysfs, layout="pci", namespaces=2)
    for minor in (0, 1):
        ident = identify_block_device(DeviceSelector((259, minor), None), sys_root=sysfs)
        assert ident.matches("serial", "pgdisk")
    with pytest.raises(disk.StorageError, match="several disks"):
        disk.find(Ref("serial", "pgdisk"), sysfs=sysfs, dev=dev)


def test_a_virtio_serial_wins_over_device_serial(tmp_path: Path) -> None:
    entry = tmp_path / "vdb"
    (entry / "device").mkdir(parents=True)
    (entry / "serial").write_text("virtio-one\n")
    (entry / "device" / "serial").write_text("other\n")
    info = disk.block_info(entry, "vdb")
    assert info is not None and info.serial == "virtio-one"


@pytest.mark.parametrize("bad", ["", "   ", "a b", "x" * 300, "\x00\x00"])
def test_an_unusable_serial_is_empty_and_matches_nothing(tmp_path: Path, bad: str) -> None:
    entry = tmp_path / "nvme0n1"
    (entry / "device").mkdir(parents=True)
    (entry / "device" / "serial").write_text(bad)
    info = disk.block_info(entry, "nvme0n1")
    assert info is not None and info.serial == ""


def test_a_vanished_entry_has_no_identity(tmp_path: Path) -> None:
    assert disk.block_info(tmp_path / "gone", "gone") is None
