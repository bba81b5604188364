"""Online grow of a mounted volume whose disk the host enlarged (the shell of luks.grow_plan).

Called by the daemon after a block `change` uevent with RESIZE=1 for the volume's disk (and
runnable by hand). Under the volume's lock (the same one prepare/release take), it observes
(disk, PV, VG, LV, mapping and filesystem sizes), asks luks.grow_plan.next_step, runs that one
step, and observes again, at most MAX_STEPS times:

    pvresize -> lvextend (size = "max" only, or up to a larger contract size) -> crypt_resize
    -> resize2fs / xfs_growfs (online, on the mountpoint)

Each step is idempotent and chosen from a fresh observation, so a crash between two of them
(windows GROW_PV_RESIZED, GROW_LV_EXTENDED, GROW_MAPPING_RESIZED, GROW_FS_GROWN in
luks.volume) is finished by the next uevent or by the next open, which runs the same checks.

The mapping's volume key lives in the kernel keyring form of the dm-crypt table (LUKS2), so
libcryptsetup's crypt_resize needs it loaded again from a keyslot: `fetch_key` is called only
when the crypt-resize step is due (the daemon fetches the volume's key from the KBS through its
attested session); the secret is wiped right after. The resize uses the header cva validated
now (token MAC), and only when it is the one the mapping was activated from (its mapping
record: LUKS UUID and header digest, and the kernel's dm UUID), as the kept-mapping resize at
open does. Never shrink; integrity volumes and read-only mounts are refused with their reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from luks import blank, fs, lvm, mapping_record, mount
from luks.grow_plan import GrowFacts, GrowStep, LvmFacts, next_step
from luks.header import parse_luks2
from luks.secret import Secret
from luks.spec import VolumeSpec
from luks.token import derive_keys, metadata_sha256
from luks.volume import (
    _check_table,
    _crypt_resize,
    _grow_if_needed,
    _observe,
    _read_area,
    _superblock,
    _volume_lock,
    _window,
)
from luks.volume_plan import READY, CrashWindow, VolumeRefused, fs_size_bytes, mapper_name

_log = structlog.get_logger()
_LOGGER = "cva.luks.grow"
MAX_STEPS = 6  # pvresize, lvextend, crypt-resize, fs-grow, and slack for a racing host

GrowStatus = Literal["grown", "unchanged", "refused", "not-mounted"]
FetchKey = Callable[[], Secret]
_WINDOWS: dict[GrowStep, CrashWindow] = {
    "pvresize": CrashWindow.GROW_PV_RESIZED,
    "lvextend": CrashWindow.GROW_LV_EXTENDED,
    "crypt-resize": CrashWindow.GROW_MAPPING_RESIZED,
    "fs-grow": CrashWindow.GROW_FS_GROWN,
}


@dataclass(frozen=True)
class GrowOutcome:
    name: str
    status: GrowStatus
    steps: tuple[GrowStep, ...] = ()
    reason: str = ""  # refused: why
    fs_bytes: int | None = None  # the mounted filesystem's size afterwards (statvfs)


def _mounted_fs_bytes(target: Path) -> int | None:
    """What the kernel reports for the mounted filesystem (statvfs), as `df` shows it."""
    try:
        st = os.statvfs(target)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


def _device_bytes(path: Path) -> int:
    return blank.device_size(path)


def _fs_bytes(vol: VolumeSpec, mapper_dev: Path, target: Path) -> int | None:
    """The mounted filesystem's size: xfs from the kernel (its superblock on the disk lags after
    a grow), ext4 from its superblock (read through the page cache ext4 writes it in)."""
    if vol.filesystem == "xfs":
        return fs.mounted_xfs_bytes(target)
    head, _size = _superblock(mapper_dev)
    return fs_size_bytes(vol.filesystem, head) if head is not None else None


def observe(vol: VolumeSpec, disk: Path, mapper_dev: Path, target: Path) -> GrowFacts:
    """The sizes of one mounted volume, as the guest sees them now."""
    disk_s = str(disk.resolve())
    lvm_facts = None
    if vol.lvm is not None:
        state = lvm.read_state(disk_s)
        pv = next((p for p in state.pvs if p.name == disk_s), None)
        group = next((g for g in state.vgs if g.name == vol.lvm.vg), None)
        lv = next((v for v in state.lvs if v.vg == vol.lvm.vg and v.name == vol.lvm.lv), None)
        if pv is None or group is None or lv is None or pv.vg != vol.lvm.vg:
            raise VolumeRefused(
                f"volume {vol.name}: LVM no longer shows {vol.lvm.vg}/{vol.lvm.lv} on {disk_s}; "
                "not grown"
            )
        lvm_facts = LvmFacts(
            pv_bytes=pv.size,
            extent_bytes=group.extent_size,
            vg_free_bytes=group.free,
            lv_bytes=lv.size,
            lv_target=vol.lvm.size_bytes,
        )
    return GrowFacts(
        disk_bytes=_device_bytes(Path(disk_s)),
        lvm=lvm_facts,
        mapping_bytes=_device_bytes(mapper_dev),
        fs_bytes=_fs_bytes(vol, mapper_dev, target),
        integrity=vol.integrity,
        read_only=vol.read_only,
    )


def _resize_mapping(
    vol: VolumeSpec, device: Path, mapper: str, runtime_dir: Path, fetch_key: FetchKey
) -> None:
    """crypt_resize from the validated header, only the one the mapping was activated from."""
    record = mapping_record.load(runtime_dir, vol.name)
    if record is None or not record.complete:
        raise VolumeRefused(
            f"volume {vol.name}: no complete mapping record; release and prepare it again to grow"
        )
    if mapping_record.live_dm_uuid(mapper) != mapping_record.dm_uuid(record.luks_uuid, mapper):
        raise VolumeRefused(
            f"volume {vol.name}: the mapping's dm UUID does not name its recorded header; "
            "not grown (release the volume and prepare again)"
        )
    secret = fetch_key()
    try:
        passphrase, mac_key = derive_keys(secret, vol.name)
    finally:
        secret.wipe()
    with passphrase, mac_key:
        area = _read_area(device)
        obs = _observe(area, vol, mac_key)
        if obs.kind != "cva" or obs.token_state != READY:
            raise VolumeRefused(
                f"volume {vol.name}: the disk's header does not validate now "
                f"({'; '.join(obs.reasons) or obs.token_state}); not grown"
            )
        validated = parse_luks2(area)
        if (validated.uuid, metadata_sha256(validated)) != (
            record.luks_uuid,
            record.header_sha256,
        ):
            raise VolumeRefused(
                f"volume {vol.name}: the disk's header is not the one the mapping was activated "
                "from; not grown (release the volume and prepare again)"
            )
        _crypt_resize(device, area, mapper, passphrase)
    _check_table(mapper, vol, device)


def grow_mounted(
    vol: VolumeSpec,
    fetch_key: FetchKey,
    *,
    disk: Path,
    runtime_dir: Path,
    mount_base: Path,
) -> GrowOutcome:
    """Grow volume `vol` (mounted at mount_base/<name>) to its grown disk; see the module doc.
    The decision's refusals (shrink, integrity, read-only) are returned and logged, with nothing
    touched for them; a failed step or a header that is not the mapping's raises (the caller
    reports it; the next event or open starts again from fresh sizes)."""
    mapper = mapper_name(vol.name)
    mapper_dev = Path("/dev/mapper") / mapper
    target = mount_base / vol.name
    done: list[GrowStep] = []
    with _volume_lock(runtime_dir, vol.name):
        if not mapper_dev.exists() or not mount.is_mounted(target, mapper_dev):
            return GrowOutcome(vol.name, "not-mounted")
        device = lvm.dm_path(vol.lvm.vg, vol.lvm.lv) if vol.lvm is not None else disk
        for _ in range(MAX_STEPS):
            facts = observe(vol, disk, mapper_dev, target)
            decision = next_step(facts)
            if decision.refusal is not None:
                _log.warning(
                    "volume not grown",
                    logger=_LOGGER,
                    volume=vol.name,
                    reason=decision.refusal,
                    done=list(done),
                )
                return GrowOutcome(vol.name, "refused", tuple(done), decision.refusal)
            step = decision.step
            if step is None:
                break
            if step == "fs-grow" and step in done:
                # the grow tool succeeded once in this run; a size that still looks short
                # is a lagging superblock copy, not a reason to run it again
                break
            if step in done:  # no progress from the same step twice: stop, the next event retries
                raise VolumeRefused(
                    f"volume {vol.name}: grow step {step} made no progress; not retried now"
                )
            _log.info("growing volume", logger=_LOGGER, volume=vol.name, step=step)
            disk_s = str(disk.resolve())
            if step == "pvresize":
                lvm.pvresize(disk_s)
            elif step == "lvextend":
                assert vol.lvm is not None  # next_step plans lvextend only with LVM
                lvm.extend(disk_s, vol.lvm.vg, vol.lvm.lv, vol.lvm.size_bytes)
            elif step == "crypt-resize":
                _resize_mapping(vol, device, mapper, runtime_dir, fetch_key)
            else:
                _grow_if_needed(vol, mapper_dev, target)
            done.append(step)
            _window(_WINDOWS[step])
        fs_bytes = _mounted_fs_bytes(target)
    if done:
        _log.info(
            "volume grown", logger=_LOGGER, volume=vol.name, steps=list(done), fs_bytes=fs_bytes
        )
    return GrowOutcome(vol.name, "grown" if done else "unchanged", tuple(done), "", fs_bytes)
