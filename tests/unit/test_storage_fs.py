"""luks.fs: mkfs argv, blkid parsing (real output), pre-write plans, mkfs on image files."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from luks import fs
from luks.errors import StorageError
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
    with pytest.raises(StorageError):
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
    with pytest.raises(StorageError):
        fs.prewrite_ranges(1000)


def test_xfs_minimum_size() -> None:
    with pytest.raises(StorageError, match="xfs needs"):
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


# -- ephemeral volumes: the caller's mkfs options ---------------------------------------------

KATA_OPTS = ("-O", "^has_journal", "-m", "0", "-i", "163840", "-I", "128")


def test_request_argv_merges_every_E_into_one_with_cva_base() -> None:
    argv = fs.ext4_request_argv("/dev/mapper/x", (*KATA_OPTS, "-E", "lazy_itable_init=0"))
    assert argv == [
        "mkfs.ext4", "-q", "-F", "-b", "4096", *KATA_OPTS,
        "-E", "nodiscard,lazy_itable_init=0", "--", "/dev/mapper/x",
    ]  # fmt: skip
    dry = fs.ext4_request_argv("/d", ("-E", "lazy_journal_init", "-E", "lazy_itable_init=1"))
    assert dry[-4:] == ["-E", "nodiscard,lazy_journal_init,lazy_itable_init=1", "--", "/d"]
    assert fs.ext4_request_argv("/d", (), dry_run=True)[:2] == ["mkfs.ext4", "-n"]


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (("-E", "discard"), "discard"),
        (("-b", "1024"), "block size"),
        (("-m",), "pairs"),
    ],
)
def test_request_argv_refusals(extra: tuple[str, ...], why: str) -> None:
    with pytest.raises(fs.FsError, match=why):
        fs.ext4_request_argv("/d", extra)


@pytest.mark.parametrize(
    "extra",
    [
        KATA_OPTS,
        ("-O", "^sparse_super,^resize_inode"),
        ("-O", "sparse_super2"),
        ("-E", "lazy_journal_init"),
        (),
    ],
)
def test_dry_run_names_every_backup_superblock_mke2fs_writes(
    tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """The dry run's list (parsed) is exactly where the real mkfs puts the backups."""
    img = _img(tmp_path, 1200 * MIB)
    dry = subprocess.run(
        fs.ext4_request_argv(str(img), extra, dry_run=True), capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    planned = fs.parse_backup_superblocks(dry.stdout)
    subprocess.run(fs.ext4_request_argv(str(img), extra), check=True)
    out = subprocess.run(["dumpe2fs", str(img)], capture_output=True, text=True, check=True).stdout
    written = tuple(int(m) for m in re.findall(r"Backup superblock at (\d+)", out))
    assert planned == written
    ranges = fs.block_prewrite_ranges(1200 * MIB, planned)
    for b in written:
        assert (b * 4096, 4096) in ranges
    assert (0, fs.PREWRITE_EDGE) in ranges


def test_parse_backup_superblocks_shapes() -> None:
    text = "Superblock backups stored on blocks: \n\t32768, 98304,\n\t163840\n\nAllocating\n"
    assert fs.parse_backup_superblocks(text) == (32768, 98304, 163840)
    assert fs.parse_backup_superblocks("Creating filesystem with 1024 4k blocks\n") == ()
    with pytest.raises(fs.FsError):
        fs.parse_backup_superblocks("Superblock backups stored on blocks: 1, two\n")


@given(st.text(max_size=300))
def test_parse_backup_superblocks_any_text(text: str) -> None:
    try:
        blocks = fs.parse_backup_superblocks(text)
    except StorageError:
        return
    assert all(isinstance(b, int) and b >= 0 for b in blocks)


def test_block_prewrite_ranges_refuse_blocks_beyond_the_device() -> None:
    with pytest.raises(fs.FsError, match="beyond"):
        fs.block_prewrite_ranges(64 * MIB, (1 << 20,))
