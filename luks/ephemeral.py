"""Ephemeral encrypted volumes: a random key that never leaves memory, a header only in tmpfs.

What kata-agent asks CDH for an encrypted emptyDir (SecureMount without a `key`): a fresh
volume on a blank disk that lives as long as the mapping. cva's version:

    BLANK       the device is provably blank (luks.blank: no signature, zero header region,
                zero samples) and nobody holds it (an O_EXCL open succeeds)
    HEADER      `<header_dir>/<mapper>.header`: a new 0600 file (O_EXCL, no symlinks) on
                tmpfs/ramfs only, DETACHED_HEADER_BYTES long
    FORMATTED   LUKS2 with cva's profile (aes-xts-plain64, 512-bit key, 4096-byte sectors,
                integrity hmac(sha256) when asked) written into that file, data offset 0; the
                random volume key exists only inside the libcryptsetup context. No keyslot is
                ever added: nothing on disk or in tmpfs can ever unlock the volume.
                With integrity this is the first write to the device (dm-integrity superblock).
    ACTIVE      /dev/mapper/<mapper> made from the context's key (dm-integrity without journal,
                as CDH: an ephemeral volume has no "after a crash"; integrity mappings are
                private: no udev probe reads their unwritten blocks); the context is freed,
                which wipes libcryptsetup's copy: from now on the key lives only in the
                kernel's dm-crypt table. The live table is checked against the profile.
    FILESYSTEM  (filesystem target) integrity: pre-write the edges and, learnt from a dry run
                with the same options, every backup superblock block; then mkfs.ext4
    MOUNTED     mounted at `mount_dir` (nodev,nosuid[,ro]); the caller binds it where asked

    release: unmount `mount_dir` -> deactivate the mapping (the key is gone) -> delete the
    header. Each step is skipped when already done, so release also cleans up any partial
    create (the caller's record in tmpfs says what to release after a crash).

Crash windows (a SIGKILL anywhere; the daemon's record in /run says "creating"):
    before FORMATTED (no integrity: before FILESYSTEM) - the device is untouched: still blank,
        a new request may format it.
    after the first device write - the device holds the remains of a volume whose key died
        with the process or the mapping: it is not blank any more, so cva refuses to format it
        again (never format what is not provably blank). The host gives the pod a new disk, or
        zeroes this one (`blkdiscard -z`). Nothing of value is lost: without the key the
        remains are noise.
A create that fails (not a crash) cleans up the same way and says whether the device was
written to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from luks import blank, dmtable, fs, mount
from luks.errors import StorageError
from luks.libcryptsetup import (
    DETACHED_HEADER_BYTES,
    CryptDevice,
    StatusQueryFailed,
    active_status,
    deactivate_by_name,
)

# structlog's own lazy logger: the application configures the processors (agent.log redacts)
_log = structlog.get_logger()
_LOGGER = "cva.luks.ephemeral"

# statfs f_type of the filesystems a header may live on (guest memory only)
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class EphemeralRefused(StorageError):
    """An ephemeral volume cannot be made here; nothing was written unless the message says."""


@dataclass(frozen=True)
class EphemeralSpec:
    """One ephemeral volume to make (every field already validated by the caller)."""

    device: Path  # the whole blank disk, e.g. /dev/vdc
    mapper: str  # dm name (cva-eph-...)
    header: Path  # detached LUKS2 header file in guest tmpfs (must not exist yet)
    integrity: bool
    mount_dir: Path | None  # None: no filesystem (the caller links the mapper device)
    mkfs_args: tuple[str, ...] = ()  # allow-listed mkfs.ext4 '-X value' pairs
    read_only: bool = False


@dataclass(frozen=True)
class EphemeralVolume:
    """A made ephemeral volume: what `release_ephemeral` needs."""

    mapper: str
    mapper_device: Path
    header: Path
    mount_dir: Path | None
    luks_uuid: str = ""  # of the header cva made in its tmpfs (measured volume events)
    header_sha256: bytes = b""  # luks.token.metadata_sha256 of that header


def header_identity(header: Path) -> tuple[str, bytes]:
    """(UUID, metadata SHA-256) of the detached header cva made in guest tmpfs."""
    from luks.header import parse_luks2  # noqa: PLC0415
    from luks.token import metadata_sha256  # noqa: PLC0415

    with header.open("rb") as fh:
        hdr = parse_luks2(fh.read(DETACHED_HEADER_BYTES))
    return hdr.uuid, metadata_sha256(hdr)


def mount_fstype(path: Path, entries: tuple[mount.MountEntry, ...]) -> str | None:
    """Filesystem type of the mount that holds `path` (longest mount point prefix)."""
    text = os.path.normpath(str(path))
    best: mount.MountEntry | None = None
    for entry in entries:
        mp = entry.mountpoint.rstrip("/") or "/"
        if (text == mp or text.startswith(mp + "/") or mp == "/") and (
            best is None or len(mp) > len(best.mountpoint.rstrip("/") or "/")
        ):
            best = entry
    return best.fstype if best is not None else None


def _check_header_dir(header: Path) -> None:
    parent = header.parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    kind = mount_fstype(parent.resolve(), mount.parse_mountinfo(_read_mountinfo()))
    if kind not in MEMORY_FILESYSTEMS:
        raise EphemeralRefused(
            f"ephemeral headers must live in guest memory, but {parent} is on "
            f"{kind or 'an unknown filesystem'}; point cva's state_dir at a tmpfs (/run/cva)"
        )


def _read_mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def _check_unclaimed(device: Path) -> None:
    """An O_EXCL open fails with EBUSY when a mount, a dm/md/LVM device or another O_EXCL
    opener holds the disk."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        raise EphemeralRefused(
            f"{device} is in use ({exc.strerror}); an ephemeral volume needs a disk nobody holds"
        ) from None
    os.close(fd)


def _check_blank(device: Path) -> None:
    try:
        found = blank.probe_blank(device)
    except StorageError as exc:
        raise EphemeralRefused(
            f"{device}: cannot prove it blank ({exc}); nothing was written"
        ) from None
    if not found.blank:
        raise EphemeralRefused(
            f"{device} is not provably blank ({found.reason}); cva formats only blank disks for "
            "ephemeral volumes: give the pod a new disk (or zero this one on purpose); "
            "nothing was written"
        )


def _create_header_file(header: Path) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(header, flags, 0o600)
    except FileExistsError:
        raise EphemeralRefused(
            f"header file {header} already exists: another ephemeral volume uses this name"
        ) from None
    try:
        os.ftruncate(fd, DETACHED_HEADER_BYTES)
    finally:
        os.close(fd)


def create_ephemeral(spec: EphemeralSpec) -> EphemeralVolume:
    """BLANK -> ... -> MOUNTED (see the module docstring). Cleans up after itself on failure."""
    try:
        state = active_status(spec.mapper)
    except StatusQueryFailed as exc:
        raise EphemeralRefused(
            f"ephemeral volume {spec.mapper}: {exc.message}; nothing was written"
        ) from None
    if state != "inactive":
        raise EphemeralRefused(f"a device-mapper device {spec.mapper} already exists")
    _check_header_dir(spec.header)
    _check_unclaimed(spec.device)
    _check_blank(spec.device)
    _create_header_file(spec.header)
    made = EphemeralVolume(
        mapper=spec.mapper,
        mapper_device=Path("/dev/mapper") / spec.mapper,
        header=spec.header,
        mount_dir=spec.mount_dir,
    )
    written = activated = False
    try:
        with CryptDevice.open(str(spec.device), header=str(spec.header)) as cd:
            written = spec.integrity  # format writes the dm-integrity superblock to the disk
            cd.format_luks2(integrity=spec.integrity, detached=True)
            # integrity: private, so udev's blkid never probes the fresh mapping, whose blocks
            # nothing wrote yet read as EIO and log "INTEGRITY AEAD ERROR" (as luks.volume)
            cd.activate_by_volume_key(
                spec.mapper, no_journal=spec.integrity, private=spec.integrity
            )
            activated = True
        uuid, digest = header_identity(spec.header)
        made = dataclasses.replace(made, luks_uuid=uuid, header_sha256=digest)
        dmtable.check_live(
            spec.mapper,
            dmtable.Expected(
                integrity=spec.integrity,
                device=dmtable.device_number(spec.device),
                offset_sectors=0,
            ),
        )
        if spec.mount_dir is not None:
            written = True
            fs.make_ext4_for_request(made.mapper_device, spec.mkfs_args, integrity=spec.integrity)
            mount.mount_volume(
                made.mapper_device, spec.mount_dir, fs="ext4", read_only=spec.read_only
            )
    except BaseException as exc:
        # undo only what this call did (a mapping of that name it did not make stays)
        undo = (
            made
            if activated
            else EphemeralVolume(spec.mapper, made.mapper_device, spec.header, None)
        )
        with contextlib.suppress(Exception):
            _release(undo, deactivate=activated)
        if isinstance(exc, StorageError):
            note = (
                f"; {spec.device} now holds the remains of this attempt and is no longer blank"
                if written
                else "; nothing was written to the disk"
            )
            raise EphemeralRefused(f"ephemeral volume {spec.mapper}: {exc}{note}") from None
        raise
    _log.info(
        "ephemeral volume ready",
        logger=_LOGGER,
        mapper=spec.mapper,
        device=str(spec.device),
        integrity=spec.integrity,
        mounted=str(spec.mount_dir) if spec.mount_dir else None,
    )
    return made


def release_ephemeral(vol: EphemeralVolume) -> None:
    """Unmount, deactivate (the key is gone for good), delete the header; each step idempotent."""
    _release(vol, deactivate=True)
    _log.info("ephemeral volume released", logger=_LOGGER, mapper=vol.mapper)


def _release(vol: EphemeralVolume, *, deactivate: bool) -> None:
    if vol.mount_dir is not None:
        mount.unmount(vol.mount_dir)
        with contextlib.suppress(OSError):
            vol.mount_dir.rmdir()
    if deactivate and active_status(vol.mapper) in ("active", "busy"):
        deactivate_by_name(vol.mapper)
    with contextlib.suppress(FileNotFoundError):
        vol.header.unlink()
