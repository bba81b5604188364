"""A small ext4 image on a loop device, for the host tests that mount a real filesystem (root)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def loop_ext4(img: Path, size: int = 8 << 20) -> Iterator[Path]:
    """A fresh ext4 in the image file `img`, attached to a loop device (yielded); detached after
    (unmount what you mounted from it inside the block)."""
    with img.open("wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(img)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield Path(loop)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
