"""Measured volumes in a TPM PCR (swtpm): cva's own AAEL log replays to the PCR, the write-ahead
entry recovers a crash before and after the extend, a log that does not explain the PCR is
refused, and `cva evidence events` verifies the log against the PCR value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import MeasureConfig
from agent.measure import MeasureError, Measurer
from evidence.eventlog import RecoveryAction, parse_log, replay
from evidence.measure_log import DirectLog, MeasureLogError, wal_path
from evidence.tpm import TpmAttester
from evidence.volume_event import VolumeOperation, parse_volume_content
from tests.conftest import run_cva
from tests.measure_support import Crash, ident

PCR = 23


class _Pcr:
    def __init__(self, tcti: str, pcr: int = PCR) -> None:
        self.tpm, self.pcr = TpmAttester(tcti), pcr

    def read(self) -> bytes:
        return self.tpm.read_pcr(self.pcr)

    def extend(self, digest: bytes) -> None:
        self.tpm.extend_pcr(self.pcr, digest)


def _measurer(tmp_path: Path, tcti: str) -> Measurer:
    return Measurer(
        MeasureConfig(sink="tpm", tcti=tcti),
        log_path=tmp_path / "eventlog",
        state_path=tmp_path / "measured.json",
        tee="tpm",
    )


def _replayed(log: Path) -> bytes:
    return replay(parse_log(log.read_bytes()))[PCR]


def test_events_replay_to_the_pcr_and_the_cli_verifies(tmp_path: Path, swtpm_tcti: str) -> None:
    m = _measurer(tmp_path, swtpm_tcti)
    m.start()
    m.opened(ident("pg"), created=True)
    m.closed("pg")
    m.opened(ident("pg"), created=False)
    log = tmp_path / "eventlog"
    events = parse_log(log.read_bytes())
    assert [(e.register, e.domain, e.operation) for e in events] == [
        (PCR, "cva", "volume-create"),
        (PCR, "cva", "volume-close"),
        (PCR, "cva", "volume-open"),
    ]
    assert parse_volume_content(VolumeOperation.OPEN, events[2].content).name == "pg"
    pcr = TpmAttester(swtpm_tcti).read_pcr(PCR)
    assert pcr == _replayed(log) != bytes(32)
    assert not wal_path(log).exists()

    ok = run_cva("evidence", "events", str(log), "--register", f"{PCR}={pcr.hex()}")
    assert ok.returncode == 0, ok.stderr.decode()
    doc = json.loads(ok.stdout)
    assert doc["verified"] is True and doc["registers"] == {str(PCR): pcr.hex()}
    assert [e["operation"] for e in doc["events"]] == [
        "volume-create",
        "volume-close",
        "volume-open",
    ]
    bad = run_cva("evidence", "events", str(log), "--register", f"{PCR}={bytes(32).hex()}")
    assert bad.returncode == 1 and json.loads(bad.stdout)["verified"] is False


@pytest.mark.parametrize(
    ("point", "action"),
    [("wal-written", RecoveryAction.EXTEND_THEN_WRITE), ("extended", RecoveryAction.REWRITE_ENTRY)],
)
def test_crash_between_wal_and_entry_recovers(
    tmp_path: Path, swtpm_tcti: str, crash_at: list[str], point: str, action: RecoveryAction
) -> None:
    log = tmp_path / "eventlog"
    first = DirectLog(log, _Pcr(swtpm_tcti), log_index=PCR)
    first.recover()
    first.record(_aael("a"))
    crash_at.append(point)
    with pytest.raises(Crash):
        first.record(_aael("b"))
    crash_at.clear()
    assert wal_path(log).exists()
    assert len(parse_log(log.read_bytes())) == 1
    # the next start finishes it
    again = DirectLog(log, _Pcr(swtpm_tcti), log_index=PCR)
    assert again.recover() is action
    assert not wal_path(log).exists()
    events = parse_log(log.read_bytes())
    assert [parse_volume_content(VolumeOperation.OPEN, e.content).name for e in events] == [
        "a",
        "b",
    ]
    assert TpmAttester(swtpm_tcti).read_pcr(PCR) == _replayed(log)
    again.record(_aael("c"))
    assert TpmAttester(swtpm_tcti).read_pcr(PCR) == _replayed(log)


def test_measurer_start_recovers_a_wal(
    tmp_path: Path, swtpm_tcti: str, crash_at: list[str]
) -> None:
    m = _measurer(tmp_path, swtpm_tcti)
    crash_at.append("wal-written")
    with pytest.raises(Crash):  # the process dies after writing the WAL
        m.opened(ident("pg"), created=True)
    crash_at.clear()
    restarted = Measurer(
        MeasureConfig(sink="auto", tcti="device:/nonexistent"),  # auto: cva's log exists -> tpm
        log_path=tmp_path / "eventlog",
        state_path=tmp_path / "measured.json",
        register_factory=lambda _tcti, pcr: _Pcr(swtpm_tcti, pcr),
        tee="tpm",
    )
    restarted.start()
    assert restarted.sink == "tpm"
    assert TpmAttester(swtpm_tcti).read_pcr(PCR) == _replayed(tmp_path / "eventlog")
    assert len(parse_log((tmp_path / "eventlog").read_bytes())) == 1


def test_another_writer_on_the_pcr_is_refused(tmp_path: Path, swtpm_tcti: str) -> None:
    log = tmp_path / "eventlog"
    d = DirectLog(log, _Pcr(swtpm_tcti), log_index=PCR)
    d.recover()
    d.record(_aael("a"))
    TpmAttester(swtpm_tcti).extend_pcr(PCR, bytes(32))  # someone else
    with pytest.raises(MeasureLogError, match="another writer"):
        d.record(_aael("b"))
    assert len(parse_log(log.read_bytes())) == 1
    with pytest.raises(MeasureLogError, match="another writer"):
        DirectLog(log, _Pcr(swtpm_tcti), log_index=PCR).recover()


def test_a_log_from_another_boot_refuses_start(tmp_path: Path, swtpm_tcti: str) -> None:
    d = DirectLog(tmp_path / "eventlog", _Pcr(swtpm_tcti), log_index=PCR)
    d.record(_aael("a"))
    with swtpm_fresh() as other_tcti:  # a new TPM: PCR 23 is zero again, the log is stale
        m = _measurer(tmp_path, other_tcti)
        with pytest.raises(MeasureError, match="measure-required"):
            m.start()


def _aael(name: str):  # type: ignore[no-untyped-def]
    from evidence.volume_event import volume_aael

    return volume_aael(ident(name).event(VolumeOperation.OPEN))


def swtpm_fresh():  # type: ignore[no-untyped-def]
    from tests.swtpm import swtpm_process

    return swtpm_process()


def test_tpm_unreachable_fails_closed_with_one_line(tmp_path: Path) -> None:
    m = Measurer(
        MeasureConfig(sink="tpm", tcti="swtpm:host=127.0.0.1,port=1"),
        log_path=tmp_path / "eventlog",
        state_path=tmp_path / "measured.json",
        tee="tpm",
    )
    with pytest.raises(MeasureError, match="measure-required") as err:
        m.opened(ident("pg"), created=True)
    assert "\n" not in err.value.message
    assert not m.is_measured("pg")
