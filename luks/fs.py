"""Filesystems on an opened cva volume: make, probe, grow (DESIGN §7).

- ext4 with 4096-byte blocks; xfs with 4096-byte blocks and sectors. Never discard (`nodiscard`,
  `-K`): discards on dm-crypt leak the used-block map to the host.
- Integrity volumes are formatted without a wipe (a full wipe writes every tag and takes
  minutes). Reading a block that was never written then fails with EILSEQ, so cva pre-writes the
  blocks mkfs (and a later grow) reads — the first and last 2 MiB of the mapped device — and turns
  ext4's lazy inode-table/journal init off so the kernel never reads an unwritten table later.
- Probing is `blkid -p -o export` parsed as KEY=VALUE lines.

The argv builders, the blkid parser and the pre-write plan are pure and unit-tested against real
tool output; the rest is a thin shell over `luks.run`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from luks.errors import StorageError
from luks.run import run

FsKind = Literal["ext4", "xfs"]
MIB = 1024 * 1024
PREWRITE_EDGE = 2 * MIB  # covers every probe offset of libblkid near the start and end
MKFS_TIMEOUT = 600.0
PROBE_TIMEOUT = 30.0
XFS_MIN_BYTES = 300 * MIB
EXT4_BLOCK = 4096
EXT4_BLOCKS_PER_GROUP = 8 * EXT4_BLOCK  # one block bitmap block covers 32768 blocks


class FsError(StorageError):
    """A filesystem step failed or found something it must not touch."""


@dataclass(frozen=True)
class FsProbe:
    """What blkid found on a device (type "" = nothing)."""

    type: str
    uuid: str
    usage: str


def ext4_request_argv(device: str, extra: tuple[str, ...], *, dry_run: bool = False) -> list[str]:
    """mkfs.ext4 for an ephemeral volume: cva's base (`-F -b 4096`, `-E nodiscard`) plus the
    caller's allow-listed `-X value` pairs (agent.securemount.decisions). Every `-E` is merged into
    one (mke2fs keeps only the last), the caller's value winning for a key it sets; `-b` other than
    4096 is refused (the dm-crypt sector is 4096). `dry_run` = `-n` without `-q`: mke2fs then
    prints where it would put the backup superblocks (`parse_backup_superblocks`)."""
    if len(extra) % 2:
        raise FsError("mkfs options must be '-X value' pairs")
    plain: list[str] = []
    extended: dict[str, str] = {"nodiscard": ""}
    for flag, arg in zip(extra[::2], extra[1::2], strict=True):
        if flag == "-E":
            for item in arg.split(","):
                name, sep, value = item.partition("=")
                if name == "discard":
                    raise FsError("mkfs discard is not allowed: discards leak the block map")
                extended[name] = sep + value
        elif flag == "-b":
            if arg != str(EXT4_BLOCK):
                raise FsError(f"ext4 block size {arg} is not allowed on a 4096-byte-sector volume")
        else:
            plain.extend((flag, arg))
    opts = ",".join(name + value for name, value in extended.items())
    head = ["mkfs.ext4", "-n"] if dry_run else ["mkfs.ext4", "-q"]
    return [*head, "-F", "-b", str(EXT4_BLOCK), *plain, "-E", opts, "--", device]


def parse_backup_superblocks(text: str) -> tuple[int, ...]:
    """Block numbers from mke2fs' "Superblock backups stored on blocks:" paragraph ([] if none).

    The numbers follow the heading, comma separated, possibly over several indented lines,
    up to the next blank line. Anything else in the paragraph is an error (FsError).
    """
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("Superblock backups stored on blocks:"):
            rest = line.split(":", 1)[1]
            chunk = [rest]
            for more in lines[i + 1 :]:
                if not more.strip():
                    break
                chunk.append(more)
            numbers: list[int] = []
            for token in re.split(r"[,\s]+", ",".join(chunk).strip(", \t")):
                if not token:
                    continue
                if not token.isdigit() or len(token) > 20:
                    raise FsError(
                        f"unexpected mke2fs output near the backup superblocks: {token!r}"
                    )
                numbers.append(int(token))
            return tuple(numbers)
    return ()


def block_prewrite_ranges(
    size_bytes: int, blocks: tuple[int, ...], block_bytes: int = EXT4_BLOCK
) -> tuple[tuple[int, int], ...]:
    """The 2 MiB edges plus one block at each of `blocks` (mke2fs' backup superblocks)."""
    ranges = set(prewrite_ranges(size_bytes, "xfs"))  # the edges only
    for block in blocks:
        off = block * block_bytes
        if off + block_bytes > size_bytes:
            raise FsError(f"backup superblock block {block} lies beyond the device")
        ranges.add((off, block_bytes))
    return tuple(sorted(ranges))


def make_ext4_for_request(
    device: Path, extra: tuple[str, ...], *, integrity: bool, timeout: float = MKFS_TIMEOUT
) -> None:
    """mkfs.ext4 with the caller's options on a fresh ephemeral volume. With integrity the
    blocks mke2fs reads are pre-written first: the edges, then (learnt from a dry run with the
    very same options) every backup superblock block."""
    size = device_size(device)
    if integrity:
        write_zeros(device, block_prewrite_ranges(size, ()))
        dry = run(ext4_request_argv(str(device), extra, dry_run=True), timeout=timeout)
        backups = parse_backup_superblocks(dry.text)
        write_zeros(device, block_prewrite_ranges(size, backups))
    run(ext4_request_argv(str(device), extra), timeout=timeout)


def mkfs_argv(kind: FsKind, device: str, *, integrity: bool) -> list[str]:
    """The mkfs command for `kind` on `device` (the opened mapper device)."""
    if kind == "ext4":
        ext_opts = ["nodiscard"]
        if integrity:
            ext_opts += ["lazy_itable_init=0", "lazy_journal_init=0"]
        return ["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", ",".join(ext_opts), "--", device]
    if kind == "xfs":
        return ["mkfs.xfs", "-q", "-f", "-K", "-b", "size=4096", "-s", "size=4096", "--", device]
    raise FsError(f"filesystem {kind!r} is not supported; use ext4 or xfs")


def grow_argv(kind: FsKind, device: str, mountpoint: str) -> list[str]:
    """Online grow to the device's size: resize2fs takes the device, xfs_growfs the mountpoint."""
    if kind == "ext4":
        return ["resize2fs", "--", device]
    if kind == "xfs":
        return ["xfs_growfs", "--", mountpoint]
    raise FsError(f"filesystem {kind!r} is not supported; use ext4 or xfs")


def parse_blkid_export(text: str) -> FsProbe:
    """Parse `blkid -p -o export` (KEY=VALUE per line; values may not contain newlines)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key and all(c.isupper() or c.isdigit() or c == "_" for c in key):
            fields.setdefault(key, value)
    return FsProbe(fields.get("TYPE", ""), fields.get("UUID", ""), fields.get("USAGE", ""))


def ext4_backup_groups(group_count: int) -> tuple[int, ...]:
    """Groups holding a superblock copy with sparse_super: 0, 1 and the powers of 3, 5, 7."""
    groups = {0, 1} if group_count > 1 else {0}
    for base in (3, 5, 7):
        g = base
        while g < group_count:
            groups.add(g)
            g *= base
    return tuple(sorted(groups))


def prewrite_ranges(size_bytes: int, kind: FsKind = "ext4") -> tuple[tuple[int, int], ...]:
    """(offset, length) ranges to zero on a new integrity device before mkfs.

    Both 2 MiB edges (libblkid's probes, mke2fs' and mkfs.xfs' signature wipes and sector
    reads) and, for ext4, the first block of every group holding a backup superblock: mke2fs
    writes those 1 KiB superblocks into 4 KiB blocks, which the kernel reads first.
    """
    if size_bytes <= 0 or size_bytes % 4096:
        raise FsError(f"device size {size_bytes} is not a positive multiple of 4096")
    if size_bytes <= 2 * PREWRITE_EDGE:
        return ((0, size_bytes),)
    ranges = [(0, PREWRITE_EDGE), (size_bytes - PREWRITE_EDGE, PREWRITE_EDGE)]
    if kind == "ext4":
        groups = -(-size_bytes // (EXT4_BLOCKS_PER_GROUP * EXT4_BLOCK))
        for g in ext4_backup_groups(groups):
            off = g * EXT4_BLOCKS_PER_GROUP * EXT4_BLOCK
            if PREWRITE_EDGE <= off < size_bytes - PREWRITE_EDGE:
                ranges.append((off, EXT4_BLOCK))
    return tuple(sorted(ranges))


def grow_prewrite_ranges(old_size: int, new_size: int) -> tuple[tuple[int, int], ...]:
    """Ranges to zero after an integrity device grew: the new tail (the grow reads it)."""
    if new_size <= old_size:
        return ()
    start = max(old_size, new_size - PREWRITE_EDGE)
    start -= start % 4096
    return ((start, new_size - start),)


def check_size(kind: FsKind, size_bytes: int) -> None:
    if kind == "xfs" and size_bytes < XFS_MIN_BYTES:
        raise FsError(
            f"xfs needs at least {XFS_MIN_BYTES // MIB} MiB, the volume has {size_bytes // MIB} "
            "MiB; make the disk or LV bigger or use ext4"
        )


def probe(device: Path, *, timeout: float = PROBE_TIMEOUT) -> FsProbe:
    """Low-level blkid probe of `device` (no cache)."""
    result = run(["blkid", "-p", "-o", "export", "--", str(device)], timeout=timeout, check=False)
    if result.returncode == 2:
        return FsProbe("", "", "")
    if result.returncode != 0:
        raise FsError(f"blkid could not probe {device} (exit {result.returncode})")
    return parse_blkid_export(result.text)


def write_zeros(device: Path, ranges: tuple[tuple[int, int], ...]) -> None:
    """Write zeros over `ranges` of `device` and flush."""
    zeros = bytes(MIB)
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for offset, length in ranges:
            done = 0
            while done < length:
                n = os.pwrite(fd, zeros[: min(MIB, length - done)], offset + done)
                if n <= 0:
                    raise FsError(f"short write pre-writing {device} at {offset + done}")
                done += n
        os.fsync(fd)
    finally:
        os.close(fd)


def device_size(device: Path) -> int:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def make_fs(device: Path, kind: FsKind, *, integrity: bool, timeout: float = MKFS_TIMEOUT) -> None:
    """Create the filesystem on the opened volume (only ever in state INITIALIZING)."""
    size = device_size(device)
    check_size(kind, size)
    if integrity:
        write_zeros(device, prewrite_ranges(size, kind))
    run(mkfs_argv(kind, str(device), integrity=integrity), timeout=timeout)


def grow_fs(kind: FsKind, device: Path, mountpoint: Path, *, timeout: float = MKFS_TIMEOUT) -> None:
    """Grow the mounted filesystem online to fill its (already grown) device."""
    run(grow_argv(kind, str(device), str(mountpoint)), timeout=timeout)


# XFS_IOC_FSGEOMETRY_V1 = _IOR('X', 100, struct xfs_fsop_geom_v1): 112 bytes, blocksize (u32)
# at offset 0 and datablocks (u64) at offset 32 (linux/fs/xfs/libxfs/xfs_fs.h)
XFS_IOC_FSGEOMETRY_V1 = 0x80705864
_XFS_GEOM_V1_BYTES = 112


def xfs_geometry_bytes(geom: bytes) -> int | None:
    """Data section size from an xfs_fsop_geom_v1 answer (pure); None if implausible."""
    if len(geom) < 40:
        return None
    block_size = int.from_bytes(geom[0:4], "little")
    blocks = int.from_bytes(geom[32:40], "little")
    if block_size not in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
        return None
    return block_size * blocks


def mounted_xfs_bytes(mountpoint: Path) -> int | None:
    """The mounted xfs filesystem's data size as the kernel holds it (XFS keeps its superblock
    in its own buffer cache: after xfs_growfs the copy on the disk lags until written back)."""
    import fcntl  # noqa: PLC0415 - only here

    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        buf = bytearray(_XFS_GEOM_V1_BYTES)
        fcntl.ioctl(fd, XFS_IOC_FSGEOMETRY_V1, buf)
    except OSError:
        return None
    finally:
        os.close(fd)
    return xfs_geometry_bytes(bytes(buf))
