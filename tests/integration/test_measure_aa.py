"""Measured volumes through the Attestation Agent: a fake AA on a unix socket (raw ttRPC, its own
framing) receives cva's ExtendRuntimeMeasurement requests, decoded with a descriptor built from
the upstream field numbers; the daemon's VolumeManager fails closed when the AA cannot measure."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.aa_client import AaUnavailable, extend_runtime_measurement
from agent.config import MeasureConfig
from agent.measure import MeasureError, Measurer
from agent.securemount.decisions import DeviceIdentity, EphemeralMount, PersistentMount
from agent.securemount.volumes import ManagerSecureMountBackend
from agent.volumes import VolumeManager
from evidence.volume_event import VolumeOperation, parse_volume_content
from tests.daemon_support import (
    FakeGuest,
    FakeKeySource,
    MemoryBackend,
    contract,
    make_bundle,
    volume,
)
from tests.fake_aa import FakeAA, upstream_classes


@pytest.fixture
def aa_path(tmp_path: Path) -> Path:
    return tmp_path / "aa.sock"


@pytest.fixture
def fake_aa(aa_path: Path) -> Iterator[FakeAA]:
    aa = FakeAA(aa_path)
    yield aa
    aa.close()


def _measurer(tmp_path: Path, aa_path: Path, **kw: object) -> Measurer:
    config = MeasureConfig(sink=str(kw.pop("sink", "aa")), aa_socket=aa_path, **kw)  # type: ignore[arg-type]
    return Measurer(config, log_path=tmp_path / "eventlog", state_path=tmp_path / "measured.json")


def _manager(tmp_path: Path, measurer: Measurer) -> tuple[VolumeManager, MemoryBackend]:
    backend = MemoryBackend()
    c = contract(volume("pg", containers=("postgres",)))
    m = VolumeManager(c, backend, FakeKeySource(), rootfs_base=tmp_path / "kata", measurer=measurer)
    make_bundle(tmp_path / "kata", "c1", "postgres")
    return m, backend


def test_request_is_byte_exact_upstream(fake_aa: FakeAA, aa_path: Path) -> None:
    req_cls = upstream_classes()[0]
    extend_runtime_measurement(aa_path, "cva", "volume-open", "v=1 name=x", None)
    extend_runtime_measurement(aa_path, "cva", "volume-close", "a b  c", 17)
    assert [(s, m) for s, m, _ in fake_aa.calls] == [
        ("attestation_agent.AttestationAgentService", "ExtendRuntimeMeasurement")
    ] * 2
    first, second = fake_aa.decoded()
    assert (first.Domain, first.Operation, first.Content) == ("cva", "volume-open", "v=1 name=x")
    assert not first.HasField("RegisterIndex")
    assert second.HasField("RegisterIndex") and second.RegisterIndex == 17
    # byte for byte what the upstream message serialises to (field order, proto3 presence)
    assert (
        fake_aa.calls[0][2]
        == req_cls(Domain="cva", Operation="volume-open", Content="v=1 name=x").SerializeToString()
    )
    assert (
        fake_aa.calls[1][2]
        == req_cls(
            Domain="cva", Operation="volume-close", Content="a b  c", RegisterIndex=17
        ).SerializeToString()
    )


@pytest.mark.parametrize("mode", ["not-enabled", "not-supported", "status", "close"])
def test_aa_refusals_are_one_line_errors(aa_path: Path, mode: str) -> None:
    aa = FakeAA(aa_path, mode)
    try:
        with pytest.raises(AaUnavailable) as err:
            extend_runtime_measurement(aa_path, "cva", "volume-open", "x", None, timeout=3)
        assert "\n" not in err.value.message
        if mode == "not-enabled":
            assert "NOT_ENABLED" in err.value.message and "enable_eventlog" in err.value.message
    finally:
        aa.close()


def test_silent_aa_hits_the_call_deadline(aa_path: Path) -> None:
    aa = FakeAA(aa_path, "silent")
    try:
        started = time.monotonic()
        with pytest.raises(AaUnavailable, match="deadline"):
            extend_runtime_measurement(aa_path, "cva", "volume-open", "x", None, timeout=0.5)
        assert time.monotonic() - started < 3
    finally:
        aa.close()


def test_aa_down_is_unavailable(aa_path: Path) -> None:
    with pytest.raises(AaUnavailable, match="cannot connect"):
        extend_runtime_measurement(aa_path, "cva", "volume-open", "x", None)


async def test_prepare_measures_before_the_bind_and_release_after_close(
    tmp_path: Path, fake_aa: FakeAA, aa_path: Path
) -> None:
    m, backend = _manager(tmp_path, _measurer(tmp_path, aa_path, pcr=17))
    seen_at_bind: list[int] = []
    bind = backend.bind

    def checking_bind(*args: object) -> None:
        seen_at_bind.append(len(fake_aa.calls))
        bind(*args)  # type: ignore[arg-type]

    backend.bind = checking_bind  # type: ignore[method-assign]
    await m.prepare("c1")
    assert seen_at_bind == [1], "the event reached the AA before the bind"
    await m.prepare("c1")  # idempotent: no second event
    await m.release("c1")
    reqs = fake_aa.decoded()
    assert [r.Operation for r in reqs] == ["volume-create", "volume-close"]
    assert all(r.Domain == "cva" and r.RegisterIndex == 17 for r in reqs)
    ev = parse_volume_content(VolumeOperation.CREATE, reqs[0].Content)
    assert ev.name == "pg" and ev.filesystem == "ext4" and ev.read_only is False
    assert reqs[0].Content.replace("volume-create", "") == reqs[1].Content


@pytest.mark.parametrize("mode", ["not-enabled", "down"])
async def test_prepare_fails_closed_when_the_aa_cannot_measure(
    tmp_path: Path, aa_path: Path, mode: str
) -> None:
    aa = FakeAA(aa_path, mode) if mode != "down" else None
    try:
        m, backend = _manager(tmp_path, _measurer(tmp_path, aa_path))
        with pytest.raises(MeasureError, match="measure-required"):
            await m.prepare("c1")
        ops = [op for op, _ in backend.calls]
        assert "bind" not in ops and ops[-1] == "close", ops
        assert not backend.mounted and not backend.bound
    finally:
        if aa is not None:
            aa.close()


async def test_not_required_hands_out_unmeasured(tmp_path: Path, aa_path: Path) -> None:
    m, backend = _manager(tmp_path, _measurer(tmp_path, aa_path, required=False))
    bound = await m.prepare("c1")
    assert [b.name for b in bound] == ["pg"] and backend.bound


async def test_restart_hands_out_only_measured_volumes(
    tmp_path: Path, fake_aa: FakeAA, aa_path: Path
) -> None:
    m, backend = _manager(tmp_path, _measurer(tmp_path, aa_path))
    await m.prepare("c1")
    # a restarted daemon: same tmpfs state, volume still mounted -> no new event, handed out
    again = VolumeManager(
        m.contract,
        backend,
        FakeKeySource(),
        rootfs_base=tmp_path / "kata",
        measurer=_measurer(tmp_path, aa_path),
    )
    await again.prepare("c1")
    assert len(fake_aa.calls) == 1
    # a daemon that lost the measurement (crash between open and measure) refuses it
    (tmp_path / "measured.json").unlink()
    lost = VolumeManager(
        m.contract,
        backend,
        FakeKeySource(),
        rootfs_base=tmp_path / "kata",
        measurer=_measurer(tmp_path, aa_path),
    )
    make_bundle(tmp_path / "kata", "c2", "postgres")
    with pytest.raises(MeasureError, match="no measurement"):
        await lost.prepare("c2")


async def test_sink_none_measures_nothing(tmp_path: Path, fake_aa: FakeAA, aa_path: Path) -> None:
    m, backend = _manager(tmp_path, _measurer(tmp_path, aa_path, sink="none"))
    await m.prepare("c1")
    assert backend.bound and not fake_aa.calls


async def test_auto_prefers_the_aa_socket(tmp_path: Path, fake_aa: FakeAA, aa_path: Path) -> None:
    measurer = _measurer(tmp_path, aa_path, sink="auto", tcti="device:/nonexistent")
    m, _backend = _manager(tmp_path, measurer)
    await m.prepare("c1")
    assert measurer.sink == "aa" and len(fake_aa.calls) == 1


async def test_auto_without_any_sink_fails_closed(tmp_path: Path, aa_path: Path) -> None:
    measurer = _measurer(tmp_path, aa_path, sink="auto", tcti="device:/nonexistent")
    m, backend = _manager(tmp_path, measurer)
    with pytest.raises(MeasureError, match="no measurement sink"):
        await m.prepare("c1")
    assert not backend.bound


# -- SecureMount (kata-agent's CDH calls), persistent and ephemeral ------------------------------

SCRATCH = DeviceIdentity("/dev/vdc", 252, 32, "scratch", "/sys/devices/pci0000:00/y/block/vdc")
PG_DEVICE = DeviceIdentity("/dev/vdb", 252, 16, "pg", "/sys/devices/pci0000:00/x/block/vdb")
EMPTYDIR = "/run/kata-containers/sandbox/storage/emptydir"
PG_MOUNT = "/run/kata-containers/sandbox/storage/pg"


def _securemount(
    tmp_path: Path, measurer: Measurer, fake_aa: FakeAA | None
) -> tuple[ManagerSecureMountBackend, FakeGuest, list[int]]:
    pg = volume("pg")
    manager = VolumeManager(
        contract(pg, allow=("SecureMount", "SecureMountEphemeral")),
        MemoryBackend(),
        FakeKeySource(),
        rootfs_base=tmp_path / "kata",
        measurer=measurer,
    )
    guest = FakeGuest({(252, 16): PG_DEVICE, (252, 32): SCRATCH})
    seen_at_bind: list[int] = []
    bind = guest.bind

    def checking_bind(*args: object) -> Path:
        seen_at_bind.append(len(fake_aa.calls) if fake_aa else -1)
        return bind(*args)  # type: ignore[arg-type]

    guest.bind = checking_bind  # type: ignore[method-assign]
    return (
        ManagerSecureMountBackend(manager, tmp_path / "state", ops=guest.ops()),
        guest,
        seen_at_bind,
    )


def _ephemeral(tmp_path: Path) -> EphemeralMount:
    return EphemeralMount(
        device=SCRATCH,
        mapper_name="cva-eph-1",
        header_path=tmp_path / "headers" / "cva-eph-1.header",
        integrity=True,
        target="filesystem",
        filesystem="ext4",
        mkfs_args=(),
        mount_point=EMPTYDIR,
        read_only=False,
    )


async def test_securemount_ephemeral_measured_before_bind_and_closed_after_release(
    tmp_path: Path, fake_aa: FakeAA, aa_path: Path
) -> None:
    backend, guest, seen = _securemount(tmp_path, _measurer(tmp_path, aa_path), fake_aa)
    assert await backend.mount_ephemeral(_ephemeral(tmp_path)) == EMPTYDIR
    assert seen == [1]
    guest.unmount(Path(EMPTYDIR))
    await backend.sweep()
    reqs = fake_aa.decoded()
    # their own operations (issue 21 #5c): never read as a contract volume's events
    assert [r.Operation for r in reqs] == ["ephemeral-create", "ephemeral-close"]
    ev = parse_volume_content(VolumeOperation.EPHEMERAL_CREATE, reqs[0].Content)
    assert (ev.name, ev.filesystem, ev.sequence) == ("cva-eph-1", "ext4", None)


async def test_securemount_ephemeral_fails_closed(tmp_path: Path, aa_path: Path) -> None:
    aa = FakeAA(aa_path, "not-enabled")
    try:
        backend, guest, seen = _securemount(tmp_path, _measurer(tmp_path, aa_path), aa)
        with pytest.raises(MeasureError, match="measure-required"):
            await backend.mount_ephemeral(_ephemeral(tmp_path))
        assert seen == [] and guest.released == ["cva-eph-1"]
        assert (
            not (tmp_path / "state" / "securemount" / "mounts.json").exists()
            or json.loads((tmp_path / "state" / "securemount" / "mounts.json").read_text()) == []
        )
    finally:
        aa.close()


async def test_securemount_persistent_measured_before_bind(
    tmp_path: Path, fake_aa: FakeAA, aa_path: Path
) -> None:
    backend, _guest, seen = _securemount(tmp_path, _measurer(tmp_path, aa_path), fake_aa)
    plan = PersistentMount(
        volume=volume("pg"), device=PG_DEVICE, mount_point=PG_MOUNT, read_only=False,
        allow_create=True,
    )  # fmt: skip
    assert await backend.mount_persistent(plan) == PG_MOUNT
    assert seen == [1]
    [req] = fake_aa.decoded()
    assert req.Operation == "volume-create" and '"name":"pg"' in req.Content
