from __future__ import annotations

from pathlib import Path

from agent.mountinfo import MOUNTINFO, mount_source

SAMPLE = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
90 22 253:0 / /run/cva/volumes/pg rw,nosuid,nodev shared:40 - ext4 /dev/mapper/cva-pg rw
91 22 253:0 / /run/kata/c1/rootfs/with\\040space rw shared:41 - ext4 /dev/mapper/cva-pg rw
92 22 0:50 / /run/cva/volumes/pg rw - tmpfs tmp\\134fs rw
garbage line
"""


def test_topmost_mount_wins() -> None:
    assert mount_source(SAMPLE, Path("/run/cva/volumes/pg")) == "tmp\\fs"
    assert mount_source(SAMPLE, Path("/")) == "/dev/vda1"


def test_escaped_mountpoint() -> None:
    p = Path("/run/kata/c1/rootfs/with space")
    assert mount_source(SAMPLE, p) == "/dev/mapper/cva-pg"


def test_not_mounted() -> None:
    assert mount_source(SAMPLE, Path("/run/cva/volumes/other")) is None


def test_real_mountinfo_has_root() -> None:
    assert mount_source(MOUNTINFO.read_text(), Path("/")) is not None
