"""luks.fs: mkfs argv, blkid parsing (real output), pre-write plans, mkfs on image files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import CvaError
from luks import fs
from luks.volume_plan import fs_size_bytes, needs_grow

DATA = Path(__file__).parent / "data" / "blkid"
MIB = 1 << 20


def test_mkfs_argv() -> None:
    ext = fs.mkfs_argv("ext4", "/dev/mapper/cva-x", integrity=False)
    assert ext[:2] == ["mkfs.ext4", "-q"] and ext[3:5] == ["-b", "4096"]
    assert ext[ext.index("-E") + 1] == "nodiscard" and ext[-2:] == ["--", "/dev/mapper/cva-x"]
    ext_i = fs.mkfs_argv("ext4", "/dev/x", integrity=True)
    assert "lazy_itable_init=0" in ext_i[ext_i.index("-E") + 1]
    xfs = fs.mkfs_argv("xfs", "/dev/x", integrity=True)
    assert "-K" in xfs and "size=4096" in xfs
    with pytest.raises(CvaError):
        fs.mkfs_argv("btrfs", "/dev/x", integrity=False)  # type: ignore[arg-type]
    assert fs.grow_argv("xfs", "/dev/x", "/run/cva/volumes/a") == [
        "xfs_growfs", "--", "/run/cva/volumes/a"
    ]  # fmt: skip


def test_blkid_real_output() -> None:
    assert fs.parse_blkid_export((DATA / "ext4.txt").read_text()).type == "ext4"
    x = fs.parse_blkid_export((DATA / "xfs.txt").read_text())
    assert x.type == "xfs" and x.usage == "filesystem" and len(x.uuid) == 36
    assert fs.parse_blkid_export((DATA / "luks2.txt").read_text()).type == "crypto_LUKS"
    assert fs.parse_blkid_export("junk\nlower=1\n").type == ""


@given(st.text(max_size=300))
def test_blkid_any_text(text: str) -> None:
    fs.parse_blkid_export(text)


def test_prewrite_plans() -> None:
    assert fs.prewrite_ranges(1024 * MIB, "xfs") == ((0, 2 * MIB), (1022 * MIB, 2 * MIB))
    ext = fs.prewrite_ranges(1024 * MIB, "ext4")  # 8 groups of 128 MiB: backups in 1, 3, 5, 7
    assert ext == (
        (0, 2 * MIB), (128 * MIB, 4096), (384 * MIB, 4096), (640 * MIB, 4096),
        (896 * MIB, 4096), (1022 * MIB, 2 * MIB),
    )  # fmt: skip
    assert fs.ext4_backup_groups(50) == (0, 1, 3, 5, 7, 9, 25, 27, 49)
    assert fs.prewrite_ranges(3 * MIB) == ((0, 3 * MIB),)
    assert fs.grow_prewrite_ranges(100 * MIB, 200 * MIB) == ((198 * MIB, 2 * MIB),)
    assert fs.grow_prewrite_ranges(200 * MIB, 201 * MIB) == ((200 * MIB, MIB),)
    assert fs.grow_prewrite_ranges(200 * MIB, 200 * MIB) == ()
    with pytest.raises(CvaError):
        fs.prewrite_ranges(1000)


def test_xfs_minimum_size() -> None:
    with pytest.raises(CvaError, match="xfs needs"):
        fs.check_size("xfs", 100 * MIB)
    fs.check_size("ext4", 100 * MIB)


def _img(tmp_path: Path, size: int) -> Path:
    p = tmp_path / "v.img"
    with p.open("wb") as f:
        f.truncate(size)
    return p


@pytest.mark.parametrize(("kind", "size"), [("ext4", 64 * MIB), ("xfs", 320 * MIB)])
@pytest.mark.parametrize("integrity", [False, True])
def test_make_fs_probe_and_superblock_size(
    tmp_path: Path, kind: fs.FsKind, size: int, integrity: bool
) -> None:
    img = _img(tmp_path, size)
    fs.make_fs(img, kind, integrity=integrity)
    assert fs.probe(img).type == kind
    head = img.read_bytes()[:65536]
    assert fs_size_bytes(kind, head) == size
    assert not needs_grow(fs_size_bytes(kind, head), size)
    with img.open("r+b") as f:
        f.truncate(size + 64 * MIB)
    assert needs_grow(fs_size_bytes(kind, head), size + 64 * MIB)


def test_probe_nothing(tmp_path: Path) -> None:
    assert fs.probe(_img(tmp_path, 8 * MIB)).type == ""


@given(st.binary(max_size=4096))
def test_superblock_parser_any_bytes(data: bytes) -> None:
    for kind in ("ext4", "xfs", "other"):
        v = fs_size_bytes(kind, data)
        assert v is None or v >= 0


@pytest.mark.parametrize("size_mib", [240, 1000, 5000])
def test_prewrite_covers_every_superblock_mke2fs_writes(tmp_path: Path, size_mib: int) -> None:
    img = _img(tmp_path, size_mib * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(img)], check=True)
    out = subprocess.run(["dumpe2fs", str(img)], capture_output=True, text=True, check=True).stdout
    blocks = [int(m) for m in re.findall(r"superblock at (\d+)", out)]
    assert len(blocks) > 1 or size_mib < 200
    ranges = fs.prewrite_ranges(size_mib * MIB, "ext4")
    for b in blocks:
        off = b * 4096
        assert any(o <= off and off + 4096 <= o + n for o, n in ranges), b
