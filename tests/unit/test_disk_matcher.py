"""One disk matcher: the contract's disk reference means the same disk whether cva opens a contract
volume (luks.disk.find over /sys/block) or SecureMount's guard asks "is this a contract disk?"
(agent.securemount.blockdev over /sys/dev/block -> DeviceIdentity.matches). Both are built here
over the same fake sysfs tree, so the test compares the two real call paths, not two calls of one
function.

On main the two disagreed: the guard missed kata's `scsi:T:L` form (an ephemeral SecureMount
would have formatted that contract disk) and matched a PCI bridge's address on any disk behind it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.contract import ContractError, parse_disk
from agent.securemount.blockdev import identify_block_device
from agent.securemount.decisions import (
    DeviceIdentity,
    DeviceSelector,
    SecureMountPolicy,
    SecureMountRefused,
    parse_secure_mount,
    plan_secure_mount,
)
from luks import disk
from luks.errors import StorageError


@dataclass(frozen=True)
class Ref:
    kind: str
    value: str


@dataclass(frozen=True)
class FakeDisk:
    name: str
    minor: int
    serial: str | None
    devpath: str  # below /sys/devices


VIRTIO = FakeDisk("vdb", 16, "pgdisk", "pci0000:00/0000:00:05.0/virtio3/block/vdb")
BRIDGED = FakeDisk(
    "vdc", 32, "logs", "pci0000:00/0000:00:02.0/0000:01:00.0/virtio4/block/vdc"
)  # a virtio-blk function behind a PCI bridge (kata's pcie_root_port / bridges)
SCSI = FakeDisk(
    "sda", 48, None, "pci0000:00/0000:00:03.0/virtio1/host0/target0:0:1/0:0:1:2/block/sda"
)
SCSI_B = FakeDisk(
    "sdb", 64, "", "pci0000:00/0000:00:03.0/virtio1/host0/target0:0:7/0:0:7:0/block/sdb"
)
NOSERIAL = FakeDisk("vdd", 80, " \t\n", "pci0000:00/0000:00:06.0/virtio5/block/vdd")
DISKS = (VIRTIO, BRIDGED, SCSI, SCSI_B, NOSERIAL)


def build_sysfs(root: Path, disks: tuple[FakeDisk, ...] = DISKS) -> None:
    """/sys/devices/... with both views of each disk: /sys/block/NAME and /sys/dev/block/M:m."""
    (root / "block").mkdir(parents=True)
    (root / "dev" / "block").mkdir(parents=True)
    for d in disks:
        real = root / "devices" / d.devpath
        real.mkdir(parents=True)
        (real / "uevent").write_text(
            f"MAJOR=252\nMINOR={d.minor}\nDEVNAME={d.name}\nDEVTYPE=disk\n"
        )
        if d.serial is not None:
            (real / "serial").write_text(d.serial + "\n")
        (root / "block" / d.name).symlink_to(real)
        link = root / "dev" / "block" / f"252:{d.minor}"
        link.symlink_to(os.path.relpath(real, link.parent))


# (reference, the disk it names or None). Every row is checked on both paths.
TABLE: list[tuple[Ref, FakeDisk | None]] = [
    (Ref("serial", "pgdisk"), VIRTIO),
    (Ref("serial", "logs"), BRIDGED),
    (Ref("serial", "other"), None),
    (Ref("pci", "0000:00:05.0"), VIRTIO),
    (Ref("pci", "0000:01:00.0"), BRIDGED),  # the disk's own function
    (Ref("pci", "0000:00:02.0"), None),  # a bridge is not the disk behind it
    (Ref("pci", "0000:00:06.0"), NOSERIAL),
    (Ref("pci", "0000:00:07.0"), None),
    (Ref("scsi", "0:0:1:2"), SCSI),
    (Ref("scsi", "1:2"), SCSI),  # kata's T:L
    (Ref("scsi", "7:0"), SCSI_B),
    (Ref("scsi", "0:0:1:0"), None),
    (Ref("scsi", "2:1"), None),
]


@pytest.mark.parametrize(("ref", "expected"), TABLE, ids=[f"{r.kind}:{r.value}" for r, _ in TABLE])
def test_find_and_the_securemount_guard_agree(
    tmp_path: Path, ref: Ref, expected: FakeDisk | None
) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    build_sysfs(sysfs)
    dev.mkdir()
    for d in DISKS:
        (dev / d.name).touch()
    found = disk.find(ref, sysfs=sysfs, dev=dev)
    assert found == (dev / expected.name if expected else None)
    for d in DISKS:
        ident = identify_block_device(DeviceSelector((252, d.minor), None), sys_root=sysfs)
        assert ident.matches(ref.kind, ref.value) == (d == expected), (d.name, ref)


def test_a_pci_controller_names_all_its_scsi_disks_and_find_refuses_that(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    build_sysfs(sysfs)
    dev.mkdir()
    with pytest.raises(StorageError, match="several disks"):
        disk.find(Ref("pci", "0000:00:03.0"), sysfs=sysfs, dev=dev)
    for d in (SCSI, SCSI_B):  # ... and the guard keeps an ephemeral volume off both
        ident = identify_block_device(DeviceSelector((252, d.minor), None), sys_root=sysfs)
        assert ident.matches("pci", "0000:00:03.0")


# -- the guard itself, through the planner: a kata T:L contract disk is never formatted ----------


@dataclass(frozen=True)
class Vol:
    name: str
    key: str
    disk: Ref
    filesystem: str = "ext4"
    containers: tuple[str, ...] = ()
    create: bool = True
    integrity: bool = False
    read_only: bool = False


EMPTYDIR = {
    "deviceId": "252:48",
    "sourceType": "empty",
    "targetType": "fileSystem",
    "filesystemType": "ext4",
    "encryptionType": "luks2",
    "dataIntegrity": "false",
}


@pytest.mark.parametrize("ref", [Ref("scsi", "1:2"), Ref("scsi", "0:0:1:2")], ids=["T:L", "HCTL"])
def test_ephemeral_securemount_refuses_a_scsi_contract_disk(tmp_path: Path, ref: Ref) -> None:
    build_sysfs(tmp_path)
    ident = identify_block_device(DeviceSelector((252, SCSI.minor), None), sys_root=tmp_path)
    params = parse_secure_mount(
        "block-device", EMPTYDIR, [], "/run/kata-containers/sandbox/storage/x"
    )
    with pytest.raises(SecureMountRefused) as info:
        plan_secure_mount(
            params,
            ident,
            [Vol("db", "kbs:///default/db/luks", ref)],
            policy=SecureMountPolicy(ephemeral=True),
            header_dir=tmp_path / "h",
        )
    assert info.value.rule == "contract-disk"


# -- hostile and non-canonical references: refused by contract and matcher alike ---------------

HOSTILE = [
    ("pci", "00:05.0"),  # short form: was normalised by find, missed by the guard
    ("pci", "0000:00:05.0 "),
    ("pci", "0000:00:05.0\n"),
    ("pci", "0000:00:05.A"),
    ("pci", "0000:00:05.0/../0000:00:06.0"),
    ("pci", "0000:00:25.0"),  # device > 0x1f
    ("scsi", "01:0"),  # the kernel never prints a leading zero
    ("scsi", "0:0:1"),  # three fields: neither H:C:T:L nor T:L
    ("scsi", "1"),
    ("scsi", "\u0661:\u0660"),  # Arabic-Indic digits match \d, not [0-9]
    ("scsi", "-1:0"),
    ("scsi", "target0:0:1"),
    ("serial", ""),
    ("serial", "pg disk"),
    ("serial", "../vdb"),
    ("serial", "x" * 21),
    ("serial", "pgdisk\x00"),
    ("nvme", "x"),
    ("", "x"),
]


@pytest.mark.parametrize(("kind", "value"), HOSTILE)
def test_hostile_references_are_refused_everywhere(kind: str, value: str) -> None:
    assert disk.ref_rule(kind, value) is not None
    info = disk.BlockInfo("vdb", value, f"/sys/devices/pci0000:00/{value}/block/vdb")
    with pytest.raises(StorageError):
        disk.matches(kind, value, info)
    with pytest.raises(StorageError):
        DeviceIdentity("/dev/vdb", 252, 16, value, info.devpath).matches(kind, value)
    with pytest.raises(ContractError):
        parse_disk(f"{kind}:{value}")


_segment = st.one_of(
    st.from_regex(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]", fullmatch=True),
    st.from_regex(r"[0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}", fullmatch=True),
    st.sampled_from(["virtio3", "host0", "target0:0:1", "block", "pci0000:00", "vdb"]),
    st.text(alphabet=st.characters(blacklist_characters="/\x00"), min_size=1, max_size=12),
)
_value = st.one_of(
    st.from_regex(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]", fullmatch=True),
    st.from_regex(r"[0-9]{1,2}(:[0-9]{1,2}){0,4}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9_.-]{1,22}", fullmatch=True),
    st.text(max_size=24),
)


@given(
    kind=st.sampled_from(["serial", "pci", "scsi", "SCSI", "usb"]),
    value=_value,
    segments=st.lists(_segment, max_size=8),
    serial=st.one_of(st.none(), st.text(max_size=24), st.sampled_from(["pgdisk", "0:0:1:2"])),
)
def test_contract_matcher_and_guard_agree_on_anything(
    kind: str, value: str, segments: list[str], serial: str | None
) -> None:
    devpath = "/sys/devices/" + "/".join(segments)
    ident = DeviceIdentity("/dev/vdb", 252, 16, serial, devpath)
    info = disk.BlockInfo("vdb", serial or "", devpath)
    canonical = disk.ref_rule(kind, value) is None
    try:
        parse_disk(f"{kind}:{value}")
        contract_ok = True
    except ContractError:
        contract_ok = False
    assert contract_ok == canonical  # the contract accepts exactly what the matcher accepts
    if not canonical:
        with pytest.raises(StorageError):
            ident.matches(kind, value)
        with pytest.raises(StorageError):
            disk.matches(kind, value, info)
        return
    assert ident.matches(kind, value) == disk.matches(kind, value, info)


@pytest.mark.parametrize(
    ("text", "serial"),
    [(None, ""), ("pgdisk\n", "pgdisk"), (" \n", ""), ("a b\n", ""), ("x\x00", "x"), ("é", "")],
)
def test_serial_cleaning_is_shared(text: str | None, serial: str) -> None:
    assert disk.serial_from_sysfs(text) == serial


def test_contract_patterns_are_the_matchers() -> None:
    from agent import contract

    assert contract.SERIAL_RE.pattern == disk.SERIAL_REF_RE.pattern
    assert contract.PCI_RE.pattern == disk.PCI_REF_RE.pattern
    assert contract.SCSI_RE.pattern == disk.SCSI_REF_RE.pattern
