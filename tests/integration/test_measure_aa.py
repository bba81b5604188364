"""Measured volumes through the Attestation Agent: a fake AA on a unix socket (raw ttRPC, its own
framing) receives cva's ExtendRuntimeMeasurement requests, decoded with a descriptor built from
the upstream field numbers; the daemon's VolumeManager fails closed when the AA cannot measure."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.aa_client import AaUnavailable, extend_runtime_measurement
from agent.config import MeasureConfig
from agent.measure import MeasureError, Measurer
from agent.volumes import VolumeManager
from evidence.volume_event import VolumeOperation, parse_volume_content
from tests.daemon_support import FakeKeySource, MemoryBackend, contract, make_bundle, volume
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
