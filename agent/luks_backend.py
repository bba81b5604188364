"""The production `VolumeBackend`: the storage stream's luks.* modules, one call per step.

Thin on purpose: the per-volume state machine (DESIGN §4), header validation (§6) and mounts
(§7) live in luks.volume / luks.mount / luks.disk; this adapter only wires them to the
orchestrator's protocol and reads the guest's own mount table (trusted) to find volumes that
are already mounted after a daemon restart.

The luks.* modules (libcryptsetup through ctypes, LVM, filesystems, header parsing) are imported
at the first storage step, not with this module: the daemon builds its backend before READY=1,
and finding an already mounted volume needs only the mount table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import DaemonConfig
from agent.errors import CvaError
from agent.mountinfo import MOUNTINFO, mount_source
from agent.volumes import GrowReport, OpenedVolume, Rekey, ScanProgress, VolumeState
from luks.errors import StorageError
from luks.secret import Secret

if TYPE_CHECKING:
    from agent.contract import Volume


class LuksBackend:
    def __init__(self, config: DaemonConfig) -> None:
        self._config = config
        self._runtime_dir = config.paths.state_dir
        self._mount_base = config.paths.mount_base

    def _guest_path(self, vol: Volume) -> Path:
        return self._mount_base / vol.name

    def current(self, vol: Volume) -> OpenedVolume | None:
        source = mount_source(MOUNTINFO.read_text(), self._guest_path(vol))
        if not source or not source.startswith("/dev/mapper/"):
            return None
        return OpenedVolume(vol.name, self._guest_path(vol), source, created=False)

    def open(
        self,
        vol: Volume,
        secret: Secret,
        progress: ScanProgress | None = None,
        previous: Callable[[], Secret] | None = None,
    ) -> OpenedVolume:
        from luks import volume as luks_volume  # noqa: PLC0415 - lazy: first storage step

        device = self._disk(vol)
        prepared = luks_volume.prepare_volume(
            vol,
            secret,
            disk=device,
            runtime_dir=self._runtime_dir,
            mount_base=self._mount_base,
            progress=progress,
            previous=previous,
        )
        from agent.measure import VolumeIdentity  # noqa: PLC0415

        identity = VolumeIdentity(
            vol.name,
            prepared.luks_uuid,
            prepared.header_sha256,
            vol.filesystem,
            vol.read_only,
            prepared.sequence,
        )
        rekeyed = prepared.rekeyed
        return OpenedVolume(
            vol.name,
            Path(prepared.guest_path),
            str(prepared.device),
            bool(prepared.created),
            identity,
            None if rekeyed is None else Rekey(rekeyed.old_key_id, rekeyed.new_key_id),
        )

    def _disk(self, vol: Volume) -> Path:
        from luks import disk as luks_disk  # noqa: PLC0415 - lazy: first storage step

        if vol.via_securemount:
            # the SecureMount request named it (agent.securemount: a whole disk found through
            # sysfs, not a contract volume's named disk, not held by anything else)
            return _securemount_disk(vol)
        if vol.disk.kind == "devno":  # a container's device, resolved from its spec
            return luks_disk.node_by_devno(vol.disk.value)
        return luks_disk.wait_for_disk(vol.disk, timeout=self._config.timeouts.disk_wait)

    def grow(self, vol: Volume, fetch_key: Callable[[], Secret]) -> GrowReport:
        from luks import grow as luks_grow  # noqa: PLC0415 - lazy: first storage step

        outcome = luks_grow.grow_mounted(
            vol,
            fetch_key,
            disk=self._disk(vol),
            runtime_dir=self._runtime_dir,
            mount_base=self._mount_base,
        )
        return GrowReport(outcome.status, outcome.reason, outcome.fs_bytes)

    def bind(self, vol: Volume, opened: OpenedVolume, rootfs: Path) -> None:
        from luks import mount as luks_mount  # noqa: PLC0415 - lazy: first storage step

        luks_mount.bind_into_rootfs(
            opened.guest_path,
            rootfs,
            vol.mount,
            device=Path(opened.device),
            read_only=vol.read_only,
        )

    def unbind(self, vol: Volume, rootfs: Path) -> None:
        guest = self._guest_path(vol)
        if rootfs.is_dir() and guest.is_dir():
            from luks import mount as luks_mount  # noqa: PLC0415 - lazy: first storage step

            luks_mount.unbind_from_rootfs(guest, rootfs, vol.mount)

    def close(self, vol: Volume) -> None:
        from luks import disk as luks_disk  # noqa: PLC0415 - lazy: first storage step
        from luks import volume as luks_volume  # noqa: PLC0415

        # the disk is needed only to deactivate the LV; a disk already gone fails that last step
        disk: Path | None
        if vol.via_securemount:  # a whole disk: no LV to deactivate
            disk = None
        elif vol.disk.kind in luks_disk.RESOLVED_PER_CONTAINER:
            try:
                disk = luks_disk.node_by_devno(vol.disk.value)
            except StorageError:
                disk = None
        else:
            disk = luks_disk.find(vol.disk)
        disk = disk or Path("/dev/null")
        luks_volume.release_volume(
            vol, disk=disk, mount_base=self._mount_base, runtime_dir=self._runtime_dir
        )

    def state(self, vol: Volume) -> VolumeState:
        # without the key the on-disk state is not inspected (the token MAC needs it)
        return VolumeState.MOUNTED if self.current(vol) is not None else VolumeState.CLOSED


def _securemount_disk(vol: Volume) -> Path:
    path = vol.disk.value
    if not path.startswith("/dev/") or "/../" in path or path.endswith("/.."):
        raise CvaError(f"volume {vol.name}: no usable device from its SecureMount request")
    return Path(path)
