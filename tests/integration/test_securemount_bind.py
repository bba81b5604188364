"""The SecureMount adapter's production bind (luks.mount under the hood), for real, as root, under
a temp dir: read-only honoured, idempotent, cleaned up after."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from agent.securemount_volumes import bind_mount
from luks import mount

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def _mounts_at(target: Path) -> list[mount.MountEntry]:
    entries = mount.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    return [e for e in entries if e.mountpoint == str(target)]


@needs_root
def test_bind_mount_read_only_and_idempotent(tmp_path: Path) -> None:
    source = tmp_path / "volume"
    source.mkdir()
    (source / "marker").write_text("volume")
    target = tmp_path / "sandbox" / "pg"
    try:
        bind_mount(source, target, True)
        bind_mount(source, target, True)
        assert (target / "marker").read_text() == "volume"
        [entry] = _mounts_at(target)
        assert "ro" in entry.options
        with pytest.raises(OSError):
            (target / "new").write_text("x")
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        while _mounts_at(target):
            libc.umount2(os.fsencode(str(target)), mount.MNT_DETACH)
