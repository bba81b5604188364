"""The SecureMount backend's life cycle: what it records, what a sweep releases, what a restarted
daemon finds. Storage and mounts are the in-memory stand-ins of tests.daemon_support (the real
ones run in the VM suite)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.rpc.ttrpc import Code, RpcError
from agent.securemount.decisions import DeviceIdentity, EphemeralMount, PersistentMount
from agent.securemount.records import MountRecord, dump_records, parse_records
from agent.securemount.volumes import ManagerSecureMountBackend
from agent.volumes import VolumeManager, VolumeState
from luks.ephemeral import EphemeralRefused
from tests.daemon_support import (
    FakeGuest,
    FakeKeySource,
    MemoryBackend,
    contract,
    make_bundle,
    volume,
)

PG = volume("pg")
PG_DEVICE = DeviceIdentity("/dev/vdb", 252, 16, "pg", "/sys/devices/pci0000:00/x/block/vdb")
SCRATCH = DeviceIdentity("/dev/vdc", 252, 32, "scratch", "/sys/devices/pci0000:00/y/block/vdc")
MOUNT = "/run/kata-containers/sandbox/storage/pg"
EMPTYDIR = "/run/kata-containers/sandbox/storage/emptydir"


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "state"
        self.headers = tmp_path / "headers"
        self.storage = MemoryBackend()
        self.keys = FakeKeySource()
        self.kata = tmp_path / "kata"
        self.manager = VolumeManager(
            contract(PG, allow=("PrepareVolumes", "ReleaseVolumes", "SecureMount")),
            self.storage,
            self.keys,
            rootfs_base=self.kata,
        )
        self.guest = FakeGuest({(252, 16): PG_DEVICE, (252, 32): SCRATCH})
        self.backend = self.restart()

    def restart(self) -> ManagerSecureMountBackend:
        """A new backend over the same state dir (what a restarted daemon builds)."""
        self.backend = ManagerSecureMountBackend(self.manager, self.state, ops=self.guest.ops())
        return self.backend

    def persistent(self, mount_point: str = MOUNT) -> PersistentMount:
        return PersistentMount(
            volume=PG, device=PG_DEVICE, mount_point=mount_point, read_only=False,
            allow_create=True,
        )  # fmt: skip

    def ephemeral(
        self, mount_point: str = EMPTYDIR, *, target: str = "filesystem"
    ) -> EphemeralMount:
        return EphemeralMount(
            device=SCRATCH,
            mapper_name="cva-eph-1",
            header_path=self.headers / "cva-eph-1.header",
            integrity=True,
            target=target,  # type: ignore[arg-type]
            filesystem="ext4",
            mkfs_args=("-E", "lazy_itable_init=0"),
            mount_point=mount_point,
            read_only=False,
        )

    def records(self) -> list[dict[str, str]]:
        path = self.state / "securemount" / "mounts.json"
        return json.loads(path.read_text()) if path.exists() else []


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def test_persistent_is_held_until_kata_unmounts_it(world: World) -> None:
    assert await world.backend.mount_persistent(world.persistent()) == MOUNT
    assert world.guest.binds == [(Path("/run/cva/volumes/pg"), Path(MOUNT), False)]
    assert world.guest.devices_bound == [Path("/dev/mapper/cva-pg")]  # checked by luks.mount
    [rec] = world.records()
    assert (rec["kind"], rec["name"], rec["state"], rec["devno"]) == (
        "persistent", "pg", "mounted", "252:16",
    )  # fmt: skip
    # a container bound and released in between does not close what SecureMount holds
    make_bundle(world.kata, "c1", "app")
    await world.manager.prepare("c1")
    await world.manager.release("c1")
    assert ("close", "pg") not in world.storage.calls
    [status] = await world.manager.list()
    assert status.state is VolumeState.BOUND and status.container_ids == ()
    # still mounted: a sweep keeps it; a repeated request is answered from the record
    await world.backend.sweep()
    assert await world.backend.mount_persistent(world.persistent()) == MOUNT
    assert world.keys.requests == [str(PG.key)]
    # kata-agent unmounts: the next sweep drops the holder and closes the volume
    world.guest.unmount(Path(MOUNT))
    await world.backend.sweep()
    assert ("close", "pg") in world.storage.calls
    assert world.records() == []


async def test_persistent_bind_failure_drops_the_holder(world: World) -> None:
    world.guest.fail_bind = OSError(13, "Permission denied")
    with pytest.raises(OSError, match="Permission denied"):
        await world.backend.mount_persistent(world.persistent())
    assert ("close", "pg") in world.storage.calls  # nothing else held it
    assert world.records() == []


async def test_persistent_mount_point_taken_by_another_volume_kind(world: World) -> None:
    await world.backend.mount_ephemeral(world.ephemeral(MOUNT))
    with pytest.raises(RpcError) as info:
        await world.backend.mount_persistent(world.persistent(MOUNT))
    assert info.value.rpc_code is Code.FAILED_PRECONDITION
    assert world.keys.requests == []


async def test_ephemeral_made_bound_recorded_then_released(world: World) -> None:
    assert await world.backend.mount_ephemeral(world.ephemeral()) == EMPTYDIR
    [spec] = world.guest.made
    mount_dir = world.state / "securemount" / "mnt" / "cva-eph-1"
    assert (spec.device, spec.mount_dir, spec.integrity) == (Path("/dev/vdc"), mount_dir, True)
    assert world.guest.binds == [(mount_dir, Path(EMPTYDIR), False)]
    assert world.guest.devices_bound == [Path("/dev/mapper/cva-eph-1")]  # checked by luks.mount
    [rec] = world.records()
    assert (rec["kind"], rec["state"], rec["header"]) == (
        "ephemeral", "mounted", str(world.headers / "cva-eph-1.header"),
    )  # fmt: skip
    world.guest.unmount(Path(EMPTYDIR))
    await world.backend.sweep()
    assert world.guest.released == ["cva-eph-1"]
    assert world.records() == []


async def test_ephemeral_refused_by_storage_is_failed_precondition(world: World) -> None:
    world.guest.fail_create = EphemeralRefused("/dev/vdc is not provably blank (...)")
    with pytest.raises(RpcError) as info:
        await world.backend.mount_ephemeral(world.ephemeral())
    assert info.value.rpc_code is Code.FAILED_PRECONDITION
    assert "not provably blank" in str(info.value)
    assert world.records() == []


async def test_ephemeral_bind_failure_releases_the_new_volume(world: World) -> None:
    world.guest.fail_bind = OSError(20, "Not a directory")
    with pytest.raises(OSError, match="Not a directory"):
        await world.backend.mount_ephemeral(world.ephemeral())
    assert world.guest.released == ["cva-eph-1"]
    assert world.records() == []


async def test_ephemeral_on_a_held_disk_is_refused_unless_it_is_cvas_own_in_place(
    world: World,
) -> None:
    held = dataclasses.replace(SCRATCH, holders=("dm-7",))
    plan = dataclasses.replace(world.ephemeral(), device=held)
    with pytest.raises(RpcError) as info:
        await world.backend.mount_ephemeral(plan)
    assert info.value.rpc_code is Code.FAILED_PRECONDITION
    assert "(device-in-use)" in str(info.value) and "dm-7" in str(info.value)
    assert world.guest.made == []
    # once cva's own volume is in place, the disk is held by it: asking again is still OK
    await world.backend.mount_ephemeral(world.ephemeral())
    assert await world.backend.mount_ephemeral(plan) == EMPTYDIR
    with pytest.raises(RpcError, match="device-in-use"):
        await world.backend.mount_ephemeral(dataclasses.replace(plan, mount_point="/run/x/y"))
    assert len(world.guest.made) == 1


async def test_persistent_on_a_disk_cva_already_holds_is_served(world: World) -> None:
    held = dataclasses.replace(PG_DEVICE, holders=("dm-1",))
    plan = dataclasses.replace(world.persistent(), device=held)
    assert await world.backend.mount_persistent(plan) == MOUNT
    assert await world.backend.mount_persistent(plan) == MOUNT


async def test_ephemeral_device_target_is_a_link(world: World) -> None:
    await world.backend.mount_ephemeral(world.ephemeral(target="device"))
    [spec] = world.guest.made
    assert spec.mount_dir is None
    assert world.guest.links == {Path(EMPTYDIR): Path("/dev/mapper/cva-eph-1")}
    assert await world.backend.mount_ephemeral(world.ephemeral(target="device")) == EMPTYDIR
    del world.guest.links[Path(EMPTYDIR)]
    await world.backend.sweep()
    assert world.guest.released == ["cva-eph-1"]


async def test_a_caller_that_gives_up_does_not_leave_a_half_made_volume(world: World) -> None:
    world.guest.create_gate = threading.Event()
    call = asyncio.create_task(world.backend.mount_ephemeral(world.ephemeral()))
    await asyncio.sleep(0.05)
    call.cancel()  # the ttRPC deadline passed
    with pytest.raises(asyncio.CancelledError):
        await call
    world.guest.create_gate.set()
    for _ in range(200):
        if world.records() and world.records()[0]["state"] == "mounted":
            break
        await asyncio.sleep(0.01)
    [rec] = world.records()
    assert rec["state"] == "mounted"
    assert world.guest.binds  # bound at the mount point after all
    # kata-agent's retry finds it in place
    world.guest.create_gate = None
    assert await world.backend.mount_ephemeral(world.ephemeral()) == EMPTYDIR
    assert len(world.guest.made) == 1


async def test_a_restarted_daemon_keeps_what_is_mounted(world: World) -> None:
    await world.backend.mount_ephemeral(world.ephemeral())
    await world.backend.mount_persistent(world.persistent())
    world.restart()
    await world.backend.sweep()
    assert world.guest.released == []
    assert {r["mount_point"] for r in world.records()} == {MOUNT, EMPTYDIR}
    # and still recognises a repeated request
    assert await world.backend.mount_ephemeral(world.ephemeral()) == EMPTYDIR
    assert len(world.guest.made) == 1


async def test_a_crash_while_creating_is_cleaned_up_at_start(world: World) -> None:
    creating = MountRecord(
        mount_point=EMPTYDIR, kind="ephemeral", name="cva-eph-9", devno="252:32",
        target="filesystem", source="/run/cva/securemount/mnt/cva-eph-9",
        header="/run/cva/securemount/headers/cva-eph-9.header", state="creating",
    )  # fmt: skip
    path = world.state / "securemount" / "mounts.json"
    path.parent.mkdir(parents=True)
    path.write_text(dump_records((creating,)))
    world.restart()
    await world.backend.sweep()
    assert world.guest.released == ["cva-eph-9"]
    assert world.records() == []


async def test_a_broken_records_file_starts_empty(world: World) -> None:
    path = world.state / "securemount" / "mounts.json"
    path.parent.mkdir(parents=True)
    path.write_text('[{"mount_point": "/x", "kind": "ephemeral"}, "junk"')
    world.restart()
    await world.backend.sweep()
    assert world.guest.released == []


GOOD = MountRecord(
    mount_point="/m", kind="ephemeral", name="cva-eph-1", devno="252:32", target="device",
    source="/dev/mapper/cva-eph-1", header="/run/cva/h", state="mounted",
)  # fmt: skip


def test_records_round_trip() -> None:
    assert parse_records(dump_records((GOOD,))) == ((GOOD,), 0)


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "other"},
        {"state": "gone"},
        {"target": "nfs"},
        {"devno": "252"},
        {"name": "../x"},
        {"mount_point": "relative"},
        {"source": "/a\x00b"},
        {"header": "h"},
        {"extra": "field"},
        {"name": 7},
    ],
)
def test_malformed_records_are_dropped(change: dict[str, object]) -> None:
    doc = json.loads(dump_records((GOOD,)))
    doc[0].update(change)
    doc.append(json.loads(dump_records((GOOD,)))[0])
    assert parse_records(json.dumps(doc)) == ((GOOD,), 1)


@given(st.text(max_size=400))
def test_records_parser_takes_any_text(text: str) -> None:
    records, dropped = parse_records(text)
    assert all(isinstance(r, MountRecord) for r in records)
    assert dropped >= 0


def test_deeply_nested_records_file() -> None:
    assert parse_records("[" * 100_000) == ((), 1)


class CountingSweeps:
    def __init__(self, fail_first: bool = False) -> None:
        self.sweeps = 0
        self.fail_first = fail_first

    async def sweep(self) -> None:
        self.sweeps += 1
        if self.fail_first and self.sweeps == 1:
            raise OSError(5, "Input/output error")


async def test_sweeper_runs_until_stopped_and_survives_a_failed_sweep() -> None:
    from agent.securemount.volumes import run_sweeper

    backend, stop = CountingSweeps(fail_first=True), asyncio.Event()
    task = asyncio.create_task(run_sweeper(backend, stop, interval=0.01))  # type: ignore[arg-type]
    for _ in range(200):
        if backend.sweeps >= 3:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert backend.sweeps >= 3
