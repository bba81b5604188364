"""Everything the daemon knows about the volumes it holds, gathered into one StatusReport.

Sources, all inside the daemon (nothing from the host decides what is shown): the
VolumeManager (contract volumes: state, holders, the blank-proof progress, what it opened),
the SecureMount records (ephemeral volumes and the mount points holding contract volumes), the
Measurer (LUKS UUID and seq of the header cva validated, the sink, each volume's last event),
the KBS key source (session state), and the guest's own sysfs and statvfs (the disk under a
mapping; filesystem size and use). Blocking reads run in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from agent import __version__
from agent.control.report import (
    BlankProof,
    EventReport,
    KbsReport,
    MeasureReport,
    StatusReport,
    VolumeReport,
)
from agent.volumes import HOLDER_PREFIX

if TYPE_CHECKING:
    from agent.measure import Measurer, VolumeIdentity
    from agent.securemount.records import MountRecord
    from agent.volumes import VolumeManager, VolumeStatus

SYS = Path("/sys")
_MAX_DEPTH = 8  # dm-crypt over an LV over a disk is 3; stacks deeper than this are not walked


@runtime_checkable
class SessionStateSource(Protocol):
    def session_state(self) -> tuple[str, float | None]: ...


Records = Callable[[], Sequence["MountRecord"]]


def _disk_of_node(node: Path) -> str | None:
    """Follow sysfs `slaves/` down from a block device's sysfs node to the disk at the bottom."""
    for _ in range(_MAX_DEPTH):
        try:
            node = node.resolve(strict=True)
            slaves = sorted((node / "slaves").iterdir()) if (node / "slaves").is_dir() else []
        except OSError:
            return None
        if not slaves:
            return "/dev/" + node.name
        node = slaves[0]
    return None


def backing_disk(device: str, sys_root: Path = SYS) -> str | None:
    """The disk under block device `device` (e.g. /dev/mapper/x -> /dev/vdb), or None."""
    try:
        st = Path(device).stat()
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return disk_of_devno(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", sys_root)


def disk_of_devno(devno: str, sys_root: Path = SYS) -> str | None:
    """The disk with (or under) MAJ:MIN `devno`, or None."""
    return _disk_of_node(sys_root / "dev" / "block" / devno)


def fs_usage(path: str) -> tuple[int | None, int | None]:
    """(size, used) in bytes of the filesystem mounted at `path`, or (None, None)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None, None
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


@dataclass(frozen=True)
class _Probe:
    """What the guest's sysfs/statvfs say about one mounted volume."""

    device: str | None = None
    size: int | None = None
    used: int | None = None


def _probe(mapper_device: str | None, devno: str | None, path: str | None) -> _Probe:
    device = None
    if mapper_device is not None:
        device = backing_disk(mapper_device)
    if device is None and devno is not None:
        device = disk_of_devno(devno)
    size, used = fs_usage(path) if path else (None, None)
    return _Probe(device, size, used)


def _event(measurer: Measurer | None, key: str) -> EventReport | None:
    last = measurer.last_event(key) if measurer is not None else None
    return None if last is None else EventReport(last.operation, last.sink, last.at)


def _identity(measurer: Measurer | None, key: str) -> VolumeIdentity | None:
    return measurer.identity(key) if measurer is not None else None


async def _contract_volume(
    manager: VolumeManager, st: VolumeStatus, records: Sequence[MountRecord]
) -> VolumeReport:
    vol = next(v for v in manager.contract.volumes if v.name == st.name)
    opened = manager.opened(st.name)
    measurer = manager.measurer
    ident = opened.identity if opened is not None and opened.identity else None
    ident = ident or _identity(measurer, st.name)
    held = tuple(
        HOLDER_PREFIX + r.mount_point
        for r in records
        if r.kind == "persistent" and r.name == st.name
    )
    mapper_dev = st.device or (opened.device if opened else None)
    path = str(st.guest_path) if st.guest_path is not None else None
    probe = await asyncio.to_thread(_probe, mapper_dev, None, path) if mapper_dev else _Probe()
    mapper = None
    if mapper_dev and mapper_dev.startswith("/dev/mapper/"):
        mapper = mapper_dev.removeprefix("/dev/mapper/")
    scan = st.scan
    return VolumeReport(
        name=st.name,
        kind="contract",
        state=st.state.value,
        holders=(*st.container_ids, *held),
        device=probe.device,
        mapper=mapper,
        luks_uuid=ident.luks_uuid if ident else None,
        seq=ident.sequence if ident else None,
        filesystem=vol.filesystem,
        guest_path=path,
        read_only=vol.read_only,
        size_bytes=probe.size,
        used_bytes=probe.used,
        blank_proof=BlankProof(scan.what, scan.done, scan.total) if scan else None,
        last_event=_event(measurer, st.name),
        grow=_grow(st),
    )


def _grow(st: VolumeStatus) -> str | None:
    if st.grow is None:
        return None
    return f"{st.grow.status}: {st.grow.reason}" if st.grow.reason else st.grow.status


async def _ephemeral_volume(measurer: Measurer | None, record: MountRecord) -> VolumeReport:
    from agent.measure import EPHEMERAL_KEY  # noqa: PLC0415

    key = EPHEMERAL_KEY + record.name
    ident = _identity(measurer, key)
    fs_target = record.target == "filesystem"
    path = record.source if fs_target and record.state == "mounted" else None
    probe = await asyncio.to_thread(_probe, f"/dev/mapper/{record.name}", record.devno, path)
    return VolumeReport(
        name=record.name,
        kind="ephemeral",
        state=record.state,
        holders=(HOLDER_PREFIX + record.mount_point,),
        device=probe.device,
        mapper=record.name,
        luks_uuid=ident.luks_uuid if ident else None,
        seq=None,
        filesystem="ext4" if fs_target else None,
        guest_path=path,
        read_only=ident.read_only if ident else False,
        size_bytes=probe.size,
        used_bytes=probe.used,
        last_event=_event(measurer, key),
    )


def _kbs(manager: VolumeManager) -> KbsReport:
    keys = manager.keys
    if isinstance(keys, SessionStateSource):
        state, expires = keys.session_state()
        return KbsReport(state, expires)
    return KbsReport("unknown")


def _measure(measurer: Measurer | None) -> MeasureReport:
    if measurer is None:
        return MeasureReport(None, enabled=False, required=False)
    return MeasureReport(measurer.sink, enabled=measurer.enabled, required=measurer.required)


async def collect(manager: VolumeManager, records: Records | None = None) -> StatusReport:
    """The status of every volume this daemon holds: the contract's, then SecureMount's
    ephemeral ones."""
    held: Sequence[MountRecord] = ()
    if records is not None:
        with contextlib.suppress(OSError):
            held = tuple(records())
    vols = [await _contract_volume(manager, st, held) for st in await manager.list()]
    for record in held:
        if record.kind == "ephemeral":
            vols.append(await _ephemeral_volume(manager.measurer, record))
    return StatusReport(
        version=__version__,
        kbs=_kbs(manager),
        measure=_measure(manager.measurer),
        volumes=tuple(vols),
    )
