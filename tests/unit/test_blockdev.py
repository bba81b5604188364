"""Device identification over a fake sysfs tree (and a real block device node for devicePath)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.rpc.ttrpc import Code, status_for
from agent.securemount.blockdev import DeviceNotFound, DeviceRefused, identify_block_device
from agent.securemount.decisions import DeviceSelector


def fake_disk(
    sys_root: Path,
    devnum: str,
    devname: str,
    *,
    pci: str = "0000:00:05.0",
    devtype: str = "disk",
    serial: str | None = "pgdisk",
    holders: tuple[str, ...] = (),
    dm: bool = False,
) -> Path:
    real = sys_root / "devices" / "pci0000:00" / pci / "virtio2" / "block" / devname
    real.mkdir(parents=True)
    (real / "uevent").write_text(f"MAJOR=252\nMINOR=16\nDEVNAME={devname}\nDEVTYPE={devtype}\n")
    if serial is not None:
        (real / "serial").write_text(serial + "\n")
    (real / "holders").mkdir()
    for h in holders:
        (real / "holders" / h).touch()
    if dm:
        (real / "dm").mkdir()
    link_dir = sys_root / "dev" / "block"
    link_dir.mkdir(parents=True, exist_ok=True)
    (link_dir / devnum).symlink_to(os.path.relpath(real, link_dir))
    return real


def test_device_id_resolves_devname_serial_and_pci_path(tmp_path: Path) -> None:
    fake_disk(tmp_path, "252:16", "vdb")
    ident = identify_block_device(DeviceSelector((252, 16), None), sys_root=tmp_path)
    assert (ident.path, ident.major, ident.minor, ident.serial) == ("/dev/vdb", 252, 16, "pgdisk")
    assert ident.matches("serial", "pgdisk")
    assert ident.matches("pci", "0000:00:05.0")
    assert not ident.matches("pci", "0000:00:06.0")
    assert not ident.matches("serial", "other")


def test_missing_device_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotFound) as info:
        identify_block_device(DeviceSelector((252, 99), None), sys_root=tmp_path)
    assert status_for(info.value)[0] == Code.NOT_FOUND


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"devtype": "partition"}, "not a whole disk"),
        ({"dm": True}, "device-mapper"),
    ],
)
def test_devices_in_use_or_partial_are_refused(tmp_path: Path, kw: dict, match: str) -> None:
    fake_disk(tmp_path, "252:16", "vdb", **kw)
    with pytest.raises(DeviceRefused, match=match) as info:
        identify_block_device(DeviceSelector((252, 16), None), sys_root=tmp_path)
    assert status_for(info.value)[0] == Code.FAILED_PRECONDITION


@pytest.mark.parametrize("devname", ["../../etc/passwd", "", "vd b", "a/../b"])
def test_hostile_devname_is_refused(tmp_path: Path, devname: str) -> None:
    real = tmp_path / "devices" / "x"
    real.mkdir(parents=True)
    (real / "uevent").write_text(f"DEVTYPE=disk\nDEVNAME={devname}\n")
    (tmp_path / "dev" / "block").mkdir(parents=True)
    (tmp_path / "dev" / "block" / "1:1").symlink_to(real)
    with pytest.raises(DeviceRefused):
        identify_block_device(DeviceSelector((1, 1), None), sys_root=tmp_path)


def test_oversized_uevent_is_refused(tmp_path: Path) -> None:
    real = fake_disk(tmp_path, "252:16", "vdb")
    (real / "uevent").write_text("X=" + "y" * 5000)
    with pytest.raises(DeviceRefused, match="larger than"):
        identify_block_device(DeviceSelector((252, 16), None), sys_root=tmp_path)


def test_unprintable_serial_matches_nothing(tmp_path: Path) -> None:
    fake_disk(tmp_path, "252:16", "vdb", serial="\x01\x02")
    ident = identify_block_device(DeviceSelector((252, 16), None), sys_root=tmp_path)
    assert ident.serial is None


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a block device node needs root")
def test_device_path_is_stat_ed_for_its_number(tmp_path: Path) -> None:
    fake_disk(tmp_path / "sys", "252:16", "vdb")
    node = tmp_path / "vdb"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(252, 16))
    ident = identify_block_device(DeviceSelector(None, str(node)), sys_root=tmp_path / "sys")
    assert (ident.major, ident.minor, ident.serial) == (252, 16, "pgdisk")


def test_device_path_that_is_not_a_block_device(tmp_path: Path) -> None:
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(DeviceRefused, match="not a block device"):
        identify_block_device(DeviceSelector(None, str(plain)), sys_root=tmp_path)
    with pytest.raises(DeviceNotFound):
        identify_block_device(DeviceSelector(None, str(tmp_path / "none")), sys_root=tmp_path)


def test_holders_are_reported_not_refused(tmp_path: Path) -> None:
    """cva's own mapping holds a contract disk once it is open; the SecureMount backend decides."""
    fake_disk(tmp_path, "252:16", "vdb", holders=("dm-3", "dm-0"))
    ident = identify_block_device(DeviceSelector((252, 16), None), sys_root=tmp_path)
    assert ident.holders == ("dm-0", "dm-3")


def test_strange_holders_are_refused(tmp_path: Path) -> None:
    fake_disk(tmp_path, "252:16", "vdb", holders=("..x",))
    with pytest.raises(DeviceRefused, match="holders") as info:
        identify_block_device(DeviceSelector((252, 16), None), sys_root=tmp_path)
    assert "device-unusable" in str(info.value)
