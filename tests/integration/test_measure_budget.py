"""Issue 21 #5e: the host cannot fill cva's event log. Every open/close cycle it drives adds two
events; past the parser's limits (65,536 entries, 16 MiB) every later operation and cva's own
restart would fail for the boot. A per-boot budget (per contract volume, one pool for ephemeral
volumes) stops the host's cycles first, keeps the close of every open volume recordable, and
keeps the log small enough that a restarted cva starts and serves the volumes still open."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent.config import MeasureConfig
from agent.measure import (
    EPHEMERAL_KEY,
    MAX_CONTRACT_VOLUMES,
    EventBudget,
    MeasureError,
    Measurer,
    VolumeIdentity,
)
from evidence.eventlog import (
    ALG_SHA384,
    MAX_EVENTS,
    MAX_LOG_BYTES,
    encode_entry,
    parse_log,
    replay,
)
from evidence.volume_event import VolumeOperation, volume_aael
from tests.measure_support import ident

PCR = 23


class _SoftPcr:
    """A SHA-256 register in memory, shared by every Measurer of one test (one boot)."""

    def __init__(self) -> None:
        self.value = bytes(32)

    def read(self) -> bytes:
        return self.value

    def extend(self, digest: bytes) -> None:
        self.value = hashlib.sha256(self.value + digest).digest()


def _measurer(tmp_path: Path, pcr: _SoftPcr, **kw: object) -> Measurer:
    required = bool(kw.pop("required", True))
    return Measurer(
        MeasureConfig(sink="tpm", required=required),
        log_path=tmp_path / "eventlog",
        state_path=tmp_path / "measured.json",
        register_factory=lambda _t, _p: pcr,
        tee="tpm",
        **kw,  # type: ignore[arg-type]
    )


def _replays(tmp_path: Path, pcr: _SoftPcr) -> bool:
    return replay(parse_log((tmp_path / "eventlog").read_bytes()))[PCR] == pcr.value


def test_the_default_budget_keeps_cvas_log_under_the_parsers_limits() -> None:
    """At the largest event cva can write (longest operation, name, seq; SHA-384 entries)."""

    def largest(name: str, *, rekey: bool = False) -> int:
        sizes = []
        for op in VolumeOperation:
            if (op is VolumeOperation.REKEY) is not rekey:
                continue
            for fs in ("ext4", "xfs", "none"):
                uuid = "00000000-0000-0000-0000-000000000000"
                seq = None if op.ephemeral else (1 << 64) - 1
                event = VolumeIdentity(name, uuid, bytes(32), fs, False, seq)
                ids = (bytes(32), bytes(32)) if op is VolumeOperation.REKEY else (None, None)
                aael = volume_aael(event.event(op, *ids))  # a rekey carries both key ids
                sizes.append(len(encode_entry(4, ALG_SHA384, aael)))
        return max(sizes)

    budget = EventBudget()
    contract_volume = largest("a" * 31)  # agent.contract: [a-z0-9][a-z0-9-]{0,30}
    ephemeral = largest("m" * 128)  # evidence.volume_event: a name of up to 128 characters
    rekey = largest("a" * 31, rekey=True)  # the largest event, at most rekeys_per_volume times
    per_volume = (budget.per_volume - budget.rekeys_per_volume) * contract_volume
    per_volume += budget.rekeys_per_volume * rekey
    worst = MAX_CONTRACT_VOLUMES * per_volume
    worst += budget.ephemeral * ephemeral
    assert worst <= MAX_LOG_BYTES
    assert budget.total <= MAX_EVENTS
    assert budget.per_volume >= 2 * 128  # a crash-looping container gets many cycles per boot


def test_host_driven_cycles_stop_at_the_volume_budget(tmp_path: Path) -> None:
    pcr = _SoftPcr()
    m = _measurer(tmp_path, pcr)
    m.start()
    cycles = EventBudget().per_volume // 2
    for _ in range(cycles):
        m.opened(ident("pg"), created=False)
        m.closed("pg")
    with pytest.raises(MeasureError, match="events this boot allows for volume pg are used up"):
        m.opened(ident("pg"), created=False)
    assert not m.is_measured("pg")
    m.opened(ident("other"), created=False)  # another volume has its own budget
    assert m.is_measured("other") and _replays(tmp_path, pcr)


def test_a_restarted_cva_starts_keeps_counting_and_serves_open_volumes(tmp_path: Path) -> None:
    pcr = _SoftPcr()
    budget = EventBudget(per_volume=6, ephemeral=4)
    m = _measurer(tmp_path, pcr, budget=budget)
    m.opened(ident("pg"), created=True)
    m.closed("pg")
    m.opened(ident("pg"), created=False)
    m.closed("pg")
    m.opened(ident("pg"), created=False)  # 5 of 6: room for its close only
    restarted = _measurer(tmp_path, pcr, budget=budget)
    restarted.start()  # the log is within the parser's limits: cva starts
    assert restarted.is_measured("pg")  # the open volume is handed out again, no new event
    assert restarted.events_used("pg") == 5
    restarted.closed("pg")  # the close always fits
    assert restarted.events_used("pg") == 6 and not restarted.is_measured("pg")
    with pytest.raises(MeasureError, match="used up"):
        restarted.opened(ident("pg"), created=False)
    assert _replays(tmp_path, pcr)
    ops = [e.operation for e in parse_log((tmp_path / "eventlog").read_bytes())]
    assert ops.count("volume-close") == 3


def test_ephemeral_volumes_share_one_pool_whatever_their_mapper_name(tmp_path: Path) -> None:
    pcr = _SoftPcr()
    m = _measurer(tmp_path, pcr, budget=EventBudget(per_volume=4, ephemeral=4))
    for mapper in ("e1", "e2"):
        m.opened(ident(mapper), created=True, key=EPHEMERAL_KEY + mapper)
    with pytest.raises(MeasureError, match="for ephemeral volumes are used up"):
        m.opened(ident("e3"), created=True, key=EPHEMERAL_KEY + "e3")
    m.opened(ident("pg"), created=True)  # contract volumes are not in that pool
    for mapper in ("e1", "e2"):
        m.closed(EPHEMERAL_KEY + mapper)
    assert not m.is_measured(EPHEMERAL_KEY + "e1") and _replays(tmp_path, pcr)


def test_not_required_only_warns_at_the_budget(tmp_path: Path) -> None:
    m = _measurer(tmp_path, _SoftPcr(), required=False, budget=EventBudget(per_volume=2))
    m.opened(ident("pg"), created=True)
    m.closed("pg")
    m.opened(ident("pg"), created=False)  # over: logged, handed out unmeasured
    assert m.events_used("pg") == 2


def test_a_damaged_budget_file_refuses(tmp_path: Path) -> None:
    (tmp_path / "measure-budget.json").write_text('{"pg": -1}')
    with pytest.raises(MeasureError, match="malformed"):
        _measurer(tmp_path, _SoftPcr())


def test_rekeys_are_bounded_per_volume(tmp_path: Path) -> None:
    """A host that puts a header under the previous key back after every rotation gets
    `rekeys_per_volume` rotations per boot, then a refusal naming it (the log stays bounded)."""
    pcr = _SoftPcr()
    m = _measurer(tmp_path, pcr)
    m.start()
    ids = (b"\x01" * 32, b"\x02" * 32)
    for _ in range(EventBudget().rekeys_per_volume):
        m.record(VolumeOperation.REKEY, ident("pg"), key_ids=ids)
    with pytest.raises(MeasureError, match="key rotations this boot are used up"):
        m.record(VolumeOperation.REKEY, ident("pg"), key_ids=ids)
    m.opened(ident("pg"), created=False)  # the volume's other events still count normally
