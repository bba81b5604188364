"""Mounts: the volume at /run/cva/volumes/<name>, and binds into container root filesystems.

The container image is hostile input: a symlink at (or above) the mount target could point the
bind at a guest path such as /etc or /run/cva. So the target is resolved *inside* the rootfs with
`openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` — symlinks and `..` are clamped at the rootfs
— missing directories are created with `mkdirat` on the fd of their resolved parent, and the
bind is attached to the resolved fd itself (`open_tree` + `move_mount`, or `/proc/self/fd/N`
with mount(2) on kernels without the new API). At no point is the target path re-resolved by
the kernel from a string after it was checked.

Syscalls go through ctypes (x86_64 numbers; Linux >= 5.6 for openat2, >= 5.12 for
mount_setattr). Mount flags: `nodev,nosuid` always, `ro` when the contract says read_only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

from luks.errors import StorageError

# x86_64 syscall numbers (the asm-generic numbers are the same for these on aarch64)
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(StorageError):
    """A mount or bind cva refuses to do, or one the kernel refused."""


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check_arch() -> None:
    machine = os.uname().machine
    if machine not in ("x86_64", "aarch64"):
        raise MountError(f"mount syscalls are not wired for {machine}")


def _oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """The openat2(2) syscall; raises OSError with the kernel's errno."""
    _check_arch()
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(
        SYS_OPENAT2,
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        raise _oserror(f"openat2 {path}")
    return int(fd)


def _open_tree(dirfd: int, path: str, flags: int) -> int:
    fd = _libc.syscall(
        SYS_OPEN_TREE, ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)), ctypes.c_uint(flags)
    )
    if fd < 0:
        raise _oserror("open_tree")
    return int(fd)


def _move_mount(from_fd: int, to_fd: int) -> None:
    rc = _libc.syscall(
        SYS_MOVE_MOUNT,
        ctypes.c_int(from_fd),
        ctypes.c_char_p(b""),
        ctypes.c_int(to_fd),
        ctypes.c_char_p(b""),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
    )
    if rc < 0:
        raise _oserror("move_mount")


def _mount_setattr(fd: int, attr_set: int) -> None:
    attr = _MountAttr(attr_set, 0, 0, 0)
    rc = _libc.syscall(
        SYS_MOUNT_SETATTR,
        ctypes.c_int(fd),
        ctypes.c_char_p(b""),
        ctypes.c_uint(AT_EMPTY_PATH),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if rc < 0:
        raise _oserror("mount_setattr")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    rc = _libc.mount(
        os.fsencode(source) if source is not None else None,
        os.fsencode(target),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        raise _oserror(f"mount {target}")


def _umount(target: str, flags: int) -> None:
    if _libc.umount2(os.fsencode(target), ctypes.c_int(flags)) != 0:
        raise _oserror(f"umount {target}")


# ---- pure helpers -------------------------------------------------------------------------


def target_components(target: str) -> tuple[str, ...]:
    """Split an absolute in-container path; refuse `..`, NUL and relative paths."""
    if not target.startswith("/"):
        raise MountError(f"mount target {target!r} must be an absolute path")
    if "\0" in target:
        raise MountError("mount target contains a NUL byte")
    parts = tuple(p for p in target.split("/") if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise MountError(f"mount target {target!r} must not contain '..'")
    if not parts:
        raise MountError("mount target must not be the container's root directory")
    return parts


class MountEntry(NamedTuple):
    """One line of /proc/self/mountinfo (the fields cva needs). A NamedTuple, like every type
    here: the prestart hook process imports this module and stays light (no dataclasses)."""

    mount_id: int
    devno: str  # major:minor
    root: str
    mountpoint: str
    options: tuple[str, ...]
    fstype: str
    source: str


def _unescape(field: str) -> str:
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and len(field) >= i + 4 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> tuple[MountEntry, ...]:
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 3:
            continue
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                devno=fields[2],
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                fstype=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
            )
        )
    return tuple(entries)


def mounts_at(entries: tuple[MountEntry, ...], mountpoint: str) -> tuple[MountEntry, ...]:
    return tuple(e for e in entries if e.mountpoint == mountpoint)


def volume_mount_flags(*, read_only: bool) -> int:
    return MS_NODEV | MS_NOSUID | (MS_RDONLY if read_only else 0)


def bind_attrs(*, read_only: bool) -> int:
    return MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID | (MOUNT_ATTR_RDONLY if read_only else 0)


# ---- the shell ----------------------------------------------------------------------------


def _mountinfo() -> tuple[MountEntry, ...]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def _devno(path: Path) -> str:
    st = path.stat()
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def is_mounted(target: Path, device: Path | None = None) -> bool:
    """True if `target` is a mount point (of `device`, when given)."""
    found = mounts_at(_mountinfo(), str(target))
    if device is None:
        return bool(found)
    return any(e.devno == _devno(device) for e in found)


def mount_volume(device: Path, target: Path, *, fs: str, read_only: bool) -> None:
    """Mount the opened volume at `target` (cva's own path under /run) with nodev,nosuid."""
    if fs not in ("ext4", "xfs"):
        raise MountError(f"filesystem {fs!r} is not supported; use ext4 or xfs")
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with suppress(FileExistsError):
        target.mkdir(mode=0o700)
    if target.is_symlink() or not target.is_dir():
        raise MountError(f"{target} is not a plain directory; remove it and retry")
    found = mounts_at(_mountinfo(), str(target))
    if found:
        if any(e.devno == _devno(device) for e in found):
            return
        raise MountError(f"{target} already has another filesystem mounted; release it first")
    try:
        _mount(str(device), str(target), fs, volume_mount_flags(read_only=read_only))
    except OSError as exc:
        raise MountError(
            f"mounting {device} at {target} failed: {exc.strerror}; check the filesystem"
        ) from None


def unmount(target: Path) -> None:
    """Unmount `target` if mounted; a busy mount is detached (lazy) instead."""
    if not mounts_at(_mountinfo(), str(target)):
        return
    try:
        _umount(str(target), UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise MountError(f"unmounting {target} failed: {exc.strerror}") from None
        _umount(str(target), UMOUNT_NOFOLLOW | MNT_DETACH)


@contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
_IN_ROOT = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS


MAX_LINK_FOLLOWS = 40


def resolve_in_rootfs(
    root_fd: int,
    target: str,
    *,
    create: bool,
    check: Callable[[str], None] | None = None,
    _depth: int = 0,
) -> int:
    """An O_PATH fd of directory `target` resolved inside the rootfs fd; creates missing dirs.

    Every prefix is resolved from the rootfs with RESOLVE_IN_ROOT, so a symlink anywhere on the
    path resolves as if the rootfs were `/`. A missing directory is made with mkdirat on the fd
    of its already-resolved parent, then resolved again the same way. A dangling symlink on the
    way is followed the same way (its target is created inside the rootfs, never outside).
    `check` gets the resolved path of every directory about to be created (it raises to refuse).
    """
    if _depth > MAX_LINK_FOLLOWS:
        raise MountError(f"mount target {target!r}: too many levels of symlinks")
    parts = target_components(target)
    parent = os.dup(root_fd)
    try:
        for i, name in enumerate(parts):
            prefix = "/".join(parts[: i + 1])
            try:
                fd = openat2(root_fd, prefix, os.O_PATH | os.O_DIRECTORY, _IN_ROOT)
            except FileNotFoundError:
                if not create:
                    raise MountError(
                        f"mount target {target!r}: {prefix!r} does not exist"
                    ) from None
                if check is not None:
                    check(posixpath.join(fd_path(parent), name))
                try:
                    os.mkdir(name, 0o755, dir_fd=parent)
                except FileExistsError:
                    link = _readlink_at(parent, name)
                    if link is None:
                        raise MountError(
                            f"mount target {target!r}: {prefix!r} appeared while creating it"
                        ) from None
                    base = "/" + "/".join(parts[:i]) if not link.startswith("/") else ""
                    rest = "/".join(parts[i + 1 :])
                    followed = posixpath.normpath(posixpath.join("/", base, link, rest))
                    return resolve_in_rootfs(
                        root_fd, followed, create=True, check=check, _depth=_depth + 1
                    )
                except OSError as exc:
                    raise MountError(
                        f"cannot create {prefix!r} in the container rootfs: {exc.strerror}"
                    ) from None
                fd = openat2(root_fd, prefix, os.O_PATH | os.O_DIRECTORY, _IN_ROOT)
            except NotADirectoryError:
                raise MountError(
                    f"mount target {target!r}: {prefix!r} is not a directory in the container"
                ) from None
            except MountError:
                raise
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise MountError(
                        f"mount target {target!r}: {prefix!r} is a symlink loop or a magic link"
                    ) from None
                raise MountError(f"mount target {target!r}: {exc.strerror}") from None
            os.close(parent)
            parent = fd
        return parent
    except BaseException:
        os.close(parent)
        raise


def _readlink_at(dir_fd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


def open_rootfs(rootfs: Path) -> int:
    try:
        return os.open(rootfs, _DIR_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(f"container rootfs {rootfs} cannot be opened: {exc.strerror}") from None


def fd_path(fd: int) -> str:
    """What the kernel says an fd points to (for messages and checks, never for mounting)."""
    return str(Path(f"/proc/self/fd/{fd}").readlink())


def check_mount_of(src_fd: int, device: Path) -> None:
    """Refuse unless `src_fd` is the root of the filesystem mounted from block device `device`.

    The one check before every bind (a volume into a container, a SecureMount into place): the
    st_dev of what is about to be bound must be the dm device cva opened (its st_rdev), and the
    topmost mount at that path must be that device's filesystem root. A directory that shadows
    cva's staging mount (a tmpfs or a bind mounted over it, or the bare directory after the
    volume was unmounted) is never bound in place of the volume."""
    try:
        dev_st = device.stat()
    except OSError as exc:
        raise MountError(f"volume device {device} cannot be read: {exc.strerror}") from None
    if not stat.S_ISBLK(dev_st.st_mode):
        raise MountError(f"volume device {device} is not a block device; refusing to bind")
    want = f"{os.major(dev_st.st_rdev)}:{os.minor(dev_st.st_rdev)}"
    src_st = os.fstat(src_fd)
    where = fd_path(src_fd)
    got = f"{os.major(src_st.st_dev)}:{os.minor(src_st.st_dev)}"
    if not stat.S_ISDIR(src_st.st_mode) or got != want:
        raise MountError(
            f"{where} is not the filesystem of {device} (device {got}, expected {want}): "
            "something shadows cva's mount; refusing to bind it (close the volume and prepare "
            "it again)"
        )
    found = mounts_at(_mountinfo(), where)
    if not found or found[-1].devno != want or found[-1].root != "/":
        raise MountError(
            f"{where} is not the root of the filesystem of {device} (mount table: "
            f"{found[-1].devno + ' ' + found[-1].root if found else 'no mount there'}); "
            "refusing to bind it (close the volume and prepare it again)"
        )


def bind_into_rootfs(
    source: Path,
    rootfs: Path,
    target: str,
    *,
    device: Path,
    read_only: bool,
    check: Callable[[str], None] | None = None,
    check_dir: Callable[[str], None] | None = None,
) -> Path:
    """Bind `source` (the mount of `device`) onto `target` inside `rootfs`; returns the resolved
    host path of the bind.

    `source` must be the root of `device`'s filesystem (`check_mount_of`, on the very fd that is
    bound). `check` gets the resolved target path before anything is mounted (it raises to
    refuse): the mount goes through the very fd that path was read from, so what was checked is
    what gets covered. `check_dir` (default: `check`) gets every directory about to be made on
    the way."""
    with (
        _fd(open_rootfs(rootfs)) as root_fd,
        _fd(os.open(source, _DIR_PATH | os.O_CLOEXEC)) as src_fd,
    ):
        check_mount_of(src_fd, device)
        made_check = check_dir if check_dir is not None else check
        with _fd(resolve_in_rootfs(root_fd, target, create=True, check=made_check)) as dst_fd:
            src_st, dst_st = os.fstat(src_fd), os.fstat(dst_fd)
            if not stat.S_ISDIR(dst_st.st_mode):
                raise MountError(f"mount target {target!r} is not a directory")
            where = fd_path(dst_fd)
            if check is not None:
                check(where)
            if (src_st.st_dev, src_st.st_ino) == (dst_st.st_dev, dst_st.st_ino):
                return Path(where)  # already bound (idempotent)
            _attach(src_fd, dst_fd, read_only=read_only)
            return Path(where)


def _attach(src_fd: int, dst_fd: int, *, read_only: bool) -> None:
    try:
        tree = _open_tree(src_fd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise MountError(f"cloning the volume mount failed: {exc.strerror}") from None
        _attach_legacy(src_fd, dst_fd, read_only=read_only)
        return
    with _fd(tree):
        try:
            _mount_setattr(tree, bind_attrs(read_only=read_only))
            _move_mount(tree, dst_fd)
        except OSError as exc:
            raise MountError(
                f"binding the volume into the container failed: {exc.strerror}"
            ) from None


def _attach_legacy(src_fd: int, dst_fd: int, *, read_only: bool) -> None:
    src, dst = f"/proc/self/fd/{src_fd}", f"/proc/self/fd/{dst_fd}"
    try:
        _mount(src, dst, None, MS_BIND)
        _mount(None, dst, None, MS_BIND | MS_REMOUNT | volume_mount_flags(read_only=read_only))
    except OSError as exc:
        raise MountError(f"binding the volume into the container failed: {exc.strerror}") from None


def unbind_from_rootfs(source: Path, rootfs: Path, target: str) -> bool:
    """Detach the bind of `source` at `target` in `rootfs`; False if it was not bound there."""
    src_st = source.stat()
    with _fd(open_rootfs(rootfs)) as root_fd:
        try:
            dst = resolve_in_rootfs(root_fd, target, create=False)
        except MountError:
            return False
        with _fd(dst):
            dst_st = os.fstat(dst)
            if (src_st.st_dev, src_st.st_ino) != (dst_st.st_dev, dst_st.st_ino):
                return False
            try:
                _umount(f"/proc/self/fd/{dst}", MNT_DETACH)
            except OSError as exc:
                raise MountError(f"unbinding {target!r} failed: {exc.strerror}") from None
            return True


# ---- the prestart hook's split bind (SPEC §e.7) ---------------------------------------------
# The daemon (no setns: RestrictNamespaces) clones the volume's mount as a detached tree with the
# bind's attributes; the hook (single-threaded, in the container's mount namespace) attaches
# that tree onto the target it resolves inside the rootfs.


def clone_volume_mount(source: Path, *, device: Path, read_only: bool) -> int:
    """A detached mount fd (`open_tree(OPEN_TREE_CLONE)`) of `source`, the root of `device`'s
    filesystem (`check_mount_of` on the very fd that is cloned), with nodev,nosuid (+ro) set.
    The caller owns the fd (close-on-exec)."""
    with _fd(os.open(source, _DIR_PATH | os.O_CLOEXEC)) as src_fd:
        check_mount_of(src_fd, device)
        try:
            tree = _open_tree(src_fd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH)
        except OSError as exc:
            raise MountError(
                f"cloning the volume mount failed: {exc.strerror} (Linux >= 5.12 is needed)"
            ) from None
    try:
        _mount_setattr(tree, bind_attrs(read_only=read_only))
    except OSError as exc:
        os.close(tree)
        raise MountError(f"setting the bind's attributes failed: {exc.strerror}") from None
    return tree


def attach_volume_tree(tree_fd: int, rootfs: Path, target: str, *, dev: str) -> Path:
    """Attach detached mount `tree_fd` (the filesystem `dev`, MAJ:MIN) at `target` resolved
    inside `rootfs` (RESOLVE_IN_ROOT, missing directories made inside it); returns the resolved
    path. Idempotent: a target that already is that filesystem's root is left as it is. After
    the attach the target is resolved again and must be that filesystem (st_dev check)."""
    tree_st = os.fstat(tree_fd)
    got = f"{os.major(tree_st.st_dev)}:{os.minor(tree_st.st_dev)}"
    if got != dev or not stat.S_ISDIR(tree_st.st_mode):
        raise MountError(f"the volume mount handed over is device {got}, expected {dev}")
    with _fd(open_rootfs(rootfs)) as root_fd:
        with _fd(resolve_in_rootfs(root_fd, target, create=True)) as dst_fd:
            dst_st = os.fstat(dst_fd)
            if not stat.S_ISDIR(dst_st.st_mode):
                raise MountError(f"mount target {target!r} is not a directory")
            where = fd_path(dst_fd)
            if (dst_st.st_dev, dst_st.st_ino) != (tree_st.st_dev, tree_st.st_ino):
                try:
                    _move_mount(tree_fd, dst_fd)
                except OSError as exc:
                    raise MountError(
                        f"binding the volume at {target!r} in the container failed: {exc.strerror}"
                    ) from None
        with _fd(resolve_in_rootfs(root_fd, target, create=False)) as check_fd:
            st = os.fstat(check_fd)
            if (st.st_dev, st.st_ino) != (tree_st.st_dev, tree_st.st_ino):
                raise MountError(
                    f"after the bind, {target!r} in the container is device "
                    f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}, not the volume ({dev})"
                )
    return Path(where)


def remove_device_node(rootfs: Path, node: str) -> bool:
    """Remove device node `node` (an absolute in-container path under /dev) from `rootfs`,
    resolved inside it; a bind-mounted node is detached first. False if there was none."""
    parent, _, name = node.rpartition("/")
    if not name or name in (".", ".."):
        raise MountError(f"device path {node!r} has no file name")
    with _fd(open_rootfs(rootfs)) as root_fd:
        try:
            dir_fd = resolve_in_rootfs(root_fd, parent or "/dev", create=False)
        except MountError:
            return False
        with _fd(dir_fd):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if not (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
                raise MountError(f"{node!r} in the container is not a device node; not removed")
            with suppress(OSError):  # a bind-mounted node (kata in a user namespace)
                node_fd = openat2(dir_fd, name, os.O_PATH | os.O_NOFOLLOW, RESOLVE_BENEATH)
                with _fd(node_fd):
                    _umount(f"/proc/self/fd/{node_fd}", MNT_DETACH)
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError as exc:
                raise MountError(
                    f"cannot remove {node!r} from the container's /dev: {exc.strerror}"
                ) from None
    return True
