"""luks.integrity_fresh: the comparison with a fresh integrity format (only the salt may
differ) and the written extent of a sparse scratch file."""

from __future__ import annotations

import os
from pathlib import Path

from luks import integrity_fresh as fi

MIB = 1 << 20


def _fresh() -> bytes:
    sb = bytearray(4096)
    sb[0:8] = fi.SB_MAGIC
    sb[12:16] = (7).to_bytes(4, "little")
    sb[48:64] = os.urandom(16)
    return bytes(sb) + b"\xff" * 8192


def test_only_the_salt_may_differ() -> None:
    fresh = _fresh()
    other_salt = bytearray(fresh)
    other_salt[48:64] = os.urandom(16)
    assert fi.matches_fresh(bytes(other_salt), fresh)
    for offset in (0, 12, 24, 47, 64, 4096, len(fresh) - 1):
        changed = bytearray(fresh)
        changed[offset] ^= 1
        assert not fi.matches_fresh(bytes(changed), fresh), offset
    assert not fi.matches_fresh(fresh[:-1], fresh)
    assert not fi.matches_fresh(bytes(len(fresh)), bytes(len(fresh)))  # no magic: never fresh


def test_written_extent_of_a_sparse_file(tmp_path: Path) -> None:
    img = tmp_path / "scratch.img"
    fd = os.open(img, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 64 * MIB)
        assert fi.written_extent(fd, 16 * MIB, 64 * MIB) == 16 * MIB  # nothing written
        os.pwrite(fd, b"x" * 4096, 16 * MIB)
        os.pwrite(fd, b"y" * 4096, 16 * MIB + 2 * MIB)
        end = fi.written_extent(fd, 16 * MIB, 64 * MIB)
        assert 16 * MIB + 2 * MIB + 4096 <= end <= 19 * MIB  # file systems round extents up
    finally:
        os.close(fd)
