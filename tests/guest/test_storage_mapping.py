"""A mapping left up by an earlier run is never measured as whatever header the disk holds now
(issue 21 item 1), and the live table check refuses a mapping that is not the contract's.

Inside the qemu guest (root, real dm-crypt, loop devices). The event's UUID is compared with
the kernel's own dm UUID of the mapping (`dmsetup info -c -o uuid`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.measure import VolumeIdentity
from evidence.volume_event import VolumeOperation, parse_volume_content, volume_content
from luks import mapping_record, mount, volume
from luks.header import read_header_area
from luks.libcryptsetup import active_status
from luks.run import run
from luks.volume_plan import CrashWindow
from tests.guest.storage_support import (
    MIB,
    Env,
    dm_table,
    loop_disk,
    make_volume,
    read_marker,
    unique,
    write_marker,
)

if os.environ.get("CVA_IN_GUEST") != "1":  # before any guest-only mark is looked up
    pytest.skip("runs inside the qemu guest (make vm-test)", allow_module_level=True)

pytestmark = [pytest.mark.vm]

DATA = 16 * MIB  # the data segment's offset on the disk


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path / "cva")


def _dm_uuid(mapper: str) -> str:
    return run(
        ["dmsetup", "info", "-c", "--noheadings", "-o", "uuid", mapper], timeout=30
    ).text.strip()


def _xor(dev: Path, offset: int, length: int) -> None:
    with dev.open("r+b") as f:
        f.seek(offset)
        data = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
        f.flush()
        os.fsync(f.fileno())
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _put_header(dev: Path, area: bytes) -> None:
    with dev.open("r+b") as f:
        f.write(area)
        f.flush()
        os.fsync(f.fileno())
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _genuine_other_header(env: Env, tmp_path: Path, vol: Any) -> bytes:
    """Header B: the same volume name and key, made on another disk (a replica, a re-create)."""
    with loop_disk(tmp_path, 128 * MIB) as other:
        p = env.prepare(vol, other)
        env.release(vol, other)
        assert p.created
        return read_header_area(str(other))


def test_mount_failure_then_header_swap_never_measures_the_swapped_header(
    env: Env, tmp_path: Path
) -> None:
    vol = make_volume(unique("swapmnt"))
    mapper = volume.mapper_name(vol.name)
    header_b = _genuine_other_header(env, tmp_path, vol)
    with loop_disk(tmp_path, 128 * MIB) as dev:
        write_marker(env.prepare(vol, dev), b"disk-a")
        env.release(vol, dev)
        header_a = read_header_area(str(dev))
        assert header_a[:DATA] != header_b[:DATA]
        rw = replace(vol, create=False)
        # one ciphertext block of ext4 metadata (the group descriptors, fs block 1): the
        # superblock still reads complete, the mount fails
        _xor(dev, DATA + 4096, 4096)
        with pytest.raises(mount.MountError, match="mounting"):
            env.prepare(rw, dev)
        assert active_status(mapper) == "inactive"  # closed: nothing left to be reused
        # the host swaps in header B and repairs the block: the next call activates from B
        # (whose volume key does not decrypt disk A) or refuses; never A's mapping as B
        _put_header(dev, header_b)
        _xor(dev, DATA + 4096, 4096)
        try:
            p = env.prepare(rw, dev)
        except volume.VolumeRefused as exc:
            assert "no complete ext4" in str(exc)
            assert active_status(mapper) == "inactive"
        else:
            assert p.luks_uuid.replace("-", "") in _dm_uuid(mapper)
            env.release(vol, dev)
        _put_header(dev, header_a)
        p = env.prepare(rw, dev)
        try:
            # the event content the measurer records for this open (agent.measure, the
            # identity the storage layer hands it), read back as a verifier would
            ident = VolumeIdentity(
                vol.name, p.luks_uuid, p.header_sha256, vol.filesystem, False, p.sequence
            )
            content = volume_content(ident.event(VolumeOperation.OPEN))
            event = parse_volume_content(VolumeOperation.OPEN, content)
            assert read_marker(p) == b"disk-a" * 64
            live = _dm_uuid(mapper)
        finally:
            env.release(vol, dev)
    assert live == f"CRYPT-LUKS2-{event.luks_uuid.replace('-', '')}-{mapper}"
    assert live == mapping_record.dm_uuid(event.luks_uuid, mapper)


def test_leftover_mapping_after_a_crash_is_reactivated_from_the_header(
    env: Env, tmp_path: Path
) -> None:
    """Killed with the mapping up and not mounted (SEQ_WRITTEN), then header B swapped in: the
    mapping is closed and activated from B (which cannot decrypt disk A: refused)."""
    vol = make_volume(unique("swapcrash"))
    mapper = volume.mapper_name(vol.name)
    header_b = _genuine_other_header(env, tmp_path, vol)
    with loop_disk(tmp_path, 128 * MIB) as dev:
        write_marker(env.prepare(vol, dev), b"disk-a")
        env.release(vol, dev)
        header_a = read_header_area(str(dev))
        rw = replace(vol, create=False)
        child = env.prepare_in_child(rw, dev, CrashWindow.SEQ_WRITTEN.value)
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        assert active_status(mapper) == "active"
        _put_header(dev, header_b)
        try:
            with pytest.raises(volume.VolumeRefused, match="no complete ext4"):
                env.prepare(rw, dev)
            assert active_status(mapper) == "inactive"
            _put_header(dev, header_a)
            p = env.prepare(rw, dev)
            assert read_marker(p) == b"disk-a" * 64
            assert _dm_uuid(mapper) == mapping_record.dm_uuid(p.luks_uuid, mapper)
        finally:
            env.release(vol, dev)


def test_mounted_mapping_without_a_record_is_not_reused(env: Env, tmp_path: Path) -> None:
    vol = make_volume(unique("norec"))
    with loop_disk(tmp_path, 128 * MIB) as dev:
        p = env.prepare(vol, dev)
        try:
            assert env.prepare(vol, dev).luks_uuid == p.luks_uuid  # the record: kept
            mapping_record.drop(env.runtime_dir, vol.name)
            with pytest.raises(volume.VolumeRefused, match="no record of the header"):
                env.prepare(vol, dev)
            assert mount.is_mounted(p.guest_path)  # in use: left as it is
        finally:
            env.release(vol, dev)


@contextmanager
def _held(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield
    finally:
        os.close(fd)


def _devno(dev: Path) -> str:
    st = dev.stat()
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


TABLE_VARIANTS = {
    # what differs from the contract's table -> the words of the refusal
    "cipher": "cipher aes-cbc-essiv:sha256",
    "offset": "data offset 32776 sectors",
    "device": "backing device",
}


@pytest.mark.parametrize("held", [True, False], ids=["held-open", "closable"])
@pytest.mark.parametrize("variant", list(TABLE_VARIANTS))
def test_live_table_other_than_the_contracts_is_refused(
    env: Env, tmp_path: Path, variant: str, held: bool
) -> None:
    """A `cva_<name>` mapping with the recorded header's dm UUID but another cipher, data offset
    or backing device. Held open (cannot be closed): the live table check refuses it. Closable:
    it is closed and activated again from the validated header."""
    vol = make_volume(unique("table"))
    mapper = volume.mapper_name(vol.name)
    with loop_disk(tmp_path, 128 * MIB) as dev, loop_disk(tmp_path, 128 * MIB) as other:
        p = env.prepare(vol, dev)
        write_marker(p, b"table")
        run(["umount", str(p.guest_path)], timeout=60)
        run(["dmsetup", "remove", mapper], timeout=60)  # the record (complete) stays
        sectors = 128 * MIB // 512 - 32768
        key, cipher, devno, offset = "ab" * 64, "aes-xts-plain64", _devno(dev), 32768
        if variant == "cipher":
            key, cipher = "ab" * 32, "aes-cbc-essiv:sha256"
        elif variant == "offset":
            offset, sectors = 32776, sectors - 8
        else:
            devno = _devno(other)
        table = (
            f"0 {sectors} crypt {cipher} {key} 0 {devno} {offset} "
            "3 no_read_workqueue no_write_workqueue sector_size:4096"
        )
        live_uuid = mapping_record.dm_uuid(p.luks_uuid, mapper)
        run(["dmsetup", "create", mapper, "--uuid", live_uuid, "--table", table], timeout=60)
        try:
            if held:
                with _held(Path("/dev/mapper") / mapper):
                    with pytest.raises(Exception, match="differs from the contract") as info:
                        env.prepare(vol, dev)
                    assert TABLE_VARIANTS[variant] in str(info.value)
                    assert not mount.is_mounted(p.guest_path)
            else:
                again = env.prepare(vol, dev)
                fields = dm_table(mapper)
                assert (fields[3], fields[6], fields[7]) == (
                    "aes-xts-plain64",
                    _devno(dev),
                    "32768",
                )
                assert read_marker(again) == b"table" * 64
        finally:
            env.release(vol, dev)
