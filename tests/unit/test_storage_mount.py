"""luks.mount: target parsing, mountinfo parsing, and real binds into a fake container rootfs.

The bind tests need root (they mount for real, on the host, under a temp dir) and clean up
every mount they make.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from luks import mount
from luks.errors import StorageError
from tests.loopfs import loop_ext4

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def test_target_components() -> None:
    assert mount.target_components("/var/lib//pg/./data") == ("var", "lib", "pg", "data")
    for bad in ("relative", "/a/../b", "/", "/a\0b"):
        with pytest.raises(StorageError):
            mount.target_components(bad)


def test_parse_mountinfo() -> None:
    text = (
        "42 27 7:1 / /tmp/stg/m rw,nosuid,nodev,relatime - ext4 /dev/loop1 rw\n"
        "43 27 0:5 /x /a\\040b rw shared:1 - tmpfs tmpfs rw\n"
        "garbage\n"
    )
    e = mount.parse_mountinfo(text)
    assert e[0].devno == "7:1" and e[0].fstype == "ext4" and "nodev" in e[0].options
    assert e[1].mountpoint == "/a b" and e[1].root == "/x"
    assert mount.mounts_at(e, "/a b") == (e[1],)


@given(st.text(max_size=300))
def test_mountinfo_any_text(text: str) -> None:
    # a non-numeric mount id only ever comes from a broken kernel, not from hostile input
    with contextlib.suppress(ValueError):
        mount.parse_mountinfo(text)


def test_flags() -> None:
    assert mount.volume_mount_flags(read_only=False) == mount.MS_NODEV | mount.MS_NOSUID
    assert mount.bind_attrs(read_only=True) & mount.MOUNT_ATTR_RDONLY


def _mounts_under(base: Path) -> list[str]:
    entries = mount.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    return [e.mountpoint for e in entries if e.mountpoint.startswith(str(base) + "/")]


DEVICE: dict[Path, Path] = {}  # volume dir -> the loop device mounted there


@contextlib.contextmanager
def _loop_fs(tmp_path: Path, at: Path) -> Iterator[Path]:
    """A small ext4 on a loop device, mounted at `at` (the stand-in for an opened volume)."""
    with loop_ext4(tmp_path / f"{at.name}.img") as loop:
        try:
            mount.mount_volume(loop, at, fs="ext4", read_only=False)
            yield loop
        finally:
            mount.unmount(at)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(volume mount, container rootfs, a host dir outside the rootfs); unmounts all after."""
    vol = tmp_path / "volume"
    rootfs = tmp_path / "rootfs"
    outside = tmp_path / "host-etc"
    for d in (rootfs, outside):
        d.mkdir()
    try:
        with _loop_fs(tmp_path, vol) as device:
            (vol / "marker").write_text("volume")
            DEVICE[vol] = device
            yield vol, rootfs, outside
    finally:
        DEVICE.pop(vol, None)
        libc = ctypes.CDLL(None, use_errno=True)
        for mp in sorted(_mounts_under(tmp_path), key=len, reverse=True):
            libc.umount2(os.fsencode(mp), mount.MNT_DETACH)


def bind(vol: Path, rootfs: Path, target: str, *, read_only: bool) -> Path:
    return mount.bind_into_rootfs(vol, rootfs, target, device=DEVICE[vol], read_only=read_only)


@needs_root
def test_bind_creates_dirs_and_is_idempotent(world: tuple[Path, Path, Path]) -> None:
    vol, rootfs, _ = world
    where = bind(vol, rootfs, "/var/lib/data", read_only=False)
    assert where == rootfs / "var/lib/data"
    assert (rootfs / "var/lib/data/marker").read_text() == "volume"
    again = bind(vol, rootfs, "/var/lib/data", read_only=False)
    assert again == where and _mounts_under(rootfs).count(str(where)) == 1
    info = next(e for e in mount.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
            if e.mountpoint == str(where))  # fmt: skip
    assert "nodev" in info.options and "nosuid" in info.options
    assert mount.unbind_from_rootfs(vol, rootfs, "/var/lib/data")
    assert not (rootfs / "var/lib/data/marker").exists()
    assert not mount.unbind_from_rootfs(vol, rootfs, "/var/lib/data")


@needs_root
@pytest.mark.parametrize("link", ["ABS", "../../..", "../../../../../../../../ABS"])
def test_symlink_at_target_cannot_escape(world: tuple[Path, Path, Path], link: str) -> None:
    vol, rootfs, outside = world
    (rootfs / "data").symlink_to(link.replace("ABS", str(outside)))
    where = bind(vol, rootfs, "/data", read_only=False)
    assert str(where).startswith(str(rootfs) + "/") or where == rootfs
    assert not (outside / "marker").exists()
    assert list(outside.iterdir()) == []
    assert all(m.startswith(str(rootfs)) or m == str(vol) for m in _mounts_under(outside.parent))


@needs_root
def test_symlinked_parent_dir_cannot_escape(world: tuple[Path, Path, Path]) -> None:
    vol, rootfs, outside = world
    (rootfs / "var").symlink_to(outside)
    where = bind(vol, rootfs, "/var/lib/pg", read_only=False)
    assert where == rootfs / outside.relative_to("/") / "lib/pg"
    assert list(outside.iterdir()) == []


@needs_root
def test_read_only_bind(world: tuple[Path, Path, Path]) -> None:
    vol, rootfs, _ = world
    where = bind(vol, rootfs, "/ro", read_only=True)
    with pytest.raises(OSError) as exc:
        (where / "new").write_text("x")
    assert exc.value.errno == errno.EROFS
    (vol / "still-writable").write_text("x")  # the source mount is not affected


@needs_root
def test_magic_link_refused(world: tuple[Path, Path, Path]) -> None:
    vol, rootfs, _ = world
    (rootfs / "proc").mkdir()
    subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], check=True)
    with pytest.raises(StorageError, match=r"magic link|symlink loop"):
        bind(vol, rootfs, "/proc/self/root/etc", read_only=False)


@needs_root
def test_target_that_is_a_file_is_refused(world: tuple[Path, Path, Path]) -> None:
    vol, rootfs, _ = world
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "passwd").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        bind(vol, rootfs, "/etc/passwd", read_only=False)


@needs_root
def test_symlink_loop_refused(world: tuple[Path, Path, Path]) -> None:
    vol, rootfs, _ = world
    (rootfs / "a").symlink_to("b")
    (rootfs / "b").symlink_to("a")
    with pytest.raises(StorageError):
        bind(vol, rootfs, "/a/x", read_only=False)


@needs_root
def test_mount_volume_on_loop_device(tmp_path: Path) -> None:
    target = tmp_path / "volumes" / "pg"
    with loop_ext4(tmp_path / "fs.img", 32 << 20) as loop:
        try:
            mount.mount_volume(loop, target, fs="ext4", read_only=False)
            mount.mount_volume(loop, target, fs="ext4", read_only=False)  # idempotent
            assert mount.is_mounted(target, loop)
            e = mount.mounts_at(mount.parse_mountinfo(Path("/proc/self/mountinfo").read_text()),
                                str(target))  # fmt: skip
            assert len(e) == 1 and {"nodev", "nosuid"} <= set(e[0].options)
            assert oct((tmp_path / "volumes").stat().st_mode & 0o777) == "0o700"
        finally:
            mount.unmount(target)
    assert not mount.is_mounted(target)


@needs_root
def test_a_shadowed_volume_mount_is_never_bound(world: tuple[Path, Path, Path]) -> None:
    """issue 13: a tmpfs (or any directory) over the volume's mount is not the volume."""
    vol, rootfs, _ = world
    device = DEVICE[vol]
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(vol)], check=True)
    (vol / "planted").write_text("not the volume")
    with pytest.raises(StorageError, match="is not the filesystem of"):
        bind(vol, rootfs, "/data", read_only=False)
    assert not (rootfs / "data" / "planted").exists()
    assert str(rootfs / "data") not in _mounts_under(rootfs)
    mount.unmount(vol)  # the tmpfs goes, the volume is there again
    assert (vol / "marker").read_text() == "volume"
    assert mount.is_mounted(vol, device)


@needs_root
def test_a_subdirectory_of_the_volume_is_not_its_root(world: tuple[Path, Path, Path]) -> None:
    vol, rootfs, _ = world
    (vol / "sub").mkdir()
    with pytest.raises(StorageError, match="not the root of the filesystem"):
        mount.bind_into_rootfs(vol / "sub", rootfs, "/data", device=DEVICE[vol], read_only=False)
    assert _mounts_under(rootfs) == []


@needs_root
def test_a_bare_directory_or_another_device_is_refused(
    world: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    vol, rootfs, _ = world
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(StorageError, match="is not the filesystem of"):
        mount.bind_into_rootfs(bare, rootfs, "/data", device=DEVICE[vol], read_only=False)
    with pytest.raises(StorageError, match="not a block device"):
        mount.bind_into_rootfs(vol, rootfs, "/data", device=Path("/dev/null"), read_only=False)
    assert _mounts_under(rootfs) == []
