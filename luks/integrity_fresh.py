"""Is a data area nothing but what cva's own integrity format writes? (crash windows
LUKS_FORMATTED / KEYSLOT_ADDED with integrity, issue 14 item 2)

libcryptsetup formats cva's LUKS2 header into a memfd, but with integrity it also writes a
dm-integrity superblock and an initialised journal into the data area of the disk (at 16 MiB)
before cva writes the header. A crash there leaves a zero header region over a data area that
is not zero, which the plain zero proof refuses. What it holds is recognisable, without trusting
any byte of it: cva formats the same profile onto a sparse scratch device of the same size in
guest tmpfs (a loop device), and the disk's data area must then equal that scratch's data area
byte for byte, except the superblock's 16-byte random salt, and read as zeros beyond it.

Why that proves no user data was ever written: with a zero header region no key can have been
in use on the disk since it was last proven blank; and had the volume ever been written through
the mapping, the journal (contract volumes run dm-integrity with its journal) would hold entries
and new commit ids, the superblock's flags or counters would have moved, and data and tag
sectors after the journal would be non-zero. The journal's contents (commit ids fixed per
section, unused entries) and the superblock's geometry are functions of the device size and the
profile alone, which the scratch format reproduces. Anything else (another size, another
profile, a kernel that writes other bytes) makes the comparison fail: refused, as before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from luks import blank
from luks.run import run

DATA_OFFSET = 16 * 1024 * 1024
SB_SALT = slice(48, 64)  # struct superblock: magic[8] ... pad2[8] at 40, salt[16] at 48
SB_MAGIC = b"integrt\0"
MAX_FRESH_BYTES = 256 * 1024 * 1024  # superblock + journal (the kernel caps the journal lower)


def matches_fresh(on_disk: bytes, fresh: bytes) -> bool:
    """Equal byte for byte, except the dm-integrity superblock's salt (random per format)."""
    if len(on_disk) != len(fresh) or len(fresh) < SB_SALT.stop or fresh[:8] != SB_MAGIC:
        return False
    a, b = bytearray(on_disk), bytearray(fresh)
    a[SB_SALT] = b[SB_SALT] = bytes(SB_SALT.stop - SB_SALT.start)
    return a == b


def written_extent(fd: int, start: int, end: int) -> int:
    """End (exclusive) of the last data extent in [start, end) of a sparse file (SEEK_DATA)."""
    last = start
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        last = hole
        pos = hole
    return last


def fresh_image(size: int, scratch_dir: Path, format_onto: Callable[[Path], None]) -> bytes:
    """The bytes a fresh format (`format_onto(device)`) writes into [16 MiB, ...) of a device
    of `size` bytes, learnt on a sparse tmpfs file behind a loop device."""
    scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    scratch = scratch_dir / f"integrity-scratch-{os.getpid()}.img"
    fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size)
        loop = run(["losetup", "--find", "--show", "--", str(scratch)], timeout=30).text.strip()
        try:
            format_onto(Path(loop))
        finally:
            run(["losetup", "-d", loop], timeout=30, check=False)
        end = written_extent(fd, DATA_OFFSET, size)
        if end - DATA_OFFSET > MAX_FRESH_BYTES:
            raise OSError(f"a fresh integrity format wrote {end - DATA_OFFSET} bytes (too many)")
        return blank.read_range(fd, DATA_OFFSET, end - DATA_OFFSET)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()


def only_fresh_format(
    device: Path, scratch_dir: Path, format_onto: Callable[[Path], None]
) -> tuple[bool, str]:
    """(True, "") when the data area of `device` holds exactly a fresh integrity format of
    cva's profile and zeros after it; else (False, why). The header region is the caller's
    (it must have read it as zeros)."""
    size = blank.device_size(device)
    fresh = fresh_image(size, scratch_dir, format_onto)
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # the format wrote through a dm device below this one's page cache: drop what it holds
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        on_disk = blank.read_range(fd, DATA_OFFSET, len(fresh))
    finally:
        os.close(fd)
    if not matches_fresh(on_disk, fresh):
        return False, "the data area is not what a fresh integrity format writes"
    rest = DATA_OFFSET + len(fresh)
    aligned = -(-rest // blank.SCAN_ALIGN) * blank.SCAN_ALIGN
    if aligned != rest:  # cannot happen with page-granular extents; never skip bytes
        return False, "the fresh format's extent is not block-aligned"
    scan = blank.scan_zeros(device, rest, size - rest)
    if not scan.zero:
        return False, f"non-zero data at byte {scan.first_nonzero} after the integrity metadata"
    return True, ""
