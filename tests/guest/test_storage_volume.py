"""The storage stack end to end inside the qemu guest (root, real dm-crypt/LVM/ext4/xfs).

Issue 6 items 3-7: create -> write -> release -> reopen (also across a reboot), no plaintext on
the raw disk, wrong key refused without loss, hostile headers refused with the reason, a header
swap between copy and open has no effect, every crash window -> recovery or refusal (never a
format of a volume holding data), integrity on and off, LVM grow online, and a symlink in a
container rootfs cannot redirect the bind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.config import MeasureConfig
from agent.contract import DiskRef
from agent.measure import Measurer, VolumeIdentity
from evidence.eventlog import parse_log
from evidence.volume_event import DOMAIN, VolumeOperation, parse_volume_content
from luks import disk as disk_mod
from luks import lvm, mount, volume
from luks.header import read_header_area
from luks.libcryptsetup import active_status
from luks.run import run, secret_fd
from luks.secret import Secret
from luks.token import derive_keys
from luks.volume_plan import CrashWindow
from tests.guest.storage_support import (
    MIB,
    SECRET,
    WRONG_SECRET,
    Env,
    dm_table,
    loop_disk,
    make_volume,
    raw_contains,
    read_marker,
    unique,
    with_size,
    write_marker,
)

if os.environ.get("CVA_IN_GUEST") != "1":  # before any guest-only mark is looked up
    pytest.skip("runs inside the qemu guest (make vm-test)", allow_module_level=True)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.environ.get("CVA_IN_GUEST") != "1", reason="runs inside the guest"),
]

BOOT = os.environ.get("CVA_VM_BOOT", "1")


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path / "cva")


def _area_hash(dev: Path) -> str:
    return hashlib.sha256(read_header_area(str(dev))).hexdigest()


def _mounted(path: Path) -> bool:
    return mount.is_mounted(path)


# ---- create / reopen ---------------------------------------------------------------------


@pytest.mark.parametrize("integrity", [False, True], ids=["plain", "integrity"])
def test_create_write_release_reopen(env: Env, tmp_path: Path, integrity: bool) -> None:
    marker = f"cva-plaintext-rt-{integrity}-".encode()
    with loop_disk(tmp_path, 256 * MIB) as dev:
        vol = make_volume(unique("rt"), integrity=integrity)
        p = env.prepare(vol, dev)
        try:
            assert p.created and p.guest_path == env.mount_base / vol.name
            table = dm_table(p.mapper_name)
            assert "sector_size:4096" in table and "no_read_workqueue" in table
            if integrity:
                assert "integrity:32:aead" in table
            else:
                assert table[3] == "aes-xts-plain64"
            info = [e for e in mount.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
                    if e.mountpoint == str(p.guest_path)]  # fmt: skip
            assert {"nodev", "nosuid"} <= set(info[0].options)
            write_marker(p, marker)
        finally:
            env.release(vol, dev)
        assert not _mounted(p.guest_path)
        assert active_status(p.mapper_name) == "inactive"
        assert not raw_contains(dev, marker)
        p2 = env.prepare(replace(vol, create=False), dev)
        try:
            assert not p2.created
            assert read_marker(p2) == marker * 64
            # idempotent: a second prepare of a prepared volume changes nothing
            assert env.prepare(vol, dev).guest_path == p2.guest_path
        finally:
            env.release(vol, dev)


def test_read_only_volume(env: Env, tmp_path: Path) -> None:
    with loop_disk(tmp_path, 128 * MIB) as dev:
        vol = make_volume(unique("ro"))
        write_marker(env.prepare(vol, dev), b"ro-data")
        env.release(vol, dev)
        ro = replace(vol, read_only=True, create=False)
        p = env.prepare(ro, dev)
        try:
            assert read_marker(p) == b"ro-data" * 64
            with pytest.raises(OSError):
                (p.guest_path / "new").write_bytes(b"x")
        finally:
            env.release(ro, dev)


def test_blank_with_create_false_refuses_and_writes_nothing(env: Env, tmp_path: Path) -> None:
    with loop_disk(tmp_path, 64 * MIB) as dev:
        vol = make_volume(unique("nocreate"), create=False)
        with pytest.raises(volume.VolumeRefused, match="create = false"):
            env.prepare(vol, dev)
        assert read_header_area(str(dev)) == bytes(16 * MIB)


def test_wiped_header_over_data_is_refused(env: Env, tmp_path: Path) -> None:
    with loop_disk(tmp_path, 128 * MIB) as dev:
        vol = make_volume(unique("wiped"))
        write_marker(env.prepare(vol, dev), b"precious")
        env.release(vol, dev)
        with dev.open("r+b") as f:  # the host zeroes the header region
            f.write(bytes(16 * MIB))
            os.fsync(f.fileno())
        before = hashlib.sha256(dev.read_bytes()).hexdigest()
        with pytest.raises(volume.VolumeRefused, match="not blank"):
            env.prepare(vol, dev)
        assert hashlib.sha256(dev.read_bytes()).hexdigest() == before


# ---- keys and hostile headers ------------------------------------------------------------


def test_wrong_key_refused_then_right_key_opens(env: Env, tmp_path: Path) -> None:
    with loop_disk(tmp_path, 128 * MIB) as dev:
        vol = make_volume(unique("key"))
        write_marker(env.prepare(vol, dev), b"keep-me")
        env.release(vol, dev)
        before = _area_hash(dev)
        with pytest.raises(volume.VolumeRefused, match="MAC"):
            env.prepare(vol, dev, secret=WRONG_SECRET)
        assert _area_hash(dev) == before
        assert active_status(volume.mapper_name(vol.name)) == "inactive"
        p = env.prepare(vol, dev)
        try:
            assert read_marker(p) == b"keep-me" * 64
        finally:
            env.release(vol, dev)


def _cryptsetup_format(dev: Path, *extra: str) -> None:
    run(
        ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--key-file", "-", *extra, str(dev)],
        timeout=120, stdin=b"host-chosen-passphrase",
    )  # fmt: skip


def _plant_cipher_null(dev: Path, vol: object) -> None:
    _cryptsetup_format(dev, "--cipher", "cipher_null-ecb", "--key-size", "0")


def _plant_profile_without_token(dev: Path, vol: object) -> None:
    _cryptsetup_format(
        dev, "--cipher", "aes-xts-plain64", "--key-size", "512", "--sector-size", "4096",
        "--luks2-metadata-size", "16k", "--luks2-keyslots-size", "16352k",
    )  # fmt: skip


def _plant_second_keyslot(dev: Path, vol: object) -> None:
    passphrase, _ = derive_keys(Secret(SECRET), vol.name)  # type: ignore[attr-defined]
    with secret_fd(passphrase) as path:
        fd = int(path.rsplit("/", 1)[1])
        run(
            ["cryptsetup", "luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2",
             "--pbkdf-force-iterations", "1000", "--key-file", path, str(dev), "-"],
            timeout=120, stdin=b"host-second-passphrase", pass_fds=(fd,),
        )  # fmt: skip


@pytest.mark.parametrize(
    ("plant", "reason"),
    [
        (_plant_cipher_null, "cipher"),
        (_plant_profile_without_token, "token"),
        (_plant_second_keyslot, "keyslot"),
    ],
    ids=["cipher-null", "no-cva-token", "second-keyslot"],
)
def test_hostile_header_planted_is_refused_with_reason(
    env: Env, tmp_path: Path, plant: Callable[[Path, object], None], reason: str
) -> None:
    with loop_disk(tmp_path, 128 * MIB) as dev:
        vol = make_volume(unique("hostile"))
        write_marker(env.prepare(vol, dev), b"data")
        env.release(vol, dev)
        plant(dev, vol)
        before = _area_hash(dev)
        with pytest.raises(volume.VolumeRefused) as exc:
            env.prepare(vol, dev)
        assert "not a usable cva volume" in exc.value.message
        assert reason in exc.value.message.lower()
        assert _area_hash(dev) == before  # refused and untouched
        assert active_status(volume.mapper_name(vol.name)) == "inactive"


def test_header_swap_between_copy_and_open_has_no_effect(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with loop_disk(tmp_path, 128 * MIB) as dev, loop_disk(tmp_path, 64 * MIB) as evil:
        vol = make_volume(unique("swap"))
        write_marker(env.prepare(vol, dev), b"swap-data")
        env.release(vol, dev)
        _cryptsetup_format(evil, "--cipher", "cipher_null-ecb", "--key-size", "0")
        hostile = read_header_area(str(evil))
        real_activate = volume._activate
        ciphers: list[str] = []

        def swap_then_activate(*args: object, **kwargs: object) -> None:
            with dev.open("r+b") as f:  # the host swaps the header after cva copied it
                f.write(hostile)
                os.fsync(f.fileno())
            real_activate(*args, **kwargs)  # type: ignore[arg-type]
            ciphers.append(dm_table(str(args[2]))[3])

        monkeypatch.setattr(volume, "_activate", swap_then_activate)
        # the mapping comes from cva's copy, never the swapped header; the read-write open's seq
        # write then sees the disk no longer holds that copy: refused, closed, nothing written
        with pytest.raises(volume.VolumeRefused, match="changed while cva was using its copy"):
            env.prepare(vol, dev)
        monkeypatch.undo()
        assert ciphers == ["aes-xts-plain64"]
        assert active_status(volume.mapper_name(vol.name)) == "inactive"
        assert read_header_area(str(dev)) == hostile
        with pytest.raises(volume.VolumeRefused, match="cipher"):
            env.prepare(vol, dev)


# ---- crash windows -----------------------------------------------------------------------

CREATE_WINDOWS = [
    CrashWindow.PV_CREATED,
    CrashWindow.VG_CREATED,
    CrashWindow.LV_CREATED,
    CrashWindow.LUKS_FORMATTED,
    CrashWindow.KEYSLOT_ADDED,
    CrashWindow.INITIALIZING_WRITTEN,
    CrashWindow.OPENED_INITIALIZING,
    CrashWindow.MKFS_DONE,
    CrashWindow.READY_HALF_WRITTEN,
    CrashWindow.READY_WRITTEN,
    CrashWindow.MOUNTED,
]
# LUKS_FORMATTED / KEYSLOT_ADDED: libcryptsetup formats into a memfd, the disk is still blank
# and the rerun creates again; INITIALIZING_WRITTEN / OPENED_INITIALIZING: the raw data area
# is proven all zeros, so the rerun may finish the format; READY_HALF_WRITTEN: each header
# copy alone is valid and MAC'd, the initializing one is adopted, the filesystem is complete
REFUSING_WINDOWS: set[CrashWindow] = set()  # issue 14 item 2: none refuses without integrity


@pytest.mark.parametrize("window", CREATE_WINDOWS, ids=[w.value for w in CREATE_WINDOWS])
def test_crash_in_create_path(env: Env, tmp_path: Path, window: CrashWindow) -> None:
    with loop_disk(tmp_path, 256 * MIB) as dev:
        vol = make_volume(unique("crash"), lvm=(unique("vg"), "data", 128 * MIB))
        assert vol.lvm is not None
        child = env.prepare_in_child(vol, dev, window.value)
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        try:
            lv = lvm.dm_path(vol.lvm.vg, vol.lvm.lv)
            if window in REFUSING_WINDOWS:
                before = _area_hash(lv)
                with pytest.raises(volume.VolumeRefused, match="not a usable cva volume"):
                    env.prepare(vol, dev)
                assert _area_hash(lv) == before
                return
            p = env.prepare(vol, dev)
            write_marker(p, b"after-crash")
            env.release(vol, dev)
            p = env.prepare(replace(vol, create=False), dev)
            assert read_marker(p) == b"after-crash" * 64
        finally:
            env.release(vol, dev)


# With integrity: before the header is on the disk, the dm-integrity superblock and journal
# already are; the rerun recognises exactly a fresh format's bytes (luks.integrity_fresh) and
# creates again; after mkfs the filesystem is complete and only marked ready
INTEGRITY_WINDOWS = [
    CrashWindow.LUKS_FORMATTED,
    CrashWindow.KEYSLOT_ADDED,
    CrashWindow.MKFS_DONE,
    CrashWindow.READY_HALF_WRITTEN,
]


@pytest.mark.parametrize("window", INTEGRITY_WINDOWS, ids=[w.value for w in INTEGRITY_WINDOWS])
def test_crash_in_create_path_with_integrity(env: Env, tmp_path: Path, window: CrashWindow) -> None:
    with loop_disk(tmp_path, 256 * MIB) as dev:
        vol = make_volume(unique("icrash"), lvm=(unique("vg"), "data", 128 * MIB), integrity=True)
        child = env.prepare_in_child(vol, dev, window.value)
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        try:
            p = env.prepare(vol, dev)
            write_marker(p, b"after-icrash")
            env.release(vol, dev)
            p = env.prepare(replace(vol, create=False), dev)
            assert read_marker(p) == b"after-icrash" * 64
        finally:
            env.release(vol, dev)


SEQ_WINDOWS = [CrashWindow.SEQ_HALF_WRITTEN, CrashWindow.SEQ_WRITTEN]


@pytest.mark.parametrize("window", SEQ_WINDOWS, ids=[w.value for w in SEQ_WINDOWS])
def test_crash_in_the_seq_write_of_an_open(env: Env, tmp_path: Path, window: CrashWindow) -> None:
    """A read-write open writes seq + 1 (both copies) before the mount; a crash there."""
    with loop_disk(tmp_path, 128 * MIB) as dev:
        vol = make_volume(unique("seqcrash"))
        write_marker(env.prepare(vol, dev), b"seq-data")
        env.release(vol, dev)
        reopen = replace(vol, create=False)
        child = env.prepare_in_child(reopen, dev, window.value)
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        try:
            # SEQ_HALF_WRITTEN: the copies differ only in the token (seq 2 in the secondary,
            # 1 in the primary), each verifies alone: the primary is adopted and the open
            # writes seq 2 again. SEQ_WRITTEN: seq 2 is on disk but the mapping's record is
            # incomplete: it is closed and the open writes seq 3 (a gap, never a repeat)
            p = env.prepare(reopen, dev)
            assert p.sequence == (2 if window is CrashWindow.SEQ_HALF_WRITTEN else 3)
            assert read_marker(p) == b"seq-data" * 64
        finally:
            env.release(vol, dev)


@pytest.mark.parametrize("where", ["superblock-flags", "journal", "after-journal"])
def test_integrity_format_window_with_anything_else_is_refused(
    env: Env, tmp_path: Path, where: str
) -> None:
    """The LUKS_FORMATTED window with integrity, then one byte changed where a fresh format
    would not have it: refused, one line saying what an operator can do, nothing written."""
    with loop_disk(tmp_path, 256 * MIB) as dev:
        vol = make_volume(unique("iwin"), integrity=True)
        child = env.prepare_in_child(vol, dev, CrashWindow.LUKS_FORMATTED.value)
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        offset = {"superblock-flags": 16 * MIB + 24, "journal": 16 * MIB + 8192 + 100,
                  "after-journal": 200 * MIB}[where]  # fmt: skip
        _xor_range(dev, offset, 1)
        before = _device_hash(dev)
        with pytest.raises(volume.VolumeRefused) as exc:
            env.prepare(vol, dev)
        text = exc.value.message
        assert "not blank" in text and "blkdiscard" in text and "\n" not in text, text
        assert _device_hash(dev) == before


# ---- the blankness proof (issue 14 item 1) -----------------------------------------------

DATA_PLACES = {"first-block": 0, "64MiB": 64 * MIB, "last-sector": -512}


@pytest.mark.parametrize("where", list(DATA_PLACES), ids=list(DATA_PLACES))
@pytest.mark.parametrize("layout", ["disk", "lvm"])
def test_data_anywhere_is_refused_with_create_true(
    env: Env, tmp_path: Path, where: str, layout: str
) -> None:
    """A disk holding data anywhere (no signature: random bytes in the first block, at 64 MiB,
    in the very last sector) is refused with create = true and left untouched; zeroed, the same
    disk formats. The sampled check alone accepted data from 64 MiB (DESIGN §4 before)."""
    size = 256 * MIB
    with loop_disk(tmp_path, size) as dev:
        lvm_spec = (unique("vg"), "data", 128 * MIB) if layout == "lvm" else None
        vol = make_volume(unique("anywhere"), lvm=lvm_spec)
        offset = DATA_PLACES[where] % size
        blob = os.urandom(512)
        with dev.open("r+b") as f:
            f.seek(offset)
            f.write(blob)
            os.fsync(f.fileno())
        before = _device_hash(dev)
        with pytest.raises(volume.VolumeRefused) as exc:
            env.prepare(vol, dev)
        text = exc.value.message
        assert "\n" not in text and ("not blank" in text or "not a usable" in text), text
        assert _device_hash(dev) == before, "a refused disk is left untouched"
        assert active_status(volume.mapper_name(vol.name)) == "inactive"
        with dev.open("r+b") as f:
            f.seek(offset)
            f.write(bytes(512))
            os.fsync(f.fileno())
        p = env.prepare(vol, dev)
        try:
            assert p.guest_path.is_dir()
            write_marker(p, b"blank-then-formatted")
        finally:
            env.release(vol, dev)


def test_cli_blank_on_a_device(tmp_path: Path) -> None:
    """`cva luks blank` on a real block device: exit 0 and every byte counted; data in the
    very last sector: exit 1 with its offset."""
    size = 96 * MIB
    with loop_disk(tmp_path, size) as dev:
        cmd = [sys.executable, "-m", "agent", "luks", "blank", str(dev)]
        out = subprocess.run(cmd, capture_output=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["blank"] is True and doc["bytes_scanned"] == size
        with dev.open("r+b") as f:
            f.seek(size - 1)
            f.write(b"\x01")
            os.fsync(f.fileno())
        out = subprocess.run(cmd, capture_output=True, timeout=300, check=False)
        assert out.returncode == 1, out.stderr
        assert json.loads(out.stdout)["first_nonzero_offset"] == size - 1


def test_crash_windows_all_covered() -> None:
    from tests.guest.test_day_two import ROTATION_WINDOWS  # key rotation (luks.rotation)
    from tests.guest.test_grow import GROW_WINDOWS  # online grow (luks.grow)

    tested = set(CREATE_WINDOWS) | set(SEQ_WINDOWS) | {CrashWindow.LV_EXTENDED}
    assert tested | set(ROTATION_WINDOWS) | set(GROW_WINDOWS) == set(CrashWindow)


class _SoftRegister:
    """A SHA-256 register in memory (the guest's PCR 23 belongs to other tests)."""

    def __init__(self) -> None:
        self.value = bytes(32)

    def read(self) -> bytes:
        return self.value

    def extend(self, digest: bytes) -> None:
        self.value = hashlib.sha256(self.value + digest).digest()


def test_seq_in_the_log_and_a_rolled_back_header(env: Env, tmp_path: Path) -> None:
    """create -> seq 1, two read-write opens -> 2, 3, a read-only open writes nothing and
    records 3; the host puts back the header from before the first open: the next open records
    seq 2, below the 3 already in the log (what a verifier detects)."""
    register = _SoftRegister()
    log_path = tmp_path / "eventlog"
    measurer = Measurer(
        MeasureConfig(sink="tpm"),
        log_path=log_path,
        state_path=tmp_path / "measured.json",
        register_factory=lambda _tcti, _pcr: register,
        tee="tpm",
    )
    with loop_disk(tmp_path, 128 * MIB) as dev:
        vol = make_volume(unique("seq"))

        def open_(v: Any) -> volume.PreparedVolume:
            p = env.prepare(v, dev)
            ident = VolumeIdentity(
                v.name, p.luks_uuid, p.header_sha256, v.filesystem, v.read_only, p.sequence
            )
            measurer.opened(ident, created=p.created)
            return p

        def close(v: Any) -> None:
            env.release(v, dev)
            measurer.closed(v.name)

        p = open_(vol)
        assert (p.created, p.sequence) == (True, 1)
        write_marker(p, b"seq-log")
        close(vol)
        old_header = read_header_area(str(dev))  # a copy the host keeps (seq 1)
        rw = replace(vol, create=False)
        for expected in (2, 3):
            assert open_(rw).sequence == expected
            close(rw)
        before = read_header_area(str(dev))
        ro = replace(vol, create=False, read_only=True)
        assert open_(ro).sequence == 3
        assert read_header_area(str(dev)) == before  # a read-only open writes nothing
        close(ro)
        with dev.open("r+b") as f:  # the host rolls the header back
            f.write(old_header)
            f.flush()
            os.fsync(f.fileno())
        p = open_(rw)
        try:
            assert p.sequence == 2
            assert read_marker(p) == b"seq-log" * 64  # the data is there: only seq tells
        finally:
            close(rw)
    events = [
        parse_volume_content(VolumeOperation(e.operation), e.content)
        for e in parse_log(log_path.read_bytes())
        if e.domain == DOMAIN
    ]
    opens = [
        (e.operation.value, e.sequence, e.read_only)
        for e in events
        if e.operation is not VolumeOperation.CLOSE
    ]
    assert opens == [
        ("volume-create", 1, False),
        ("volume-open", 2, False),
        ("volume-open", 3, False),
        ("volume-open", 3, True),
        ("volume-open", 2, False),
    ]
    closes = [e.sequence for e in events if e.operation is VolumeOperation.CLOSE]
    assert closes == [1, 2, 3, 3, 2]
    assert register.value == _replay(log_path)
    # the verifier's rule: a read-write open must be above every seq seen before it
    seen = 0
    rolled_back = []
    for e in events:
        if e.operation is not VolumeOperation.CLOSE and not e.read_only:
            assert e.sequence is not None
            if e.sequence <= seen:
                rolled_back.append(e.sequence)
            seen = max(seen, e.sequence)
    assert rolled_back == [2]


def _replay(log_path: Path) -> bytes:
    value = bytes(32)
    for e in parse_log(log_path.read_bytes()):
        value = hashlib.sha256(value + e.digest).digest()
    return value


def test_crash_while_reopening_or_growing_keeps_data(env: Env, tmp_path: Path) -> None:
    with loop_disk(tmp_path, 512 * MIB) as dev:
        vol = make_volume(unique("regrow"), lvm=(unique("vg"), "data", 128 * MIB))
        write_marker(env.prepare(vol, dev), b"old-data")
        env.release(vol, dev)
        try:
            child = env.prepare_in_child(vol, dev, CrashWindow.MOUNTED.value)
            assert child.returncode == -signal.SIGKILL, child.stderr.decode()
            bigger = with_size(vol, 256 * MIB)
            child = env.prepare_in_child(bigger, dev, CrashWindow.LV_EXTENDED.value)
            assert child.returncode == -signal.SIGKILL, child.stderr.decode()
            p = env.prepare(bigger, dev)
            assert read_marker(p) == b"old-data" * 64
            st = os.statvfs(p.guest_path)
            assert st.f_blocks * st.f_frsize > 200 * MIB
        finally:
            env.release(vol, dev)


def test_replayed_initializing_header_does_not_reformat(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MAC does not cover the seqid: the host can put back a genuine older header that
    still says "initializing". cva must find the filesystem and keep the data."""
    with loop_disk(tmp_path, 128 * MIB) as dev:
        vol = make_volume(unique("replay"))
        captured: list[bytes] = []

        def hook(window: CrashWindow) -> None:
            if window == CrashWindow.INITIALIZING_WRITTEN:
                captured.append(read_header_area(str(dev)))

        monkeypatch.setattr(volume, "crash_hook", hook)
        p = env.prepare(vol, dev)
        monkeypatch.setattr(volume, "crash_hook", None)
        write_marker(p, b"not-to-be-formatted")
        env.release(vol, dev)
        with dev.open("r+b") as f:
            f.write(captured[0])
            os.fsync(f.fileno())
        p = env.prepare(vol, dev)
        try:
            assert read_marker(p) == b"not-to-be-formatted" * 64
        finally:
            env.release(vol, dev)


def _xor_range(dev: Path, offset: int, length: int) -> None:
    with dev.open("r+b") as f:
        f.seek(offset)
        data = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
        f.flush()
        os.fsync(f.fileno())


def _device_hash(dev: Path) -> str:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    digest = hashlib.sha256()
    with dev.open("rb") as f:
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("integrity", [False, True], ids=["plain", "integrity"])
def test_replayed_initializing_header_over_damaged_data_is_refused(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, integrity: bool
) -> None:
    """Issue 13 item 3: the host keeps the genuine header from the creation window, writes it
    back later and damages the first data block (garbage without integrity, EIO with it). cva
    must refuse with create = false AND create = true, format nothing, and keep the data."""
    with loop_disk(tmp_path, 128 * MIB) as dev:
        vol = make_volume(unique("replay"), integrity=integrity)
        captured: list[bytes] = []

        def hook(window: CrashWindow) -> None:
            if window == CrashWindow.INITIALIZING_WRITTEN:
                captured.append(read_header_area(str(dev)))

        monkeypatch.setattr(volume, "crash_hook", hook)
        p = env.prepare(vol, dev)
        monkeypatch.setattr(volume, "crash_hook", None)
        write_marker(p, b"replay-keep-me")
        journal = 0
        if integrity:  # dm-integrity reports its superblock + journal size in the table
            table = run(["dmsetup", "table", p.mapper_name + "_dif"], timeout=30).text
            journal = int(re.search(r"journal_sectors:(\d+)", table)[1]) * 512  # type: ignore[index]
        env.release(vol, dev)
        current = read_header_area(str(dev))
        with dev.open("r+b") as f:  # the host puts the old "initializing" header back
            f.write(captured[0])
            os.fsync(f.fileno())
        # ... and damages the first data block: garbage through dm-crypt, or (integrity) the
        # first data sectors and their tags behind dm-integrity's superblock, read as EIO
        # (behind the superblock and journal: the first area's tags and data sectors)
        damaged = (16 * MIB, 4096) if not integrity else (16 * MIB + 4096 + journal, 4 * MIB)
        _xor_range(dev, *damaged)
        before = _device_hash(dev) if not integrity else _area_hash(dev)
        for create in (False, True):
            with pytest.raises(volume.VolumeRefused) as exc:
                env.prepare(replace(vol, create=create), dev)
            text = exc.value.message
            assert "initializing-needs-blank-data" in text and "blkdiscard" in text, text
            if not create:
                assert "create = false" in text or "cannot be read" in text, text
            assert active_status(volume.mapper_name(vol.name)) == "inactive"
            # nothing formatted, nothing written (dm-integrity may touch its own journal)
            assert (_device_hash(dev) if not integrity else _area_hash(dev)) == before
        # the data is still there: undo the host's changes and open it
        _xor_range(dev, *damaged)
        with dev.open("r+b") as f:
            f.write(current)
            os.fsync(f.fileno())
        p = env.prepare(replace(vol, create=False), dev)
        try:
            assert read_marker(p) == b"replay-keep-me" * 64
        finally:
            env.release(vol, dev)


# ---- LVM: only linear LVs ----------------------------------------------------------------


def _lvm(disk: Path, *args: str, extra_config: str = "") -> None:
    run(["lvm", args[0], "--config", lvm.lvm_config(str(disk.resolve())) + extra_config,
         *args[1:]], timeout=120)  # fmt: skip


NO_THIN_CHECK = ' global { thin_check_executable="" }'


def _make_thin(disk: Path, vg: str) -> None:
    _lvm(disk, "lvcreate", "--type", "thin-pool", "-L", "96m", "-n", "pool", vg,
         extra_config=NO_THIN_CHECK)  # fmt: skip
    _lvm(disk, "lvcreate", "--type", "thin", "-V", "64m", "--thinpool", "pool", "-n", "data",
         vg, extra_config=NO_THIN_CHECK)  # fmt: skip


def _make_zero(disk: Path, vg: str) -> None:
    _lvm(disk, "lvcreate", "--type", "zero", "-L", "64m", "-n", "data", vg)


@pytest.fixture
def no_lvm_autoactivation() -> Iterator[None]:
    """LVM event autoactivation off while the test runs (what README asks of an image): the
    guest image keeps it on, and udev would bring a deactivated VG up again behind the test."""
    local = Path("/etc/lvm/lvmlocal.conf")
    old = local.read_text() if local.exists() else None
    local.write_text((old or "") + "\nactivation {\n    event_activation = 0\n}\n")
    try:
        yield
    finally:
        if old is None:
            local.unlink()
        else:
            local.write_text(old)


@pytest.mark.parametrize("kind", ["thin", "zero"])
@pytest.mark.usefixtures("no_lvm_autoactivation")
def test_lv_that_is_not_linear_is_refused_before_activation(
    env: Env, tmp_path: Path, kind: str
) -> None:
    with loop_disk(tmp_path, 256 * MIB) as dev:
        vg = unique("vg")
        _lvm(dev, "pvcreate", "--", str(dev))
        _lvm(dev, "vgcreate", "--", vg, str(dev))
        try:
            try:
                (_make_thin if kind == "thin" else _make_zero)(dev, vg)
            except Exception as exc:  # a guest without the dm target
                if kind == "zero":
                    raise
                pytest.skip(f"cannot make a {kind} LV in this guest: {exc}")
            # udev's event-based LVM autoactivation of the new PV must be over before the VG is
            # deactivated, or it can bring the LVs up again behind the test's back
            subprocess.run(["udevadm", "settle", "--timeout=60"], timeout=90, check=False)
            _lvm(dev, "vgchange", "--activate", "n", "--", vg, extra_config=NO_THIN_CHECK)
            subprocess.run(["udevadm", "settle", "--timeout=60"], timeout=90, check=False)
            before = lvm.read_state(str(dev.resolve()))
            assert [lv.active for lv in before.lvs] == [False] * len(before.lvs), "setup"
            vol = make_volume(unique("nonlinear"), lvm=(vg, "data", 64 * MIB))
            with pytest.raises(volume.VolumeRefused) as exc_info:
                env.prepare(vol, dev)
            text = exc_info.value.message
            assert "lvm-linear-only" in text and f"'{kind}'" in text, text
            state = lvm.read_state(str(dev.resolve()))
            assert [lv.active for lv in state.lvs] == [False] * len(state.lvs)  # not activated
        finally:
            _lvm(dev, "vgchange", "--activate", "n", "--", vg, extra_config=NO_THIN_CHECK)


# ---- LVM grow ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filesystem", "integrity", "small", "big"),
    [("ext4", False, 128, 256), ("xfs", False, 320, 480), ("ext4", True, 128, 256)],
    ids=["ext4", "xfs", "ext4-integrity"],
)
def test_lvm_grow_online(
    env: Env, tmp_path: Path, filesystem: str, integrity: bool, small: int, big: int
) -> None:
    with loop_disk(tmp_path, 1024 * MIB) as dev:
        vol = make_volume(
            unique("grow"),
            lvm=(unique("vg"), "data", small * MIB),
            filesystem=filesystem,
            integrity=integrity,
        )
        p = env.prepare(vol, dev)
        try:
            write_marker(p, b"grow-data")
            before = os.statvfs(p.guest_path)
            p2 = env.prepare(with_size(vol, big * MIB), dev)  # while mounted: online
            after = os.statvfs(p2.guest_path)
            grown = (after.f_blocks - before.f_blocks) * after.f_frsize
            if integrity:  # libcryptsetup 2.6 cannot resize dm-integrity: size kept, no error
                assert grown == 0
            else:
                assert grown >= (big - small - 24) * MIB
            assert read_marker(p2) == b"grow-data" * 64
            env.release(vol, dev)
            p3 = env.prepare(with_size(vol, big * MIB), dev)  # reopen after the grow
            assert read_marker(p3) == b"grow-data" * 64
        finally:
            env.release(vol, dev)


# ---- binds into a container rootfs -------------------------------------------------------


def test_symlink_in_container_rootfs_does_not_redirect_bind(env: Env, tmp_path: Path) -> None:
    rootfs = tmp_path / "container-rootfs"
    rootfs.mkdir()
    (rootfs / "data").symlink_to("/etc")  # an image plants: /data -> /etc
    (rootfs / "up").symlink_to("../../../../../../..")
    with loop_disk(tmp_path, 64 * MIB) as dev:
        vol = make_volume(unique("bind"))
        p = env.prepare(vol, dev)
        write_marker(p, b"bound")
        binds = []
        try:
            where = volume.bind_volume(p, rootfs, "/data", read_only=False)
            binds.append((rootfs, "/data"))
            assert where == rootfs / "etc"
            assert (rootfs / "etc" / "marker").read_bytes() == b"bound" * 64
            assert not Path("/etc/marker").exists() and not mount.is_mounted(Path("/etc"))
            where2 = volume.bind_volume(p, rootfs, "/up/srv/x", read_only=True)
            binds.append((rootfs, "/up/srv/x"))
            assert where2 == rootfs / "srv" / "x" and not Path("/srv/x").exists()
        finally:
            volume.release_volume(
                vol, disk=dev, mount_base=env.mount_base, runtime_dir=env.runtime_dir, binds=binds
            )
        assert not mount.is_mounted(rootfs / "etc")


# ---- the harness' virtio disks, across a reboot ------------------------------------------


@pytest.mark.skipif(BOOT != "1", reason="first boot only")
def test_virtio_disk_create_boot1(
    env: Env, blank_disk: Path, host_never_sees: Callable[[Path | str, bytes], None],
    boot_state: Any,
) -> None:  # fmt: skip
    serial = blank_disk.name.removeprefix("virtio-")
    dev = disk_mod.wait_for_disk(DiskRef("serial", serial), 30)
    assert dev.resolve() == blank_disk.resolve()
    marker = f"cva-reboot-plaintext-{uuid.uuid4().hex}".encode()
    host_never_sees(serial, marker)
    vol = make_volume("reboot", lvm=("cvareboot", "data", 128 * MIB))
    p = env.prepare(vol, dev)
    try:
        write_marker(p, marker)
    finally:
        env.release(vol, dev)
    boot_state.save("storage-reboot", {"serial": serial, "marker": marker.decode()})


@pytest.mark.boot2
@pytest.mark.skipif(BOOT != "2", reason="second boot only")
def test_virtio_disk_reopen_boot2(env: Env, boot_state: Any) -> None:
    state = boot_state.load("storage-reboot")
    dev = disk_mod.wait_for_disk(DiskRef("serial", state["serial"]), 30)
    vol = make_volume("reboot", lvm=("cvareboot", "data", 128 * MIB), create=False)
    p = env.prepare(vol, dev)
    try:
        assert read_marker(p) == state["marker"].encode() * 64
    finally:
        env.release(vol, dev)


def test_xfs_minimum_matches_the_contract_rule(tmp_path: Path) -> None:
    """Issue 14 item 5: the contract refuses xfs LVs below 316M (300 MiB of filesystem behind
    the 16 MiB header) because mkfs.xfs (cva's options) refuses less than 300 MiB here."""
    from agent.contract import XFS_MIN_BYTES

    argv = ["mkfs.xfs", "-q", "-f", "-K", "-b", "size=4096", "-s", "size=4096", "--"]
    with loop_disk(tmp_path, XFS_MIN_BYTES - 4096) as small:
        below = run([*argv, str(small)], timeout=120, check=False)
    with loop_disk(tmp_path, XFS_MIN_BYTES) as exact:
        at = run([*argv, str(exact)], timeout=120, check=False)
    assert below.returncode != 0, below.text
    assert at.returncode == 0, at.text


def _aead_lines() -> list[str]:
    return [line for line in run(["dmesg"], timeout=30).text.splitlines() if "AEAD ERROR" in line]


@pytest.mark.parametrize(
    ("filesystem", "layout"), [("ext4", "disk"), ("xfs", "disk"), ("ext4", "lvm")]
)
def test_no_integrity_aead_errors_on_create_reopen_release(
    env: Env, tmp_path: Path, filesystem: str, layout: str
) -> None:
    """Issue 14 item 3: with integrity, cva's own create, reopen and release paths leave no
    "INTEGRITY AEAD ERROR" line in the kernel log (so such a line means tampering); also on
    an LV (issue 21 item 5)."""
    with loop_disk(tmp_path, 512 * MIB) as dev:
        lvm_spec = (unique("vg"), "data", 256 * MIB) if layout == "lvm" else None
        vol = make_volume(unique("aead"), integrity=True, filesystem=filesystem, lvm=lvm_spec)
        seen: dict[str, list[str]] = {}
        start = len(_aead_lines())

        def step(name: str) -> None:
            nonlocal start
            run(["udevadm", "settle", "--timeout=30"], timeout=60, check=False)
            lines = _aead_lines()
            seen[name] = lines[start:]
            start = len(lines)

        p = env.prepare(vol, dev)
        step("create")
        write_marker(p, b"aead-quiet")
        step("write")
        env.release(vol, dev)
        step("release")
        p = env.prepare(replace(vol, create=False), dev)
        step("reopen")
        assert read_marker(p) == b"aead-quiet" * 64
        env.release(vol, dev)
        step("release again")
        where = {k: (len(v), sorted({line.rsplit("sector", 1)[-1].strip() for line in v}))
                 for k, v in seen.items() if v}  # fmt: skip
        assert not where, f"AEAD error lines per step (count, sectors): {where}"
