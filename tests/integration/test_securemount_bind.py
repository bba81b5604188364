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


@needs_root
def test_bind_is_seen_at_its_resolved_path_and_gone_after_unmount(tmp_path: Path) -> None:
    from agent.securemount_volumes import is_bound

    source = tmp_path / "volume"
    source.mkdir()
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    try:
        where = bind_mount(source, tmp_path / "via" / "pg", False)
        assert where == real / "pg"
        assert is_bound(source, where)
        assert not is_bound(source, tmp_path / "elsewhere")
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        while _mounts_at(real / "pg"):
            libc.umount2(os.fsencode(str(real / "pg")), mount.MNT_DETACH)
    assert not is_bound(source, where)


@needs_root
def test_a_symlink_into_a_guest_root_is_refused_before_mounting(tmp_path: Path) -> None:
    from agent.securemount_volumes import link_device
    from agent.ttrpc import Code, RpcError

    source = tmp_path / "volume"
    source.mkdir()
    (tmp_path / "evil").symlink_to("/etc")
    before = Path("/proc/self/mountinfo").read_text()
    with pytest.raises(RpcError) as info:
        bind_mount(source, tmp_path / "evil" / "cva-test-never", False)
    assert info.value.rpc_code is Code.PERMISSION_DENIED
    assert "would cover /etc" in str(info.value)
    with pytest.raises(RpcError):
        link_device(Path("/dev/null"), tmp_path / "evil" / "cva-test-never-link")
    assert not Path("/etc/cva-test-never-link").exists()
    assert Path("/proc/self/mountinfo").read_text() == before
    assert not Path("/etc/cva-test-never").exists()  # not even a directory was made there
