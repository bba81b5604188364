"""The SecureMount adapter's production bind (luks.mount under the hood), for real, as root, under
a temp dir (an image-config root of its own): read-only honoured, idempotent, the allow-list
checked again on the kernel-resolved path, the source checked to be the volume, cleaned up after."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.mountpoints import MountRules, parse_root
from agent.rpc.ttrpc import Code, RpcError
from agent.securemount.volumes import bind_mount
from luks import mount
from tests.loopfs import loop_ext4

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def _mounts_at(target: Path) -> list[mount.MountEntry]:
    entries = mount.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    return [e for e in entries if e.mountpoint == str(target)]


def _umount_all(target: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    while _mounts_at(target):
        libc.umount2(os.fsencode(str(target)), mount.MNT_DETACH)


@contextlib.contextmanager
def volume(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(mounted ext4 on a loop device, the loop device): the stand-in for cva's staging mount."""
    at = tmp_path / "volume"
    with loop_ext4(tmp_path / "vol.img") as loop:
        try:
            mount.mount_volume(loop, at, fs="ext4", read_only=False)
            (at / "marker").write_text("volume")
            yield at, loop
        finally:
            _umount_all(at)


def rules_for(tmp_path: Path) -> MountRules:
    return MountRules.build((parse_root(f"{tmp_path}/sandbox/*"), parse_root(f"{tmp_path}/real/*")))


@needs_root
def test_bind_mount_read_only_and_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "sandbox" / "pg"
    with volume(tmp_path) as (source, device):
        try:
            bind_mount(source, device, target, True, rules_for(tmp_path))
            bind_mount(source, device, target, True, rules_for(tmp_path))
            assert (target / "marker").read_text() == "volume"
            [entry] = _mounts_at(target)
            assert "ro" in entry.options
            with pytest.raises(OSError):
                (target / "new").write_text("x")
        finally:
            _umount_all(target)


@needs_root
def test_bind_is_seen_at_its_resolved_path_and_gone_after_unmount(tmp_path: Path) -> None:
    from agent.securemount.volumes import is_bound

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    with volume(tmp_path) as (source, device):
        try:
            where = bind_mount(source, device, tmp_path / "via" / "pg", False, rules_for(tmp_path))
            assert where == real / "pg"
            assert is_bound(source, where)
            assert not is_bound(source, tmp_path / "elsewhere")
        finally:
            _umount_all(real / "pg")
        assert not is_bound(source, where)


@needs_root
def test_a_symlink_out_of_the_allowed_roots_is_refused_before_mounting(tmp_path: Path) -> None:
    from agent.securemount.volumes import link_device

    (tmp_path / "sandbox").symlink_to("/etc")
    with volume(tmp_path) as (source, device):
        before = Path("/proc/self/mountinfo").read_text()
        with pytest.raises(RpcError) as info:
            bind_mount(source, device, tmp_path / "sandbox" / "cvatestnever", False,
                       rules_for(tmp_path))  # fmt: skip
        assert info.value.rpc_code is Code.PERMISSION_DENIED
        assert "(mount-point)" in str(info.value) and "/etc" in str(info.value)
        with pytest.raises(RpcError):
            link_device(Path("/dev/null"), tmp_path / "sandbox" / "cvatestlink",
                        rules_for(tmp_path))  # fmt: skip
        assert Path("/proc/self/mountinfo").read_text() == before
    assert not Path("/etc/cvatestlink").exists()
    assert not Path("/etc/cvatestnever").exists()  # not even a directory was made there


@needs_root
def test_a_shadowed_staging_mount_is_refused_and_nothing_is_bound(tmp_path: Path) -> None:
    target = tmp_path / "sandbox" / "pg"
    with volume(tmp_path) as (source, device):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(source)], check=True)
        with pytest.raises(mount.MountError, match="is not the filesystem of"):
            bind_mount(source, device, target, False, rules_for(tmp_path))
        assert _mounts_at(target) == []
