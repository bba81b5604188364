"""Count byte strings in raw disk images on the host (data extents only; holes are skipped)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

CHUNK = 16 * 1024 * 1024


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the regions that hold data; the whole file if SEEK_DATA is missing."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                return
            yield pos, size
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end


def count_markers(image: Path, markers: list[bytes]) -> dict[bytes, int]:
    """How often each marker occurs in `image` (occurrences spanning chunk ends included)."""
    counts = dict.fromkeys(markers, 0)
    if not markers:
        return counts
    overlap = max(len(m) for m in markers) - 1
    fd = os.open(image, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for start, end in _data_extents(fd, size):
            pos = start
            carry = b""
            while pos < end:
                block = os.pread(fd, min(CHUNK, end - pos), pos)
                if not block:
                    break
                window = carry + block
                for marker in markers:
                    # count only hits that end inside the new block (no double counting)
                    counts[marker] += window.count(marker) - carry.count(marker)
                carry = window[-overlap:] if overlap else b""
                pos += len(block)
    finally:
        os.close(fd)
    return counts
