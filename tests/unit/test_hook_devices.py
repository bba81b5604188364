"""`disk = "container:<devicePath>"` (issue 22): the contract form, and resolving it through the
container's own OCI spec (hostile JSON) and the guest's sysfs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.contract import ContractError, DiskRef, parse_contract, parse_disk
from agent.hook.devices import DeviceSpecError, spec_device
from luks import disk as luks_disk
from luks.errors import StorageError
from tests.unit.test_contract import KBS, volume


@pytest.mark.parametrize(
    "path", ["/dev/xvda", "/dev/block/pvc-1", "/dev/disk/by-id/x.y_z-1", "/dev/sdb"]
)
def test_container_disks(path: str) -> None:
    assert parse_disk(f"container:{path}") == DiskRef("container", path)


@pytest.mark.parametrize(
    "text",
    [
        "container:",
        "container:xvda",
        "container:/dev",
        "container:/dev/",
        "container:/etc/passwd",
        "container:/dev/../etc",
        "container:/dev/./xvda",
        "container:/dev//xvda",
        "container:/dev/xvda/",
        "container:/dev/x y",
        "container:/dev/" + "a" * 65,
        "devno:8:16",  # internal only, never from a contract
    ],
)
def test_bad_container_disks(text: str) -> None:
    with pytest.raises(ContractError):
        parse_disk(text)


def _contract(**fields: str) -> str:
    return "version = 1\n" + KBS + volume(disk='"container:/dev/xvda"', **fields)


def test_container_disk_needs_exactly_one_container() -> None:
    for containers in ("[]", '["a", "b"]'):
        with pytest.raises(ContractError, match="exactly that container"):
            parse_contract(_contract(containers=containers))
    vol = parse_contract(_contract(containers='["pg"]')).volumes[0]
    assert vol.disk == DiskRef("container", "/dev/xvda") and vol.keep_device is False
    kept = parse_contract(_contract(containers='["pg"]', keep_device="true")).volumes[0]
    assert kept.keep_device is True


def test_keep_device_only_for_container_disks() -> None:
    with pytest.raises(ContractError, match="keep_device"):
        parse_contract("version = 1\n" + KBS + volume(keep_device="true"))


SPEC = {
    "ociVersion": "1.1.0",
    "linux": {
        "devices": [
            {"path": "/dev/xvda", "type": "b", "major": 8, "minor": 16},
            {"path": "/dev/null2", "type": "c", "major": 1, "minor": 3},
        ]
    },
}


def test_spec_device() -> None:
    assert spec_device(json.dumps(SPEC).encode(), "/dev/xvda") == (8, 16)


@pytest.mark.parametrize(
    ("spec", "path", "match"),
    [
        (SPEC, "/dev/xvdb", "lists no device"),
        (SPEC, "/dev/null2", "not a block device"),
        ({"linux": {"devices": [SPEC["linux"]["devices"][0]] * 2}}, "/dev/xvda", "2 times"),  # type: ignore[index]
        ({"linux": {"devices": [{"path": "/dev/xvda", "type": "b", "major": -1, "minor": 0}]}},
         "/dev/xvda", "major"),
        ({"linux": {"devices": [{"path": "/dev/xvda", "type": "b", "major": 8, "minor": True}]}},
         "/dev/xvda", "minor"),
        ({"linux": {"devices": "x"}}, "/dev/xvda", "lists no device"),
        ([], "/dev/xvda", "lists no device"),
    ],
)  # fmt: skip
def test_spec_device_refusals(spec: object, path: str, match: str) -> None:
    with pytest.raises(DeviceSpecError, match=match):
        spec_device(json.dumps(spec).encode(), path)


@given(st.binary(max_size=300))
def test_spec_device_hostile_bytes(raw: bytes) -> None:
    try:
        major, minor = spec_device(raw, "/dev/xvda")
    except DeviceSpecError:
        return
    assert major >= 0 and minor >= 0


def test_securemount_guard_refuses_per_container_disks() -> None:
    info = luks_disk.BlockInfo("sdb", "", "/sys/devices/pci0000:00/x/block/sdb")
    for kind, value in (("container", "/dev/xvda"), ("devno", "8:16")):
        with pytest.raises(StorageError, match="resolved per container"):
            luks_disk.matches(kind, value, info)


def _fake_block(sysfs: Path, devno: str, name: str, *, partition: bool = False) -> None:
    real = sysfs / "devices" / "virtual" / "block" / name
    real.mkdir(parents=True)
    (real / "uevent").write_text(
        f"MAJOR={devno.split(':', maxsplit=1)[0]}\nDEVNAME={name}\nDEVTYPE=disk\n"
    )
    if partition:
        (real / "partition").write_text("1\n")
    (sysfs / "dev" / "block").mkdir(parents=True, exist_ok=True)
    (sysfs / "dev" / "block" / devno).symlink_to(real)


def test_node_by_devno_refusals(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    with pytest.raises(StorageError, match="MAJ:MIN"):
        luks_disk.node_by_devno("8:016", sysfs=sysfs, dev=dev)
    with pytest.raises(luks_disk.DiskNotFound, match="attached"):
        luks_disk.node_by_devno("8:16", sysfs=sysfs, dev=dev)
    _fake_block(sysfs, "8:17", "sdb1", partition=True)
    with pytest.raises(StorageError, match="partition"):
        luks_disk.node_by_devno("8:17", sysfs=sysfs, dev=dev)
    _fake_block(sysfs, "8:16", "sdb")
    with pytest.raises(luks_disk.DiskNotFound, match="no node"):
        luks_disk.node_by_devno("8:16", sysfs=sysfs, dev=dev)
    (dev / "sdb").write_text("not a device")
    with pytest.raises(StorageError, match="is not block device 8:16"):
        luks_disk.node_by_devno("8:16", sysfs=sysfs, dev=dev)
