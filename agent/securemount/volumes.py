"""The daemon's SecureMountBackend: CDH SecureMount requests served by cva's storage.

Persistent (a contract volume named by its key): the VolumeManager opens the volume exactly as
PrepareVolumes does (KBS key, open -- or create with cva's profile, only for `sourceType=empty`
and a contract volume with create = true -- mounted at its guest path), with the holder
`securemount:<mount_point>` recorded like a container binding; then the guest path is
bind-mounted at the request's `mount_point` (read-only when asked).

Ephemeral (no key: kata-agent's encrypted emptyDir): `luks.ephemeral` makes a fresh volume on
the (provably blank, unclaimed) disk -- random key only in libcryptsetup and then the kernel,
detached header in guest tmpfs -- mounted under `<state_dir>/securemount/mnt/<mapper>` and
bound at `mount_point` (targetType=device: a symlink to /dev/mapper/<mapper> instead).

Nothing in CDH's API unmounts: kata-agent unmounts `mount_point` itself when the container
goes. cva notices: every SecureMount call and a periodic `sweep` release what is no longer at
its mount point (ephemeral: unmount, deactivate -- the key is gone -- and delete the header;
persistent: drop the holder, and close the volume if no container still has it). What cva
served is recorded in tmpfs (`agent.securemount.records`), so a restarted daemon keeps
sweeping, and a record left "creating" by a crash is cleaned up at start.

Repeating a SecureMount that is already in place answers OK (kata-agent may retry); another
request for a mount point or a disk cva already serves is refused with FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import REFUSALS, CvaError
from agent.log import get_logger
from agent.mountpoints import MountRules
from agent.rpc.ttrpc import Code, RpcError
from agent.securemount.blockdev import identify_block_device
from agent.securemount.decisions import (
    DeviceIdentity,
    DeviceSelector,
    EphemeralMount,
    PersistentMount,
    SecureMountBackend,
    via_securemount,
)
from agent.securemount.records import MountRecord, RecordStore
from agent.volumes import HOLDER_PREFIX, VolumeManager
from luks import mount

if TYPE_CHECKING:  # luks.ephemeral (libcryptsetup, blkid, dm tables) loads at first use
    from agent.measure import Measurer
    from luks.ephemeral import EphemeralSpec, EphemeralVolume

log = get_logger("cva.securemount")

# (source, its device, target, read_only, rules) -> where it is
BindMount = Callable[[Path, Path, Path, bool, MountRules], Path]
LinkDevice = Callable[[Path, Path, MountRules], Path]  # (device, target, rules) -> where it is
ResolveDevice = Callable[[DeviceSelector], DeviceIdentity]
SWEEP_INTERVAL = 10.0  # seconds between sweeps for mounts kata-agent took away


def refuse_mount_point(resolved: str, requested: str, rules: MountRules) -> None:
    """The request's mount point passed the allow-list on its text; refuse it if the path the
    kernel resolved it to does not pass the same rule (a symlink on the way, e.g. a container
    image's link to /etc, cannot redirect the mount)."""
    refusal = rules.refusal(resolved)
    if refusal is not None:
        raise RpcError(
            Code.PERMISSION_DENIED,
            f"SecureMount refused (mount-point): {requested[:200]} resolves to {resolved[:200]}:"
            f" {refusal}",
        )


def refuse_directory(made: str, requested: str, rules: MountRules) -> None:
    """cva creates only the directories on the way to an allowed mount point."""
    refusal = rules.on_the_way(made)
    if refusal is not None:
        raise RpcError(
            Code.PERMISSION_DENIED,
            f"SecureMount refused (mount-point): making {made[:200]} for {requested[:200]}:"
            f" {refusal}",
        )


def bind_mount(
    source: Path, device: Path, target: Path, read_only: bool, rules: MountRules
) -> Path:
    """Bind `source` (the mount of `device`, checked by luks.mount) at guest path `target` with
    the storage layer's bind (luks.mount: missing directories created, symlinks resolved
    without escaping `/`, idempotent); returns where the kernel put it (the path the mount
    shows up at in mountinfo)."""
    return mount.bind_into_rootfs(
        source,
        Path("/"),
        str(target),
        device=device,
        read_only=read_only,
        check=lambda resolved: refuse_mount_point(resolved, str(target), rules),
        check_dir=lambda made: refuse_directory(made, str(target), rules),
    )


def _devno_of_fs(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def is_bound(source: Path, target: Path) -> bool:
    """True while `target` is a mount point of the filesystem mounted at `source`."""
    devno = _devno_of_fs(source)
    if devno is None:
        return False
    entries = mount.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    return any(e.devno == devno for e in mount.mounts_at(entries, str(target)))


def link_device(device: Path, target: Path, rules: MountRules) -> Path:
    """targetType=device: a symlink at `target` to the mapper device (CDH's behaviour). The
    parent is resolved with luks.mount's safe resolution; an existing entry is refused unless
    it already is this very link."""
    parent, name = target.parent, target.name
    if not name or name in (".", ".."):
        raise CvaError(f"mount point {target} cannot hold a device link")
    with contextlib.ExitStack() as stack:
        root = mount.open_rootfs(Path("/"))
        stack.callback(os.close, root)
        dir_fd = mount.resolve_in_rootfs(
            root,
            str(parent),
            create=True,
            check=lambda made: refuse_directory(made, str(target), rules),
        )
        stack.callback(os.close, dir_fd)
        where = Path(mount.fd_path(dir_fd)) / name
        refuse_mount_point(str(where), str(target), rules)
        try:
            os.symlink(device, name, dir_fd=dir_fd)
        except FileExistsError:
            try:
                existing = os.readlink(name, dir_fd=dir_fd)
            except OSError:
                existing = None
            if existing != str(device):
                raise CvaError(
                    f"mount point {target} already exists; SecureMount will not replace it"
                ) from None
    return where


def is_linked(device: Path, target: Path) -> bool:
    try:
        return str(target.readlink()) == str(device)
    except OSError:
        return False


def unlink_device(device: Path, target: Path) -> None:
    if is_linked(device, target):
        with contextlib.suppress(FileNotFoundError):
            target.unlink()


def create_ephemeral_volume(spec: EphemeralSpec) -> EphemeralVolume:
    from luks.ephemeral import create_ephemeral  # noqa: PLC0415 - lazy: first SecureMount

    return create_ephemeral(spec)


def release_ephemeral_volume(vol: EphemeralVolume) -> None:
    from luks.ephemeral import release_ephemeral  # noqa: PLC0415

    release_ephemeral(vol)


@dataclass(frozen=True)
class GuestOps:
    """The guest I/O the backend uses; tests replace what cannot run on the host."""

    resolve: ResolveDevice = identify_block_device
    bind: BindMount = bind_mount
    is_bound: Callable[[Path, Path], bool] = is_bound
    link: LinkDevice = link_device
    is_linked: Callable[[Path, Path], bool] = is_linked
    unlink: Callable[[Path, Path], None] = unlink_device
    create_ephemeral: Callable[[EphemeralSpec], EphemeralVolume] = create_ephemeral_volume
    release_ephemeral: Callable[[EphemeralVolume], None] = release_ephemeral_volume


def _ephemeral_of(record: MountRecord, mount_base: Path) -> EphemeralVolume:
    from luks.ephemeral import EphemeralVolume  # noqa: PLC0415

    fs_target = record.target == "filesystem"
    return EphemeralVolume(
        mapper=record.name,
        mapper_device=Path("/dev/mapper") / record.name,
        header=Path(record.header),
        mount_dir=mount_base / record.name if fs_target else None,
    )


class ManagerSecureMountBackend:
    """SecureMountBackend over the daemon's VolumeManager and luks.ephemeral."""

    def __init__(
        self,
        manager: VolumeManager,
        state_dir: Path | None = None,
        *,
        resolve: ResolveDevice | None = None,
        bind: BindMount | None = None,
        ops: GuestOps | None = None,
    ) -> None:
        base = ops or GuestOps()
        if resolve is not None:
            base = dataclasses.replace(base, resolve=resolve)
        if bind is not None:
            base = dataclasses.replace(base, bind=bind)
        self._ops = base
        self._manager = manager
        sm_dir = (state_dir or Path("/run/cva")) / "securemount"
        self._mount_base = sm_dir / "mnt"
        self._records = RecordStore(sm_dir / "mounts.json" if state_dir is not None else None)
        self._lock = asyncio.Lock()
        self._recovered = False
        self._tasks: set[asyncio.Task[str]] = set()

    # -- SecureMountBackend ------------------------------------------------------------------

    async def resolve_device(self, selector: DeviceSelector) -> DeviceIdentity:
        return await asyncio.to_thread(self._ops.resolve, selector)

    async def mount_persistent(self, plan: PersistentMount) -> str:
        return await self._shielded(self._mount_persistent(plan))

    async def mount_ephemeral(self, plan: EphemeralMount) -> str:
        return await self._shielded(self._mount_ephemeral(plan))

    async def _shielded(self, work: Coroutine[object, object, str]) -> str:
        """Run `work` as a task the caller's cancellation (a ttRPC deadline) cannot stop: a
        volume half made and never recorded as mounted would leak until the next start. A
        caller that gave up and retries finds it in place."""
        task = asyncio.create_task(work, name="cva-securemount")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _mount_persistent(self, plan: PersistentMount) -> str:
        async with self._lock:
            await self._sweep_locked()
            devno = f"{plan.device.major}:{plan.device.minor}"
            known = self._records.at(plan.mount_point)
            if known is not None:
                same = known.kind == "persistent" and known.name == plan.volume.name
                if same and await self._still_there(known):
                    return plan.mount_point
                raise _busy(f"mount point {plan.mount_point} is already served ({known.name})")
            named_disk = None
            if via_securemount(plan.volume):
                self._check_securemount_disk(plan, devno)
                named_disk = plan.device.path
            holder = HOLDER_PREFIX + plan.mount_point
            opened = await self._manager.open_volume(
                plan.volume.name, allow_create=plan.allow_create, holder=holder, device=named_disk
            )
            target = Path(plan.mount_point)
            try:
                where = await asyncio.to_thread(
                    self._ops.bind,
                    opened.guest_path,
                    Path(opened.device),
                    target,
                    plan.read_only,
                    plan.rules,
                )
            except BaseException:
                await self._manager.release_holder(plan.volume.name, holder)
                raise
            self._records.put(
                MountRecord(
                    mount_point=plan.mount_point,
                    kind="persistent",
                    name=plan.volume.name,
                    devno=devno,
                    target="filesystem",
                    source=str(opened.guest_path),
                    header="",
                    state="mounted",
                    bound_at=str(where),
                )
            )
            log.info("securemount_persistent", volume=plan.volume.name, at=plan.mount_point)
            return plan.mount_point

    def _check_securemount_disk(self, plan: PersistentMount, devno: str) -> None:
        """A `disk = "securemount"` volume goes on the disk the request names only if that disk
        backs nothing else cva serves, is not held by anything (unless it is this volume, open
        on it already), and the volume is not already open on another disk."""
        name = plan.volume.name
        mine = [r for r in self._records.all() if r.kind == "persistent" and r.name == name]
        elsewhere = [r for r in mine if r.devno != devno]
        if elsewhere:
            raise _busy(
                f"volume {name} is open on device {elsewhere[0].devno} (at "
                f"{elsewhere[0].mount_point}), not {plan.device.path} ({devno})"
            )
        others = [r for r in self._records.on_device(devno) if r.name != name]
        if others:
            raise _busy(
                f"device {plan.device.path} already backs {others[0].name} at "
                f"{others[0].mount_point}"
            )
        if plan.device.holders and not mine:
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"SecureMount refused (device-in-use): block device {plan.device.path} is in use"
                f" (held by {', '.join(plan.device.holders[:4])})",
            )

    async def _mount_ephemeral(self, plan: EphemeralMount) -> str:
        from luks.ephemeral import EphemeralRefused, EphemeralSpec  # noqa: PLC0415

        async with self._lock:
            await self._sweep_locked()
            devno = f"{plan.device.major}:{plan.device.minor}"
            known = self._records.at(plan.mount_point)
            if known is not None:
                same = known.kind == "ephemeral" and known.devno == devno
                if same and await self._still_there(known):
                    return plan.mount_point
                raise _busy(f"mount point {plan.mount_point} is already served ({known.name})")
            if plan.device.holders:
                raise RpcError(
                    Code.FAILED_PRECONDITION,
                    f"SecureMount refused (device-in-use): block device {plan.device.path} is in"
                    f" use (held by {', '.join(plan.device.holders[:4])}); an ephemeral volume"
                    " needs a disk nobody holds",
                )
            others = self._records.on_device(devno)
            if others:
                raise _busy(
                    f"device {plan.device.path} already backs {others[0].name} at "
                    f"{others[0].mount_point}"
                )
            fs_target = plan.target == "filesystem"
            spec = EphemeralSpec(
                device=Path(plan.device.path),
                mapper=plan.mapper_name,
                header=plan.header_path,
                integrity=plan.integrity,
                mount_dir=self._mount_base / plan.mapper_name if fs_target else None,
                mkfs_args=plan.mkfs_args,
                read_only=plan.read_only,
            )
            record = MountRecord(
                mount_point=plan.mount_point,
                kind="ephemeral",
                name=plan.mapper_name,
                devno=devno,
                target=plan.target,
                source=str(spec.mount_dir) if spec.mount_dir else f"/dev/mapper/{spec.mapper}",
                header=str(plan.header_path),
                state="creating",
            )
            self._records.put(record)
            try:
                made = await asyncio.to_thread(self._ops.create_ephemeral, spec)
            except EphemeralRefused as exc:
                self._records.drop(plan.mount_point)
                raise RpcError(Code.FAILED_PRECONDITION, str(exc)) from None
            except BaseException:
                self._records.drop(plan.mount_point)
                raise
            try:  # measured before anyone gets it; not measured -> released (fail closed)
                await asyncio.to_thread(self._measure_ephemeral, made, plan)
            except BaseException:
                await asyncio.to_thread(self._ops.release_ephemeral, made)
                self._records.drop(plan.mount_point)
                raise
            target = Path(plan.mount_point)
            try:
                if made.mount_dir is not None:
                    where = await asyncio.to_thread(
                        self._ops.bind,
                        made.mount_dir,
                        made.mapper_device,
                        target,
                        plan.read_only,
                        plan.rules,
                    )
                else:
                    where = await asyncio.to_thread(
                        self._ops.link, made.mapper_device, target, plan.rules
                    )
            except BaseException:
                await asyncio.to_thread(self._ops.release_ephemeral, made)
                self._records.drop(plan.mount_point)
                raise
            self._records.put(dataclasses.replace(record, state="mounted", bound_at=str(where)))
            log.info(
                "securemount_ephemeral",
                mapper=plan.mapper_name,
                device=plan.device.path,
                integrity=plan.integrity,
                at=plan.mount_point,
            )
            return plan.mount_point

    def records(self) -> tuple[MountRecord, ...]:
        """What SecureMount holds now (for `cva status`; no secret in a record)."""
        return self._records.all()

    async def sweep(self) -> None:
        """Release what kata-agent has taken away (and, the first time, crash leftovers)."""
        async with self._lock:
            await self._sweep_locked()

    # -- internals ---------------------------------------------------------------------------

    @property
    def _measurer(self) -> Measurer | None:
        return self._manager.measurer if self._manager is not None else None

    def _measure_ephemeral(self, made: EphemeralVolume, plan: EphemeralMount) -> None:
        measurer = self._measurer
        if measurer is None or not measurer.enabled:
            return
        from agent.measure import EPHEMERAL_KEY, MeasureError, VolumeIdentity  # noqa: PLC0415

        if not made.luks_uuid:
            raise MeasureError(
                f"ephemeral volume {made.mapper}: no header identity to measure"
                " (rule measure-required)"
            )
        ident = VolumeIdentity(
            made.mapper,
            made.luks_uuid,
            made.header_sha256,
            "ext4" if made.mount_dir is not None else "none",
            plan.read_only,
        )
        measurer.opened(ident, created=True, key=EPHEMERAL_KEY + made.mapper)

    async def _still_there(self, record: MountRecord) -> bool:
        where = Path(record.bound_at or record.mount_point)
        if record.target == "device":
            return await asyncio.to_thread(self._ops.is_linked, Path(record.source), where)
        return await asyncio.to_thread(self._ops.is_bound, Path(record.source), where)

    async def _sweep_locked(self) -> None:
        starting = not self._recovered
        self._recovered = True
        for record in self._records.all():
            if record.state == "mounted" and await self._still_there(record):
                continue
            if record.state == "creating" and not starting:
                continue  # cannot happen under the lock; never touch work in progress
            try:
                await self._release(record)
            except (*REFUSALS, OSError) as exc:
                log.warning(
                    "securemount_release_failed",
                    at=record.mount_point,
                    name=record.name,
                    error=str(exc),
                )

    async def _release(self, record: MountRecord) -> None:
        if record.kind == "persistent":
            closed = await self._manager.release_holder(
                record.name, HOLDER_PREFIX + record.mount_point
            )
            self._records.drop(record.mount_point)
            log.info("securemount_released", volume=record.name, closed=closed)
            return
        vol = _ephemeral_of(record, self._mount_base)
        if record.target == "device":
            where = Path(record.bound_at or record.mount_point)
            await asyncio.to_thread(self._ops.unlink, vol.mapper_device, where)
        await asyncio.to_thread(self._ops.release_ephemeral, vol)
        self._records.drop(record.mount_point)
        if self._measurer is not None:
            from agent.measure import EPHEMERAL_KEY  # noqa: PLC0415

            await asyncio.to_thread(self._measurer.closed, EPHEMERAL_KEY + record.name)
        log.info("securemount_released", mapper=record.name, was=record.state)


async def run_sweeper(
    backend: SecureMountBackend, stop: asyncio.Event, interval: float = SWEEP_INTERVAL
) -> None:
    """Sweep now and every `interval` seconds until `stop` is set."""
    while True:
        try:
            await backend.sweep()
        except Exception as exc:  # noqa: BLE001 - a sweep must never end the daemon
            log.warning("securemount_sweep_failed", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
            return


def _retrieve(task: asyncio.Task[str]) -> None:
    if not task.cancelled():
        task.exception()  # a caller that gave up must not leave it unread


def _busy(message: str) -> RpcError:
    return RpcError(Code.FAILED_PRECONDITION, f"SecureMount refused (in-use): {message}")
