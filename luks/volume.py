"""The per-volume state machine: a disk and a key in, a mounted encrypted volume out.

States (DESIGN §4; the durable ones live in the LUKS2 `cva` token, MAC'd with a key only the
attested guest can derive, so the host cannot forge or roll them forward):

    ABSENT        no cva header: the LV/disk is provably blank (blank.py) or something else
    INITIALIZING  LUKS2 header + keyslot + token state "initializing"; the filesystem may be
                  missing or half made; never held user data (it is never mounted in this state)
    READY         token state "ready": filesystem complete; the only state that is mounted
    OPEN          dm-crypt mapping `cva-<name>` active, built from the validated in-memory
                  header copy and checked against the contract in the live dm table
    MOUNTED       filesystem mounted at /run/cva/volumes/<name> (nodev,nosuid[,ro])
    BOUND         bind-mounted into container root filesystems (luks.mount.bind_into_rootfs)

    ABSENT --create & blank--> INITIALIZING --mkfs ok--> READY --open--> OPEN --mount-->
    MOUNTED --bind--> BOUND.   Release walks back: BOUND -> MOUNTED -> OPEN -> READY.

Decisions are pure (`classify`, `decide`, `expected_table`): the shell observes, asks, acts.
Rules that hold on every path: format only when the header region *and* sampled data are zero
and the contract says `create = true`; never format after a failed open, a wrong key or a bad
MAC (a run that tried to open never reaches the create branch, and a refused volume is left
byte-for-byte untouched); activate only from the validated copy, never from the disk.

Crash windows (a SIGKILL can land anywhere; each named point below is where tests kill the
process via `crash_hook`, and what the next run does):

    PV_CREATED           PV label on the disk, no VG      -> vgcreate, continue (LVM only)
    VG_CREATED           VG, no LV                        -> lvcreate, continue
    LV_CREATED           LV exists, still zeros           -> blank -> create, continue
    LUKS_FORMATTED       header without keyslot/token     -> REFUSE: not a complete cva header
                                                             (zero the LV to start over)
    KEYSLOT_ADDED        keyslot, no cva token            -> REFUSE, same reason
    INITIALIZING_WRITTEN token "initializing" on disk     -> open, mkfs, ready (recovery)
    OPENED_INITIALIZING  mapping active, no filesystem    -> reuse mapping, mkfs, ready
    MKFS_DONE            filesystem made, still "initializing" -> mkfs again (never held data)
    READY_WRITTEN        "ready" written, not mounted     -> open/reuse, mount
    MOUNTED              mounted, grow pending            -> mount is reused, grow checked again
    LV_EXTENDED          lvextend done, fs not grown      -> crypt resize + fs grow next run

The two format windows refuse rather than guess: a header without a MAC'd token is exactly
what a hostile host could plant, so cva cannot tell "my interrupted format" from "forgery".
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.contract import Volume

from agent.secret import Secret
from luks import blank, dmtable, fs, lvm, mount
from luks.header import allow_list_reasons, parse_luks2, read_header_area
from luks.libcryptsetup import CryptDevice, WrongPassphrase, active_status
from luks.run import run, secret_fd
from luks.token import derive_keys, make_token, verify_token
from luks.volume_plan import (
    INITIALIZING,
    READY,
    REINIT_HINT,
    CrashWindow,
    HeaderObservation,
    State,
    VolumeRefused,
    classify,
    decide,
    expected_table,
    fs_size_bytes,
    mapper_name,
    needs_grow,
)

CRYPT_TIMEOUT = 120.0
TOKEN_SCAN = 32


# Tests set this (inside the guest) to SIGKILL the process at a named window. Never set by cva.
crash_hook: Callable[[CrashWindow], None] | None = None


def _window(window: CrashWindow) -> None:
    if crash_hook is not None:
        crash_hook(window)


@dataclass(frozen=True)
class PreparedVolume:
    name: str
    state: State
    guest_path: Path  # where the filesystem is mounted in the guest
    device: Path  # the opened mapper device
    mapper_name: str
    created: bool  # this run formatted the volume


# ---- the shell ----------------------------------------------------------------------------


def _observe(area: bytes, vol: Volume, mac_key: Secret) -> HeaderObservation:

    return classify(
        area,
        parse=parse_luks2,
        allow_reasons=lambda h: allow_list_reasons(h, integrity=vol.integrity),  # type: ignore[arg-type]
        verify=lambda h: verify_token(h, vol.name, mac_key),  # type: ignore[arg-type]
    )


def _read_area(device: Path) -> bytes:

    return read_header_area(str(device))


@contextlib.contextmanager
def _header_copy(area: bytes, runtime_dir: Path, name: str) -> Iterator[Path]:
    """The validated header area as a 0600 file under cva's tmpfs runtime dir."""
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = runtime_dir / f"{name}.luks-header"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(area)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _cva_token_id(cd: CryptDevice) -> int | None:
    for token in range(TOKEN_SCAN):
        text = cd.token_json_get(token)
        if text is None:
            continue
        with contextlib.suppress(ValueError, RecursionError):
            if json.loads(text).get("type") == "cva":
                return token
    return None


def _format(device: Path, vol: Volume, passphrase: Secret, mac_key: Secret) -> None:
    """ABSENT -> INITIALIZING on a device proved blank just before."""

    with CryptDevice.open(str(device)) as cd:
        cd.format_luks2(integrity=vol.integrity)
        _window(CrashWindow.LUKS_FORMATTED)
        cd.keyslot_add_by_volume_key(passphrase, keyslot=0)
        _window(CrashWindow.KEYSLOT_ADDED)
        hdr = parse_luks2(_read_area(device))
        token = make_token(hdr, INITIALIZING, vol.name, mac_key)
        cd.token_json_set(0, json.dumps(token, sort_keys=True, separators=(",", ":")))
    _window(CrashWindow.INITIALIZING_WRITTEN)


def _mark_ready(device: Path, copy: Path, area: bytes, vol: Volume, mac_key: Secret) -> None:
    """INITIALIZING -> READY: update the token in the copy, then write the copy's metadata back.

    The disk is only written with bytes derived from cva's validated copy, and only if the
    disk's header region still equals that copy (a swap in between is refused).
    """

    hdr = parse_luks2(area)
    token = make_token(hdr, READY, vol.name, mac_key)
    with CryptDevice.open(str(device), header=str(copy)) as cd:
        cd.load()
        token_id = _cva_token_id(cd)
        cd.token_json_set(
            0 if token_id is None else token_id,
            json.dumps(token, sort_keys=True, separators=(",", ":")),
        )
    metadata = copy.read_bytes()[: 2 * _metadata_size(area)]
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        now = blank.read_range(fd, 0, len(area))
        if now != area:
            raise VolumeRefused(
                f"volume {vol.name}: the on-disk LUKS header changed while cva was using its "
                "copy; refusing to write the ready state (check who writes to the disk)"
            )
        half = len(metadata) // 2
        # secondary copy first, then the primary: a crash in between leaves two valid copies
        # that disagree, which the next run refuses (named window: never a format)
        os.pwrite(fd, metadata[half:], half)
        os.fsync(fd)
        os.pwrite(fd, metadata[:half], 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _metadata_size(area: bytes) -> int:
    # LUKS2 binary header: hdr_size (u64 big-endian) at offset 8
    size = int.from_bytes(area[8:16], "big")
    if size not in (16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304):
        raise VolumeRefused(f"LUKS2 header size {size} is not a valid metadata size")
    return size


def _activate(
    device: Path, copy: Path, mapper: str, passphrase: Secret, *, read_only: bool, name: str
) -> None:
    try:
        with CryptDevice.open(str(device), header=str(copy)) as cd:
            cd.load()
            cd.activate_by_passphrase(mapper, passphrase, read_only=read_only)
    except WrongPassphrase:
        raise VolumeRefused(
            f"volume {name}: the key from the KBS does not open this volume; nothing was changed "
            "(check the key resource in the contract)"
        ) from None


def _deactivate(mapper: str) -> None:
    if active_status(mapper) != "inactive":
        run(["cryptsetup", "close", "--", mapper], timeout=CRYPT_TIMEOUT)


def _check_table(mapper: str, vol: Volume, device: Path) -> None:
    expected = expected_table(integrity=vol.integrity, backing_devno=dmtable.device_number(device))
    try:
        dmtable.check_live(mapper, expected)
    except dmtable.DmTableError:
        _deactivate(mapper)
        raise


def _crypt_resize(mapper: str, copy: Path, passphrase: Secret) -> None:
    with secret_fd(passphrase) as key_path:
        fd = int(key_path.rsplit("/", 1)[1])
        run(
            [
                "cryptsetup",
                "resize",
                "--header",
                str(copy),
                "--key-file",
                key_path,
                "--",
                mapper,
            ],
            timeout=CRYPT_TIMEOUT,
            pass_fds=(fd,),
        )


def _ensure_lvm(vol: Volume, disk: Path) -> tuple[Path, bool]:
    """Bring up vol.lvm on `disk`; returns (LV device, whether the LV was extended now)."""
    spec = vol.lvm
    assert spec is not None
    disk_s = str(disk.resolve())
    state = lvm.read_state(disk_s)
    plan = lvm.plan(state, disk_s, spec.vg, spec.lv, spec.size_bytes, create=vol.create)
    if plan.refusal:
        raise VolumeRefused(f"volume {vol.name}: {plan.refusal}")
    if plan.needs_blank_disk:
        verdict = blank.probe_blank(Path(disk_s))
        if not verdict.blank:
            raise VolumeRefused(
                f"volume {vol.name}: disk {disk} has no LVM PV and is not blank "
                f"({verdict.reason}); " + REINIT_HINT
            )
    extended = False
    for step in plan.steps:
        if step == "pvcreate":
            lvm.pvcreate(disk_s)
            _window(CrashWindow.PV_CREATED)
        elif step == "vgcreate":
            lvm.vgcreate(disk_s, spec.vg)
            _window(CrashWindow.VG_CREATED)
        elif step == "lvcreate":
            lvm.lvcreate(disk_s, spec.vg, spec.lv, spec.size_bytes)
            _window(CrashWindow.LV_CREATED)
        elif step == "activate":
            lvm.activate(disk_s, spec.vg, spec.lv)
        elif step == "extend":
            lvm.extend(disk_s, spec.vg, spec.lv, spec.size_bytes)
            extended = True
            _window(CrashWindow.LV_EXTENDED)
    return lvm.dm_path(spec.vg, spec.lv), extended


def prepare_volume(
    vol: Volume,
    secret: Secret,
    *,
    disk: Path,
    runtime_dir: Path,
    mount_base: Path,
) -> PreparedVolume:
    """Open (or create, when allowed and provably blank) and mount one volume; idempotent."""

    device, _extended = _ensure_lvm(vol, disk) if vol.lvm is not None else (disk, False)
    mapper = mapper_name(vol.name)
    mapper_dev = Path("/dev/mapper") / mapper
    target = mount_base / vol.name
    created = False
    passphrase, mac_key = derive_keys(secret, vol.name)
    with passphrase, mac_key:
        area = _read_area(device)
        obs = _observe(area, vol, mac_key)
        verdict = blank.probe_blank(device) if obs.kind == "zero" else None
        decision = decide(obs, verdict, create=vol.create)
        if decision.action == "refuse":
            raise VolumeRefused(f"volume {vol.name}: {decision.reason}")
        if decision.action == "create":
            _format(device, vol, passphrase, mac_key)
            created = True
            area = _read_area(device)
            obs = _observe(area, vol, mac_key)
            if obs.kind != "cva" or obs.token_state != INITIALIZING:
                raise VolumeRefused(
                    f"volume {vol.name}: the header cva just wrote does not validate "
                    f"({'; '.join(obs.reasons)}); nothing was mounted"
                )
        initializing = obs.token_state == INITIALIZING
        with _header_copy(area, runtime_dir, vol.name) as copy:
            was_active = active_status(mapper) != "inactive"
            if not was_active:
                _activate(
                    device,
                    copy,
                    mapper,
                    passphrase,
                    read_only=vol.read_only and not initializing,
                    name=vol.name,
                )
            _check_table(mapper, vol, device)
            if initializing:
                _window(CrashWindow.OPENED_INITIALIZING)
                if mount.is_mounted(target):
                    raise VolumeRefused(
                        f"volume {vol.name}: {target} is mounted while the volume is still "
                        "initializing; unmount it and prepare again"
                    )
                fs.make_fs(mapper_dev, vol.filesystem, integrity=vol.integrity)
                _window(CrashWindow.MKFS_DONE)
                _mark_ready(device, copy, area, vol, mac_key)
                _window(CrashWindow.READY_WRITTEN)
                if vol.read_only:
                    _deactivate(mapper)
                    area = _read_area(device)
                    with _header_copy(area, runtime_dir, vol.name + ".ro") as ro_copy:
                        _activate(
                            device, ro_copy, mapper, passphrase, read_only=True, name=vol.name
                        )
                    _check_table(mapper, vol, device)
            elif was_active and vol.lvm is not None:
                # the LV may have grown while the mapping stayed up (crash window LV_EXTENDED)
                _crypt_resize(mapper, copy, passphrase)
                _check_table(mapper, vol, device)
        if _fs_bytes(vol, mapper_dev)[0] is None:
            _deactivate_if_unmounted(mapper, target)
            raise VolumeRefused(
                f"volume {vol.name}: no {vol.filesystem} superblock inside the volume; "
                "refusing to mount (the contract's filesystem must match the volume's)"
            )
        mount.mount_volume(mapper_dev, target, fs=vol.filesystem, read_only=vol.read_only)
        _window(CrashWindow.MOUNTED)
        if not vol.read_only:
            _grow_if_needed(vol, mapper_dev, target)
    return PreparedVolume(vol.name, State.MOUNTED, target, mapper_dev, mapper, created)


def _deactivate_if_unmounted(mapper: str, target: Path) -> None:
    if not mount.is_mounted(target):
        _deactivate(mapper)


def _fs_bytes(vol: Volume, mapper_dev: Path) -> tuple[int | None, int]:
    """(filesystem size from its superblock, device size); reads only the first 64 KiB."""
    fd = os.open(mapper_dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = blank.read_range(fd, 0, 65536)
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    return fs_size_bytes(vol.filesystem, head), size


def _grow_if_needed(vol: Volume, mapper_dev: Path, target: Path) -> None:
    current, size = _fs_bytes(vol, mapper_dev)
    if not needs_grow(current, size):
        return
    if vol.integrity and current is not None:
        fs.write_zeros(mapper_dev, fs.grow_prewrite_ranges(current, size))
    fs.grow_fs(vol.filesystem, mapper_dev, target)


def bind_volume(prepared: PreparedVolume, rootfs: Path, target: str, *, read_only: bool) -> Path:
    """MOUNTED -> BOUND for one container: bind the volume at `target` inside `rootfs`."""
    return mount.bind_into_rootfs(prepared.guest_path, rootfs, target, read_only=read_only)


def release_volume(
    vol: Volume,
    *,
    disk: Path,
    mount_base: Path,
    binds: Iterable[tuple[Path, str]] = (),
) -> None:
    """BOUND/MOUNTED/OPEN -> READY: unbind, unmount, close the mapping, deactivate the LV."""
    target = mount_base / vol.name
    if target.is_dir():
        for rootfs, in_container in binds:
            with contextlib.suppress(mount.MountError, FileNotFoundError):
                mount.unbind_from_rootfs(target, rootfs, in_container)
    mount.unmount(target)
    _deactivate(mapper_name(vol.name))
    if vol.lvm is not None:
        lvm.deactivate_lv(str(disk.resolve()), vol.lvm.vg, vol.lvm.lv)
