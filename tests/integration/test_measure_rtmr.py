"""Measured volumes in TDX RTMR3 (the kernel's TSM measurement sysfs, Linux >= 6.16), against the
faithful fake of that ABI (tests/fake_kernel.FakeTdxMeasurements: 48-byte writes only, extend =
SHA-384(old || data) like the TDX module): events extend the fake RTMR3, cva's SHA-384 log
replays to it, `cva evidence events --register 4=HEX` verifies it, a crash between the WAL and
the extend recovers, `auto` picks the sink from the image's TEE decision, and a missing or
malformed sysfs fails closed with one line."""

from __future__ import annotations

import errno
import hashlib
import json
import socket
from pathlib import Path

import pytest

from agent.config import MeasureConfig
from agent.measure import RTMR_INDEX, MeasureError, Measurer, VolumeIdentity
from evidence import measure_log
from evidence.errors import AttesterUnavailable, EvidenceError
from evidence.eventlog import ALG_SHA384, RecoveryAction, parse_log, replay
from evidence.measure_log import wal_path
from evidence.tdx_rtmr import TdxRtmr, pcr_to_ccmr, rtmr_path
from evidence.volume_event import VolumeOperation, parse_volume_content
from tests.conftest import run_cva
from tests.fake_kernel import FakeTdxMeasurements
from tests.measure_support import Crash, ident

CCMR = 4  # the log's register index for RTMR3 (CC MR index, as the AA writes it)


@pytest.fixture
def tdx(tmp_path: Path) -> FakeTdxMeasurements:
    return FakeTdxMeasurements(tmp_path / "root")


def _ident(name: str) -> VolumeIdentity:
    return ident(name, 3)


def _measurer(
    tmp_path: Path, fake: FakeTdxMeasurements | None, sink: str = "rtmr", **kw: object
) -> Measurer:
    root = fake.root if fake is not None else tmp_path / "old-kernel"
    config = MeasureConfig(
        sink=sink,
        aa_socket=tmp_path / "aa.sock",
        tcti=str(kw.pop("tcti", "device:/nonexistent")),
        **kw,  # type: ignore[arg-type]
    )
    return Measurer(
        config,
        log_path=tmp_path / "eventlog",
        state_path=tmp_path / "measured.json",
        tee="tdx",
        rtmr_factory=lambda i: TdxRtmr(i, root=root, fs=fake),
    )


def _replayed(log: Path) -> bytes:
    return replay(parse_log(log.read_bytes()))[CCMR]


# -- the ABI -----------------------------------------------------------------------------------


def test_rtmr_extend_is_sha384_of_old_and_digest(tdx: FakeTdxMeasurements) -> None:
    r = TdxRtmr(3, root=tdx.root, fs=tdx)
    assert r.available() and r.read() == bytes(48)
    digest = hashlib.sha384(b"event").digest()
    r.extend(digest)
    assert r.read() == hashlib.sha384(bytes(48) + digest).digest() == tdx.rtmrs[3]
    assert tdx.writes == [(3, digest)] and tdx.rtmrs[2] == bytes(48)


def test_the_fake_refuses_what_the_kernel_refuses(tdx: FakeTdxMeasurements) -> None:
    with pytest.raises(OSError, match="Invalid argument"):
        tdx.write(rtmr_path(3, tdx.root), bytes(47))
    with pytest.raises(PermissionError):
        tdx.write(tdx.base / "mrconfigid", bytes(48))
    assert tdx.rtmrs[3] == bytes(48)


def test_pcr_to_ccmr_is_the_aas_tdx_mapping() -> None:
    table = {1: 1, 7: 1, 2: 2, 6: 2, 8: 3, 15: 3, 16: 4, 17: 4, 23: 4, 0: 4}
    assert {p: pcr_to_ccmr(p) for p in table} == table
    assert pcr_to_ccmr(23) - 1 == RTMR_INDEX


@pytest.mark.parametrize("size", [0, 32, 47, 49, 64])
def test_wrong_size_digest_is_refused_before_the_kernel(
    tdx: FakeTdxMeasurements, size: int
) -> None:
    with pytest.raises(EvidenceError, match="48-byte") as err:
        TdxRtmr(3, root=tdx.root, fs=tdx).extend(bytes(size))
    assert "\n" not in err.value.message and not tdx.writes


@pytest.mark.parametrize("size", [0, 32, 47, 49, 100])
def test_wrong_size_value_is_refused(tmp_path: Path, size: int) -> None:
    path = rtmr_path(3, tmp_path)  # a plain file, not the kernel's attribute (RealMrFs)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x01" * size)
    with pytest.raises(AttesterUnavailable, match="an RTMR has 48") as err:
        TdxRtmr(3, root=tmp_path).read()
    assert "\n" not in err.value.message


def test_real_fs_reads_and_writes_a_plain_file(tmp_path: Path) -> None:
    path = rtmr_path(1, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x07" * 48)
    r = TdxRtmr(1, root=tmp_path)
    assert r.read() == b"\x07" * 48
    r.extend(b"\x09" * 48)  # a plain file just takes the bytes: the write is one 48-byte write
    assert path.read_bytes() == b"\x09" * 48


def test_old_kernel_without_the_sysfs_is_unavailable(tmp_path: Path) -> None:
    r = TdxRtmr(3, root=tmp_path)
    assert not r.available()
    with pytest.raises(AttesterUnavailable, match=r"6\.16") as err:
        r.read()
    assert "\n" not in err.value.message and "missing" in err.value.message


def test_kernel_errors_are_one_line(tdx: FakeTdxMeasurements) -> None:
    tdx.fail_write = errno.EIO
    with pytest.raises(AttesterUnavailable, match="EIO") as err:
        TdxRtmr(3, root=tdx.root, fs=tdx).extend(bytes(48))
    assert "\n" not in err.value.message
    with pytest.raises(EvidenceError, match=r"RTMR0\.\.3"):
        TdxRtmr(4, root=tdx.root, fs=tdx)


# -- the rtmr sink -----------------------------------------------------------------------------


def test_events_extend_rtmr3_and_the_cli_verifies(tmp_path: Path, tdx: FakeTdxMeasurements) -> None:
    m = _measurer(tmp_path, tdx)
    m.start()
    m.opened(_ident("pg"), created=True)
    m.closed("pg")
    m.opened(_ident("pg"), created=False)
    log = tmp_path / "eventlog"
    events = parse_log(log.read_bytes())
    assert [(e.register, e.alg, e.operation) for e in events] == [
        (CCMR, ALG_SHA384, "volume-create"),
        (CCMR, ALG_SHA384, "volume-close"),
        (CCMR, ALG_SHA384, "volume-open"),
    ]
    assert parse_volume_content(VolumeOperation.OPEN, events[2].content).name == "pg"
    assert [i for i, _ in tdx.writes] == [3, 3, 3]
    assert tdx.rtmrs[3] == _replayed(log) != bytes(48)
    assert tdx.rtmrs[:3] == [bytes(48)] * 3  # RTMR0-2 (firmware, boot) untouched
    assert not wal_path(log).exists() and m.sink == "rtmr"

    rtmr3 = tdx.rtmrs[3].hex()
    ok = run_cva("evidence", "events", str(log), "--register", f"{CCMR}={rtmr3}")
    assert ok.returncode == 0, ok.stderr.decode()
    doc = json.loads(ok.stdout)
    assert doc["verified"] is True and doc["registers"] == {str(CCMR): rtmr3}
    bad = run_cva("evidence", "events", str(log), "--register", f"{CCMR}={bytes(48).hex()}")
    assert bad.returncode == 1 and json.loads(bad.stdout)["verified"] is False


@pytest.mark.parametrize(
    ("point", "action"),
    [("wal-written", RecoveryAction.EXTEND_THEN_WRITE), ("extended", RecoveryAction.REWRITE_ENTRY)],
)
def test_crash_between_wal_and_extend_recovers(
    tmp_path: Path,
    tdx: FakeTdxMeasurements,
    crash_at: list[str],
    point: str,
    action: RecoveryAction,
) -> None:
    m = _measurer(tmp_path, tdx)
    m.start()
    m.opened(_ident("a"), created=True)
    crash_at.append(point)
    with pytest.raises(Crash):  # the process dies after the WAL (or after the extend)
        m.opened(_ident("b"), created=True)
    crash_at.clear()
    log = tmp_path / "eventlog"
    assert wal_path(log).exists() and len(parse_log(log.read_bytes())) == 1
    assert len(tdx.writes) == (2 if point == "extended" else 1)

    restarted = _measurer(tmp_path, tdx, sink="auto")  # auto on TDX, cva's log exists -> rtmr
    recovered: list[RecoveryAction] = []
    real_recover = measure_log.DirectLog.recover

    def spy(self: measure_log.DirectLog) -> RecoveryAction | None:
        done = real_recover(self)
        recovered.append(done)  # type: ignore[arg-type]
        return done

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(measure_log.DirectLog, "recover", spy)
        restarted.start()
    assert restarted.sink == "rtmr" and recovered == [action]
    assert not wal_path(log).exists()
    names = [parse_volume_content(VolumeOperation.OPEN, e.content).name for e in parse_log(
        log.read_bytes())]  # fmt: skip
    assert names == ["a", "b"] and len(tdx.writes) == 2
    assert tdx.rtmrs[3] == _replayed(log)
    restarted.opened(_ident("c"), created=False)
    assert tdx.rtmrs[3] == _replayed(log)


def test_another_writer_on_rtmr3_is_refused(tmp_path: Path, tdx: FakeTdxMeasurements) -> None:
    m = _measurer(tmp_path, tdx)
    m.opened(_ident("a"), created=True)
    tdx.extend(3, bytes(48))  # the AA, say, extends RTMR3 too
    with pytest.raises(MeasureError, match="another writer") as err:
        m.opened(_ident("b"), created=True)
    assert "\n" not in err.value.message and not m.is_measured("b")
    assert len(parse_log((tmp_path / "eventlog").read_bytes())) == 1


def test_rtmr_sink_on_an_old_kernel_fails_closed(tmp_path: Path) -> None:
    m = _measurer(tmp_path, None)
    with pytest.raises(MeasureError, match=r"measure-required") as err:
        m.opened(_ident("pg"), created=True)
    assert "6.16" in err.value.message and "\n" not in err.value.message
    assert not m.is_measured("pg")
    (tmp_path / "eventlog").write_bytes(b"")  # a log this boot: start refuses too
    with pytest.raises(MeasureError, match="cannot resume"):
        _measurer(tmp_path, None).start()


def test_rtmr_kernel_error_fails_closed(tmp_path: Path, tdx: FakeTdxMeasurements) -> None:
    tdx.fail_write = errno.EIO
    m = _measurer(tmp_path, tdx)
    with pytest.raises(MeasureError, match="EIO"):
        m.opened(_ident("pg"), created=True)
    assert tdx.rtmrs[3] == bytes(48) and not m.is_measured("pg")


def test_wrong_size_register_fails_closed(tmp_path: Path, tdx: FakeTdxMeasurements) -> None:
    tdx.value_size = 32
    m = _measurer(tmp_path, tdx)
    with pytest.raises(MeasureError, match="an RTMR has 48"):
        m.opened(_ident("pg"), created=True)
    assert not tdx.writes


# -- auto --------------------------------------------------------------------------------------


def test_auto_on_tdx_prefers_the_aa_socket(tmp_path: Path, tdx: FakeTdxMeasurements) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "aa.sock"))
        assert _measurer(tmp_path, tdx, sink="auto")._decide() == "aa"


def test_auto_on_tdx_uses_rtmr_before_the_tpm(tmp_path: Path, tdx: FakeTdxMeasurements) -> None:
    m = _measurer(tmp_path, tdx, sink="auto", tcti="swtpm:port=1")  # a TPM would be present
    m.opened(_ident("pg"), created=True)
    assert m.sink == "rtmr" and len(tdx.writes) == 1


def test_auto_on_tdx_without_the_sysfs_never_falls_back_to_the_tpm(tmp_path: Path) -> None:
    """Issue 21 #2: a TPM on a TDX VM is the host's; `required` must not be met by it."""
    m = _measurer(tmp_path, None, sink="auto", tcti="swtpm:port=1")  # a TPM is present
    with pytest.raises(MeasureError) as err:
        m._decide()
    message = err.value.message
    assert "no TDX RTMR sysfs (Linux >= 6.16)" in message and "start the AA" in message
    assert "tpm sink is refused on tdx" in message and "\n" not in message
    with pytest.raises(MeasureError, match="measure-required"):
        m.opened(_ident("pg"), created=True)
    assert m.sink is None and not (tmp_path / "eventlog").exists()


@pytest.mark.parametrize("tee", ["tdx", "snp", "sample", None])
def test_the_tpm_sink_is_refused_unless_the_tee_is_tpm(tmp_path: Path, tee: str | None) -> None:
    """Explicit `sink = "tpm"` too: refused at start and at every event, never extended."""
    extended: list[bytes] = []

    class _Reg:
        def read(self) -> bytes:
            return bytes(32)

        def extend(self, digest: bytes) -> None:
            extended.append(digest)

    def measurer(required: bool) -> Measurer:
        return Measurer(
            MeasureConfig(sink="tpm", required=required, tcti="swtpm:port=1"),
            log_path=tmp_path / "eventlog",
            state_path=tmp_path / "measured.json",
            tee=tee,
            register_factory=lambda _t, _p: _Reg(),
        )

    with pytest.raises(MeasureError, match="tpm measurement sink is refused") as err:
        measurer(True).start()
    assert "Attestation Agent" in err.value.message and "\n" not in err.value.message
    with pytest.raises(MeasureError, match="measure-required"):
        measurer(True).opened(_ident("pg"), created=True)
    relaxed = measurer(False)
    relaxed.start()  # a warning only
    relaxed.opened(_ident("pg"), created=True)
    assert not extended and not (tmp_path / "eventlog").exists()


def test_a_leftover_log_on_snp_is_not_resumed_in_a_tpm(tmp_path: Path) -> None:
    """`auto` with cva's log already there (the direct sink) is refused off tpm as well."""
    (tmp_path / "eventlog").write_bytes(b"")
    m = Measurer(
        MeasureConfig(sink="auto", aa_socket=tmp_path / "aa.sock", tcti="swtpm:port=1"),
        log_path=tmp_path / "eventlog",
        state_path=tmp_path / "measured.json",
        tee="snp",
    )
    with pytest.raises(MeasureError, match="tpm measurement sink is refused"):
        m.start()


def test_auto_on_tpm_still_uses_the_tpm(tmp_path: Path) -> None:
    m = Measurer(
        MeasureConfig(sink="auto", aa_socket=tmp_path / "aa.sock", tcti="swtpm:port=1"),
        log_path=tmp_path / "eventlog",
        tee="tpm",
    )
    assert m._decide() == "tpm"
    none = Measurer(
        MeasureConfig(sink="auto", aa_socket=tmp_path / "aa.sock", tcti="device:/nonexistent"),
        log_path=tmp_path / "eventlog",
        tee="tpm",
    )
    with pytest.raises(MeasureError, match=r"no TPM \(device:/nonexistent\)"):
        none._decide()


def test_auto_off_tdx_never_uses_rtmr(tmp_path: Path, tdx: FakeTdxMeasurements) -> None:
    """The TEE is the image's decision: an RTMR sysfs on a non-TDX machine is not used."""
    for tee in (None, "snp", "tpm", "sample"):
        m = Measurer(
            MeasureConfig(sink="auto", aa_socket=tmp_path / "aa.sock", tcti="device:/nonexistent"),
            log_path=tmp_path / "eventlog",
            tee=tee,
            rtmr_factory=lambda i: TdxRtmr(i, root=tdx.root, fs=tdx),
        )
        with pytest.raises(MeasureError, match="no measurement sink"):
            m._decide()
    assert not tdx.writes


def test_auto_on_tdx_refuses_a_pcr_outside_rtmr3(tmp_path: Path, tdx: FakeTdxMeasurements) -> None:
    m = _measurer(tmp_path, tdx, sink="auto", pcr=9)
    with pytest.raises(MeasureError, match="not an RTMR3 PCR"):
        m.opened(_ident("pg"), created=True)
    assert not tdx.writes


def test_the_daemon_passes_the_images_tee_decision(tmp_path: Path) -> None:
    """`cva serve` hands the measurer the TEE agent.trust decided (never the contract's)."""
    from agent.config import parse_config
    from agent.startup import production_manager
    from agent.trust import Trusted
    from evidence.sample import SampleAttester
    from tests.daemon_support import contract, volume

    class _Tdx(SampleAttester):
        @property
        def tee(self) -> str:
            return "tdx"

    config = parse_config(f'[paths]\nstate_dir = "{tmp_path}"\n[measure]\nsink = "aa"\n')
    trusted = Trusted(None, contract(volume("pg")), _Tdx())  # type: ignore[arg-type]
    manager = production_manager(trusted)(config, lambda _status: None)
    assert manager.measurer is not None and manager.measurer.tee == "tdx"
