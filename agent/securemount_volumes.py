"""The daemon's SecureMountBackend: CDH SecureMount requests served by the VolumeManager.

Persistent (a contract volume named by its key): the VolumeManager opens the volume exactly as
PrepareVolumes does (KBS key, open -- or create with cva's profile, only for `sourceType=empty`
and a contract volume with create = true -- mounted at its guest path), then
the guest path is bind-mounted at the request's `mount_point` (read-only when asked).

Ephemeral (no key: kata-agent's encrypted emptyDir): the storage layer has no ephemeral path yet
(random in-memory key + detached tmpfs header + format), so those requests are refused with
UNIMPLEMENTED naming what is missing; nothing is touched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from agent.blockdev import identify_block_device
from agent.securemount import DeviceIdentity, DeviceSelector, EphemeralMount, PersistentMount
from agent.ttrpc import Code, RpcError
from agent.volumes import VolumeManager
from luks.mount import bind_into_rootfs

BindMount = Callable[[Path, Path, bool], None]  # (source, target, read_only)
ResolveDevice = Callable[[DeviceSelector], DeviceIdentity]


def bind_mount(source: Path, target: Path, read_only: bool) -> None:
    """Bind `source` at guest path `target` with the storage layer's bind (luks.mount: missing
    directories created, symlinks resolved without escaping `/`, idempotent)."""
    bind_into_rootfs(source, Path("/"), str(target), read_only=read_only)


class ManagerSecureMountBackend:
    """SecureMountBackend over the daemon's VolumeManager (persistent volumes only)."""

    def __init__(
        self,
        manager: VolumeManager,
        *,
        resolve: ResolveDevice = identify_block_device,
        bind: BindMount = bind_mount,
    ) -> None:
        self._manager = manager
        self._resolve = resolve
        self._bind = bind

    async def resolve_device(self, selector: DeviceSelector) -> DeviceIdentity:
        return await asyncio.to_thread(self._resolve, selector)

    async def mount_persistent(self, plan: PersistentMount) -> str:
        opened = await self._manager.open_volume(plan.volume.name, allow_create=plan.allow_create)
        target = Path(plan.mount_point)
        await asyncio.to_thread(self._bind, opened.guest_path, target, plan.read_only)
        return plan.mount_point

    async def mount_ephemeral(self, plan: EphemeralMount) -> str:
        raise RpcError(
            Code.UNIMPLEMENTED,
            "SecureMount: ephemeral encrypted volumes need the storage layer's ephemeral path "
            "(random key, detached tmpfs header, format), which this cva build does not have",
        )
