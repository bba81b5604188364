"""What `seq` does not detect (issue 21 #3, README "Rollback"): the host keeps the newest 16 MiB
header region and puts back an older data area. The next open writes and records newest seq + 1
-- to a verifier exactly like a normal open -- and mounts the old data. The README promises no
data freshness; this test keeps that sentence true (its counterpart, a replayed header that the
verifier does catch, is test_storage_volume.test_seq_in_the_log_and_a_rolled_back_header)."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import MeasureConfig
from agent.contract import Volume
from agent.measure import Measurer, VolumeIdentity
from evidence.eventlog import parse_log
from evidence.volume_event import DOMAIN, VolumeOperation, parse_volume_content
from luks.volume import PreparedVolume
from tests.guest.storage_support import (
    MIB,
    Env,
    loop_disk,
    make_volume,
    read_marker,
    unique,
    write_marker,
)

if os.environ.get("CVA_IN_GUEST") != "1":  # before any guest-only mark is looked up
    pytest.skip("runs inside the qemu guest (make vm-test)", allow_module_level=True)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.environ.get("CVA_IN_GUEST") != "1", reason="runs inside the guest"),
]

HEADER_REGION = 16 * MIB


class _SoftRegister:
    def __init__(self) -> None:
        self.value = bytes(32)

    def read(self) -> bytes:
        return self.value

    def extend(self, digest: bytes) -> None:
        self.value = hashlib.sha256(self.value + digest).digest()


def _copy_range(src: Path, dst: Path, offset: int) -> None:
    """Bytes from `offset` to the end of `src` into `dst` at the same offset (fsynced)."""
    with src.open("rb") as fin, dst.open("r+b") as fout:
        fin.seek(offset)
        fout.seek(offset)
        shutil.copyfileobj(fin, fout, 4 * MIB)
        fout.flush()
        os.fsync(fout.fileno())


def test_an_older_data_area_under_the_newest_header_is_not_detected(tmp_path: Path) -> None:
    env = Env(tmp_path / "cva")
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
        vol = make_volume(unique("fresh"))
        rw = replace(vol, create=False)

        def open_(v: Volume) -> PreparedVolume:
            p = env.prepare(v, dev)
            ident = VolumeIdentity(
                v.name, p.luks_uuid, p.header_sha256, v.filesystem, False, p.sequence
            )
            measurer.opened(ident, created=p.created)
            return p

        def close(v: Volume) -> None:
            env.release(v, dev)
            measurer.closed(v.name)

        p = open_(vol)
        write_marker(p, b"old-data")
        close(vol)
        old_image = tmp_path / "old.img"  # the host keeps a copy of the disk as it is now
        with old_image.open("wb") as f:
            f.truncate(128 * MIB)
        _copy_range(dev, old_image, HEADER_REGION)
        p = open_(rw)
        assert p.sequence == 2
        write_marker(p, b"new-data")
        close(rw)
        _copy_range(old_image, dev, HEADER_REGION)  # newest header kept, old data put back
        p = open_(rw)
        try:
            assert p.sequence == 3  # newest seq + 1, recorded like any open
            assert read_marker(p) == b"old-data" * 64  # and the data is the old one
        finally:
            close(rw)
    events = [
        parse_volume_content(VolumeOperation(e.operation), e.content)
        for e in parse_log(log_path.read_bytes())
        if e.domain == DOMAIN
    ]
    opened = [e.sequence for e in events if e.operation is not VolumeOperation.CLOSE]
    assert opened == [1, 2, 3]  # strictly increasing: the verifier's seq rule sees nothing
