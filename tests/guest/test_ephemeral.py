"""Ephemeral volumes (luks.ephemeral) for real inside the qemu guest: kata's encrypted emptyDir.

A random key that exists only in the kernel, a detached header in tmpfs with no keyslot, the
disk never carries a LUKS header, plaintext never reaches the disk, integrity without journal,
blank-only formatting, and every failure cleaned up (saying whether the disk was written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from luks import dmtable, mount
from luks.ephemeral import (
    EphemeralRefused,
    EphemeralSpec,
    EphemeralVolume,
    create_ephemeral,
    mount_fstype,
    release_ephemeral,
)
from luks.libcryptsetup import CryptDevice, active_status
from luks.run import run
from tests.guest.storage_support import MIB, loop_disk, no_new_aead_lines, raw_contains

if os.environ.get("CVA_IN_GUEST") != "1":  # before any guest-only mark is looked up
    pytest.skip("runs inside the qemu guest (make vm-test)", allow_module_level=True)

pytestmark = [pytest.mark.vm]

KATA_OPTS = ("-O", "^has_journal", "-m", "0", "-i", "163840", "-I", "128")
DISK_BYTES = 256 * MIB


@pytest.fixture
def header_dir() -> Iterator[Path]:
    d = Path("/run/cva-test-ephemeral") / uuid.uuid4().hex[:8]
    yield d
    for f in d.glob("*"):
        f.unlink()
    with contextlib.suppress(OSError):
        d.rmdir()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with loop_disk(tmp_path, DISK_BYTES) as dev:
        yield dev


def spec_for(
    disk: Path, header_dir: Path, tmp_path: Path, *, integrity: bool = False, fs: bool = True,
    mkfs: tuple[str, ...] = KATA_OPTS,
) -> EphemeralSpec:  # fmt: skip
    mapper = f"cva-eph-{uuid.uuid4().hex[:12]}"
    return EphemeralSpec(
        device=disk,
        mapper=mapper,
        header=header_dir / f"{mapper}.header",
        integrity=integrity,
        mount_dir=tmp_path / "mnt" / mapper if fs else None,
        mkfs_args=mkfs,
    )


@contextlib.contextmanager
def made(spec: EphemeralSpec) -> Iterator[EphemeralVolume]:
    vol = create_ephemeral(spec)
    try:
        yield vol
    finally:
        release_ephemeral(vol)


def digest(device: Path) -> str:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    with device.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def volume_key_hex(mapper: str) -> str:
    """The key the kernel holds (dmsetup --showkeys; tests only)."""
    line = run(["dmsetup", "table", "--showkeys", mapper], timeout=30).text.split()
    return line[4]


@pytest.mark.parametrize("integrity", [False, True], ids=["plain", "integrity"])
def test_ephemeral_volume_life(
    disk: Path, header_dir: Path, tmp_path: Path, integrity: bool
) -> None:
    spec = spec_for(disk, header_dir, tmp_path, integrity=integrity)
    marker = b"cva-ephemeral-plaintext-" + uuid.uuid4().hex.encode()
    with no_new_aead_lines(), made(spec) as vol:
        assert vol.mount_dir is not None and mount.is_mounted(vol.mount_dir, vol.mapper_device)
        with (vol.mount_dir / "f").open("wb") as f:
            f.write(marker * 256)
            f.flush()
            os.fsync(f.fileno())
        # the header: tmpfs, 0600, no keyslot at all (nothing can ever unlock it again)
        st = spec.header.stat()
        assert oct(st.st_mode & 0o777) == "0o600"
        entries = mount.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
        assert mount_fstype(spec.header, entries) == "tmpfs"
        with CryptDevice.open(str(disk), header=str(spec.header)) as cd:
            cd.load()
            meta = json.loads(cd.dump_json())
        assert meta["keyslots"] == {}
        [segment] = meta["segments"].values()
        assert (segment["offset"], segment["sector_size"]) == ("0", 4096)
        assert segment["encryption"] == "aes-xts-plain64"
        # the disk never carries a LUKS header; the key is nowhere but in the kernel
        with disk.open("rb") as f:
            head = f.read(4096)
        assert not head.startswith(b"LUKS\xba\xbe")
        shown = volume_key_hex(spec.mapper)
        if shown.startswith(":"):
            # ":<size>:logon:<desc>": the key sits in the kernel keyring as a logon key, which
            # user space cannot read back at all
            size, kind = shown.split(":")[1:3]
            assert (int(size), kind) == (96 if integrity else 64, "logon")
        else:
            key = bytes.fromhex(shown)
            assert len(key) == (96 if integrity else 64)
            assert key not in spec.header.read_bytes()
            assert not raw_contains(disk, key[:32])
        assert not raw_contains(disk, marker)
        if integrity:
            _crypt, integ = dmtable.read_live(spec.mapper, integrity=True)
            assert integ is not None and integ.mode == "D"  # direct writes: no journal
        # the filesystem is what kata asked for (no journal, 128-byte inodes)
        out = run(["dumpe2fs", "-h", str(vol.mapper_device)], timeout=60).text
        assert "has_journal" not in out.split("Filesystem features:")[1].splitlines()[0]
        assert "Inode size:\t          128" in out
    assert active_status(spec.mapper) == "inactive"
    assert not spec.header.exists()
    assert not mount.is_mounted(tmp_path / "mnt" / spec.mapper)


def test_device_target_has_no_filesystem(disk: Path, header_dir: Path, tmp_path: Path) -> None:
    spec = spec_for(disk, header_dir, tmp_path, fs=False)
    with made(spec) as vol:
        assert vol.mount_dir is None
        assert vol.mapper_device.exists()
        probe = run(["blkid", "-p", str(vol.mapper_device)], timeout=30, check=False)
        assert probe.returncode == 2  # nothing on it
    assert active_status(spec.mapper) == "inactive"


def test_an_integrity_device_target_logs_no_aead_error(
    disk: Path, header_dir: Path, tmp_path: Path
) -> None:
    """Issue 21 item 5: the fresh integrity mapping is private, so udev's blkid never reads
    its unwritten blocks (each such read logs an "INTEGRITY AEAD ERROR" line)."""
    spec = spec_for(disk, header_dir, tmp_path, integrity=True, fs=False)
    with no_new_aead_lines(), made(spec) as vol:
        assert vol.mapper_device.exists()
        udev = run(["udevadm", "info", "--query=property", str(vol.mapper_device)], timeout=30)
        assert "DM_UDEV_DISABLE_DISK_RULES_FLAG=1" in udev.text
    assert active_status(spec.mapper) == "inactive"


def test_a_disk_that_is_not_blank_is_refused_untouched(
    disk: Path, header_dir: Path, tmp_path: Path
) -> None:
    fd = os.open(disk, os.O_WRONLY)
    try:
        os.pwrite(fd, b"old data", 1 * MIB)  # inside the fully read header region
        os.fsync(fd)
    finally:
        os.close(fd)
    before = digest(disk)
    spec = spec_for(disk, header_dir, tmp_path)
    with pytest.raises(EphemeralRefused, match=r"not provably blank.*nothing was written"):
        create_ephemeral(spec)
    assert digest(disk) == before
    assert not spec.header.exists()
    assert active_status(spec.mapper) == "inactive"


def test_a_disk_in_use_is_refused(disk: Path, header_dir: Path, tmp_path: Path) -> None:
    holder = os.open(disk, os.O_RDONLY | os.O_EXCL)
    try:
        spec = spec_for(disk, header_dir, tmp_path)
        with pytest.raises(EphemeralRefused, match="in use"):
            create_ephemeral(spec)
    finally:
        os.close(holder)
    assert not spec.header.exists()


def test_a_header_outside_tmpfs_is_refused(disk: Path, tmp_path: Path) -> None:
    on_disk = Path("/var/tmp") / f"cva-eph-{uuid.uuid4().hex[:8]}"
    spec = spec_for(disk, on_disk, tmp_path)
    try:
        if mount_fstype(on_disk.parent, mount.parse_mountinfo(
            Path("/proc/self/mountinfo").read_text())) in ("tmpfs", "ramfs"):  # fmt: skip
            pytest.skip("/var/tmp is a tmpfs in this guest")
        with pytest.raises(EphemeralRefused, match="guest memory"):
            create_ephemeral(spec)
        assert not spec.header.exists()
    finally:
        with contextlib.suppress(OSError):
            on_disk.rmdir()


def test_a_failed_mkfs_cleans_up_and_the_disk_is_not_formatted_again(
    disk: Path, header_dir: Path, tmp_path: Path
) -> None:
    # more inodes than the filesystem can have: mke2fs fails after dm-crypt is up
    spec = spec_for(disk, header_dir, tmp_path, integrity=True, mkfs=("-N", "4294967295"))
    with pytest.raises(EphemeralRefused, match="no longer blank"):
        create_ephemeral(spec)
    assert active_status(spec.mapper) == "inactive"
    assert not spec.header.exists()
    again = spec_for(disk, header_dir, tmp_path)
    with pytest.raises(EphemeralRefused, match="not provably blank"):
        create_ephemeral(again)


def test_a_mapper_name_in_use_is_refused(disk: Path, header_dir: Path, tmp_path: Path) -> None:
    spec = spec_for(disk, header_dir, tmp_path, fs=False)
    with made(spec), loop_disk(tmp_path, DISK_BYTES) as second:
        clash = EphemeralSpec(
            device=second, mapper=spec.mapper, header=header_dir / "other.header",
            integrity=False, mount_dir=None,
        )  # fmt: skip
        with pytest.raises(EphemeralRefused, match="already exists"):
            create_ephemeral(clash)
        assert active_status(spec.mapper) == "active"  # the first one is untouched


def _mounts_at(path: Path) -> list[mount.MountEntry]:
    return list(mount.mounts_at(mount.parse_mountinfo(Path("/proc/self/mountinfo").read_text()),
                                str(path)))  # fmt: skip


def test_securemount_binds_only_the_volume_never_what_shadows_it(
    disk: Path, header_dir: Path, tmp_path: Path
) -> None:
    """issue 13: the staging mount shadowed by a tmpfs is refused (nothing bound at kata's
    mount point); the volume itself is bound at kata's real sandbox/storage/<base64url> path."""
    import base64

    from agent.mountpoints import MountRules
    from agent.securemount.volumes import bind_mount

    spec = spec_for(disk, header_dir, tmp_path)
    target = (
        Path("/run/kata-containers/sandbox/storage")
        / base64.urlsafe_b64encode(f"/dev/{uuid.uuid4().hex[:6]}".encode()).decode()
    )
    with made(spec) as vol:
        assert vol.mount_dir is not None
        run(["mount", "-t", "tmpfs", "-o", "size=1m", "cva-shadow", str(vol.mount_dir)],
            timeout=30)  # fmt: skip
        try:
            (vol.mount_dir / "planted").write_text("not the volume")
            with pytest.raises(mount.MountError, match="is not the filesystem of"):
                bind_mount(vol.mount_dir, vol.mapper_device, target, False, MountRules())
            assert _mounts_at(target) == []
        finally:
            run(["umount", str(vol.mount_dir)], timeout=30)
        try:
            where = bind_mount(vol.mount_dir, vol.mapper_device, target, False, MountRules())
            assert where == target
            [entry] = _mounts_at(target)
            assert entry.devno == dmtable.device_number(vol.mapper_device)
            assert not (target / "planted").exists()
        finally:
            while _mounts_at(target):
                run(["umount", str(target)], timeout=30)
            with contextlib.suppress(OSError):
                target.rmdir()
