"""TDX and SNP attesters (and configfs-tsm) against faithful fakes of the kernel ABIs."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import socket
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.binding import check_initdata_binding
from agent.initdata import parse_initdata
from evidence.detect import attester_for, detect_tee
from evidence.errors import AttesterUnavailable, BindingError, EvidenceError
from evidence.qgs import decode_get_quote_response, encode_get_quote
from evidence.quote import parse_quote
from evidence.snp import SnpAttester
from evidence.snp_report import (
    build_cert_table,
    load_certificate,
    parse_report,
    report_from_json,
    verify_report_signature,
)
from evidence.tdx import TdxAttester
from evidence.tsm import TsmClient
from tests.fake_kernel import FakeSevGuest, FakeTdxGuest, FakeTsm

DOC384 = b'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"cva.toml" = "x"\n'
DOC256 = b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"cva.toml" = "x"\n'


@pytest.fixture
def tdx_quote(vectors: Path) -> bytes:
    return (vectors / "tdx/trustee_tdx_quote_v4.dat").read_bytes()


@pytest.fixture
def snp_report(vectors: Path) -> bytes:
    return (vectors / "snp/trustee_snp_report_v2_milan.bin").read_bytes()


def _quote_with(quote: bytes, report_data: bytes) -> bytes:
    """The vector quote with REPORTDATA replaced (as the hardware would produce it)."""
    return quote[:568] + report_data + quote[632:]


def _report_with(report: bytes, report_data: bytes, host_data: bytes = bytes(32)) -> bytes:
    out = bytearray(report)
    out[0x50:0x90] = report_data
    out[0xC0:0xE0] = host_data
    return bytes(out)


def _tdx_tsm(tmp_path: Path, quote: bytes, **kw: object) -> FakeTsm:
    return FakeTsm(
        tmp_path, "tdx_guest", lambda p, inblob, lvl: (_quote_with(quote, inblob), None), **kw
    )  # type: ignore[arg-type]


def _no_leftovers(fake: FakeTsm) -> None:
    assert list(fake.base.iterdir()) == []
    assert fake.entries == {}


# ---------------------------------------------------------------------------------------------
# configfs-tsm + TDX


def test_tdx_evidence_via_configfs_tsm_with_the_real_quote(
    tmp_path: Path, tdx_quote: bytes
) -> None:
    rd = parse_quote(tdx_quote).body.report_data
    fake = FakeTsm(tmp_path, "tdx_guest", lambda p, inblob, lvl: (tdx_quote, None))
    att = TdxAttester(tmp_path, fs=fake)
    ev = att.evidence(rd)
    assert ev == {"cc_eventlog": None, "quote": base64.b64encode(tdx_quote).decode()}
    assert fake.reads.count("generation") == 2
    _no_leftovers(fake)


def test_tdx_report_data_is_padded_to_64_and_checked(tmp_path: Path, tdx_quote: bytes) -> None:
    fake = _tdx_tsm(tmp_path, tdx_quote)
    digest = hashlib.sha384(b"runtime").digest()
    ev = TdxAttester(tmp_path, fs=fake).evidence(digest)
    quote = parse_quote(base64.b64decode(ev["quote"]))
    assert quote.body.report_data == digest + bytes(16)
    with pytest.raises(EvidenceError, match="at most 64"):
        TdxAttester(tmp_path, fs=fake).evidence(bytes(65))
    # a quote for other report data is refused (fail closed)
    stale = FakeTsm(tmp_path, "tdx_guest", lambda p, inblob, lvl: (tdx_quote, None))
    with pytest.raises(AttesterUnavailable, match="different report data"):
        TdxAttester(tmp_path, fs=stale).evidence(digest)
    _no_leftovers(fake)


def test_tdx_cc_eventlog_is_trimmed_ccel_plus_end_marker(
    tmp_path: Path, tdx_quote: bytes, vectors: Path
) -> None:
    ccel = (vectors / "tdx/trustee_CCEL_data.bin").read_bytes()
    target = tmp_path / "sys/firmware/acpi/tables/data/CCEL"
    target.parent.mkdir(parents=True)
    target.write_bytes(ccel)
    ev = TdxAttester(tmp_path, fs=_tdx_tsm(tmp_path, tdx_quote)).evidence(b"x")
    log = base64.b64decode(ev["cc_eventlog"])
    assert log == ccel[:9822] + b"\xff" * 8
    assert ccel[9822:9830] in (bytes(8), b"\xff" * 8)


def test_tdx_cc_eventlog_carries_the_rtmr_runtime_logs(
    tmp_path: Path, tdx_quote: bytes, vectors: Path
) -> None:
    """Trustee replays cc_eventlog against RTMR0-3: the AA's (and cva's rtmr sink's) entries
    must follow the CCEL, or evidence from a VM whose RTMR3 was extended is refused."""
    from evidence.eventlog import ALG_SHA256, ALG_SHA384, aael_event, encode_entry
    from evidence.tdx import AA_EVENTLOG

    ccel = (vectors / "tdx/trustee_CCEL_data.bin").read_bytes()
    target = tmp_path / "sys/firmware/acpi/tables/data/CCEL"
    target.parent.mkdir(parents=True)
    target.write_bytes(ccel)
    aa = encode_entry(4, ALG_SHA384, aael_event("github.com/cc", "init", "{}"))
    own = encode_entry(4, ALG_SHA384, aael_event("cva", "volume-open", "{}"))
    pcr_log = encode_entry(23, ALG_SHA256, aael_event("cva", "volume-open", "{}"))
    (tmp_path / AA_EVENTLOG).parent.mkdir(parents=True)
    (tmp_path / AA_EVENTLOG).write_bytes(aa)
    (tmp_path / "run/cva").mkdir(parents=True)
    (tmp_path / "run/cva/eventlog").write_bytes(own)
    (tmp_path / "run/cva/pcrlog").write_bytes(pcr_log)

    def cc_eventlog(*logs: str) -> bytes:
        att = TdxAttester(
            tmp_path, fs=_tdx_tsm(tmp_path, tdx_quote), runtime_logs=[Path(p) for p in logs]
        )
        return base64.b64decode(att.evidence(b"x")["cc_eventlog"])

    base = ccel[:9822]
    # the default: the AA's log
    default = TdxAttester(tmp_path, fs=_tdx_tsm(tmp_path, tdx_quote)).evidence(b"x")
    assert base64.b64decode(default["cc_eventlog"]) == base + aa + b"\xff" * 8
    assert cc_eventlog(str(AA_EVENTLOG), "run/cva/eventlog") == base + aa + own + b"\xff" * 8
    # a log that does not exist, or one of a TPM PCR (another register and bank): left out
    assert cc_eventlog("run/none", "run/cva/pcrlog") == base + b"\xff" * 8
    # a malformed runtime log fails closed
    (tmp_path / "run/cva/eventlog").write_bytes(own[:-1])
    with pytest.raises(AttesterUnavailable, match="malformed"):
        cc_eventlog("run/cva/eventlog")


def test_daemon_tdx_evidence_includes_the_aa_and_cva_logs() -> None:
    from agent.config import DaemonConfig, MeasureConfig
    from agent.trust import runtime_logs
    from evidence.tdx import AA_EVENTLOG

    assert runtime_logs(DaemonConfig()) == (AA_EVENTLOG, Path("run/cva/eventlog"))
    own = DaemonConfig(measure=MeasureConfig(log=Path("/var/run/x/log")))
    assert runtime_logs(own) == (AA_EVENTLOG, Path("var/run/x/log"))
    same = DaemonConfig(measure=MeasureConfig(log=Path("/") / AA_EVENTLOG))
    assert runtime_logs(same) == (AA_EVENTLOG,)


def test_generation_race_is_retried_then_given_up(tmp_path: Path, tdx_quote: bytes) -> None:
    fake = _tdx_tsm(tmp_path, tdx_quote, race_on_inblob=1)
    TdxAttester(tmp_path, fs=fake).evidence(b"a")
    _no_leftovers(fake)
    fake = _tdx_tsm(tmp_path, tdx_quote, race_on_read=2)
    TdxAttester(tmp_path, fs=fake).evidence(b"a")
    _no_leftovers(fake)
    fake = _tdx_tsm(tmp_path, tdx_quote, race_on_inblob=100)
    with pytest.raises(AttesterUnavailable, match="inblob write conflict"):
        TdxAttester(tmp_path, fs=fake).evidence(b"a")
    _no_leftovers(fake)


def test_ebusy_is_retried_with_a_bound(tmp_path: Path, tdx_quote: bytes) -> None:
    fake = _tdx_tsm(tmp_path, tdx_quote, busy=2)
    client = TsmClient(tmp_path, fs=fake, busy_wait=0)
    assert client.report(bytes(64), provider="tdx_guest").outblob
    fake = _tdx_tsm(tmp_path, tdx_quote, busy=10)
    with pytest.raises(AttesterUnavailable, match="EBUSY"):
        TsmClient(tmp_path, fs=fake, busy_wait=0).report(bytes(64), provider="tdx_guest")
    _no_leftovers(fake)


def test_inblob_length_rules(tmp_path: Path, tdx_quote: bytes) -> None:
    fake = _tdx_tsm(tmp_path, tdx_quote)
    client = TsmClient(tmp_path, fs=fake)
    for size in (0, 32, 63, 65):
        with pytest.raises(EvidenceError, match="exactly 64"):
            client.report(bytes(size), provider="tdx_guest")
    assert fake.entries == {}  # refused before touching configfs
    # the fake kernel itself: short inblob -> EINVAL on outblob, long -> EFBIG on write
    entry = fake.base / "manual"
    fake.mkdir(entry)
    fake.write(entry / "inblob", bytes(10))
    with pytest.raises(OSError) as info:
        fake.read(entry / "outblob", 1 << 20)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        fake.write(entry / "inblob", bytes(65))
    assert info.value.errno == errno.EFBIG
    fake.rmdir(entry)


def test_provider_errors_become_one_clean_line(tmp_path: Path) -> None:
    def reject(provider: str, inblob: bytes, lvl: int) -> tuple[bytes, None]:
        raise OSError(errno.EINVAL, "Invalid argument")

    fake = FakeTsm(tmp_path, "tdx_guest", reject)
    with pytest.raises(AttesterUnavailable, match="EINVAL") as info:
        TdxAttester(tmp_path, fs=fake).evidence(b"")
    assert "\n" not in info.value.message
    _no_leftovers(fake)


def test_missing_and_wrong_provider(tmp_path: Path, tdx_quote: bytes) -> None:
    fake = FakeTsm(tmp_path, None, lambda p, i, lvl: (tdx_quote, None))
    assert TsmClient(tmp_path, fs=fake).provider() is None
    with pytest.raises(AttesterUnavailable, match="no provider"):
        TdxAttester(tmp_path, fs=fake).evidence(b"")
    with pytest.raises(AttesterUnavailable, match="no TEE found"):
        detect_tee(tmp_path, fs=fake)
    _no_leftovers(fake)
    fake = FakeTsm(tmp_path, "sev_guest", lambda p, i, lvl: (tdx_quote, None))
    with pytest.raises(AttesterUnavailable, match="expected 'tdx_guest'"):
        TdxAttester(tmp_path, fs=fake).evidence(b"")
    _no_leftovers(fake)


def test_detection_through_configfs_tsm(tmp_path: Path, tdx_quote: bytes) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/tpmrm0").touch()
    fake = FakeTsm(tmp_path, "tdx_guest", lambda p, i, lvl: (tdx_quote, None))
    assert detect_tee(tmp_path, fs=fake) == "tdx"
    assert isinstance(attester_for("auto", root=tmp_path, fs=fake), TdxAttester)
    fake.provider = "sev_guest"
    assert detect_tee(tmp_path, fs=fake) == "snp"
    assert isinstance(attester_for("auto", root=tmp_path, fs=fake), SnpAttester)
    fake.provider = "arm_cca_guest"
    with pytest.raises(AttesterUnavailable, match="not supported"):
        detect_tee(tmp_path, fs=fake)
    _no_leftovers(fake)


# ---------------------------------------------------------------------------------------------
# TDX binding: sysfs and TDREPORT ioctl


def test_tdx_binding_from_sysfs(tmp_path: Path) -> None:
    initdata = parse_initdata(DOC384)
    sysfs = tmp_path / "sys/devices/virtual/misc/tdx_guest/measurements/mrconfigid"
    sysfs.parent.mkdir(parents=True)
    sysfs.write_bytes(initdata.digest())
    att = TdxAttester(tmp_path)
    assert att.initdata_binding() == initdata.digest()
    check_initdata_binding(initdata, att)
    sysfs.write_bytes(bytes(48))
    with pytest.raises(BindingError) as info:
        check_initdata_binding(initdata, att)
    assert initdata.digest().hex() in info.value.message
    assert "00" * 48 in info.value.message
    assert "MRCONFIGID" in info.value.message
    sysfs.write_bytes(bytes(47))
    with pytest.raises(AttesterUnavailable, match="expected 48"):
        att.initdata_binding()


def test_tdx_binding_from_tdreport_ioctl_sha256_padded(tmp_path: Path, vectors: Path) -> None:
    initdata = parse_initdata(DOC256)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/tdx_guest").touch()
    template = (vectors / "tdx/gc_tdreport_1.bin").read_bytes()
    dev = FakeTdxGuest(template, mr_config_id=initdata.digest() + bytes(16))
    att = TdxAttester(tmp_path, ioctl=dev)
    check_initdata_binding(initdata, att)
    assert dev.calls == 1
    dev.mr_config_id = initdata.digest() + b"\x01" * 16
    with pytest.raises(BindingError):
        check_initdata_binding(initdata, att)
    dev.fail = errno.EIO
    with pytest.raises(AttesterUnavailable, match="EIO"):
        att.initdata_binding()


def test_tdreport_carries_report_data(tmp_path: Path, vectors: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/tdx_guest").touch()
    template = (vectors / "tdx/gc_tdreport_1.bin").read_bytes()
    att = TdxAttester(tmp_path, ioctl=FakeTdxGuest(template))
    report = att.tdreport(b"\x07" * 64)
    assert report[128:192] == b"\x07" * 64
    with pytest.raises(AttesterUnavailable, match="cannot open"):
        TdxAttester(tmp_path / "nope", ioctl=FakeTdxGuest(template)).tdreport(b"")


def test_tdx_quote_through_qgs_when_configfs_is_absent(
    tmp_path: Path, vectors: Path, tdx_quote: bytes
) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/tdx_guest").touch()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/tdx-attest.conf").write_text("# qgs\nport = 4050\n")
    template = (vectors / "tdx/gc_tdreport_1.bin").read_bytes()
    seen: list[int] = []

    def connect(port: int, timeout: float) -> socket.socket:
        seen.append(port)
        ours, theirs = socket.socketpair()

        def serve() -> None:
            with theirs:
                (length,) = struct.unpack(">I", theirs.recv(4))
                req = b""
                while len(req) < length:
                    req += theirs.recv(length - len(req))
                tdreport = req[24:]
                quote = _quote_with(tdx_quote, tdreport[128:192])
                body = struct.pack("<II", 0, len(quote)) + quote
                msg = struct.pack("<HHIII", 1, 1, 1, 16 + len(body), 0) + body
                theirs.sendall(struct.pack(">I", len(msg)) + msg)

        threading.Thread(target=serve, daemon=True).start()
        return ours

    att = TdxAttester(tmp_path, ioctl=FakeTdxGuest(template), qgs_connect=connect)
    ev = att.evidence(b"\x05" * 48)
    assert seen == [4050]
    assert parse_quote(base64.b64decode(ev["quote"])).body.report_data == b"\x05" * 48 + bytes(16)


def test_qgs_messages() -> None:
    req = encode_get_quote(bytes(1024))
    assert struct.unpack(">I", req[:4])[0] == len(req) - 4
    assert struct.unpack("<HHIII", req[4:20]) == (1, 1, 0, len(req) - 4, 0)
    assert struct.unpack("<II", req[20:28]) == (1024, 0)
    good = struct.pack("<HHIII", 1, 1, 1, 16 + 8 + 3, 0) + struct.pack("<II", 0, 3) + b"abc"
    assert decode_get_quote_response(good) == b"abc"
    for bad, match in [
        (good[:10], "truncated|needs"),
        (struct.pack("<HHIII", 1, 1, 1, 16 + 8 + 99, 0) + struct.pack("<II", 0, 99), "size"),
        (struct.pack("<HHIII", 1, 1, 1, 24, 0) + struct.pack("<II", 0, 99), "past the end"),
        (struct.pack("<HHIII", 2, 1, 1, 27, 0) + struct.pack("<II", 0, 3) + b"abc", "major"),
        (struct.pack("<HHIII", 1, 1, 0, 27, 0) + struct.pack("<II", 0, 3) + b"abc", "type"),
    ]:
        with pytest.raises(EvidenceError, match=match):
            decode_get_quote_response(bad)
    refused = struct.pack("<HHIII", 1, 1, 1, 24, 0x12001) + struct.pack("<II", 0, 0)
    with pytest.raises(AttesterUnavailable, match="0x12001"):
        decode_get_quote_response(refused)
    with pytest.raises(EvidenceError):
        encode_get_quote(bytes(10))


def test_no_tdx_quote_path(tmp_path: Path) -> None:
    with pytest.raises(AttesterUnavailable, match="no TDX quote path"):
        TdxAttester(tmp_path).evidence(b"")


# ---------------------------------------------------------------------------------------------
# SNP


def test_snp_via_configfs_tsm_with_privlevel_and_auxblob(
    tmp_path: Path, snp_report: bytes, vectors: Path
) -> None:
    vcek = (vectors / "snp/trustee_snp_vcek_milan.der").read_bytes()
    table = build_cert_table([("VCEK", vcek)])
    levels: list[int] = []

    def make(provider: str, inblob: bytes, lvl: int) -> tuple[bytes, bytes]:
        levels.append(lvl)
        return _report_with(snp_report, inblob), table

    fake = FakeTsm(tmp_path, "sev_guest", make)
    rd = hashlib.sha384(b"x").digest()
    ev = SnpAttester(tmp_path, fs=fake, vmpl=2).evidence(rd)
    assert set(ev) == {"attestation_report", "cert_chain"}
    assert ev["cert_chain"] == [{"cert_type": "VCEK", "data": list(vcek)}]
    assert bytes(ev["attestation_report"]["report_data"]) == rd + bytes(16)
    assert parse_report(report_from_json(ev["attestation_report"])).report_data == rd + bytes(16)
    assert levels and set(levels) == {2}
    _no_leftovers(fake)
    fake.privlevel_floor = 3
    with pytest.raises(AttesterUnavailable, match="EINVAL"):
        SnpAttester(tmp_path, fs=fake, vmpl=2).evidence(rd)
    _no_leftovers(fake)


def test_snp_unmodified_report_signature_survives_the_evidence_json(
    tmp_path: Path, snp_report: bytes, vectors: Path
) -> None:
    rd = parse_report(snp_report).report_data
    fake = FakeTsm(tmp_path, "sev_guest", lambda p, i, lvl: (snp_report, None))
    ev = SnpAttester(tmp_path, fs=fake).evidence(rd)
    assert ev["cert_chain"] is None
    rebuilt = parse_report(report_from_json(ev["attestation_report"]))
    vcek = load_certificate((vectors / "snp/trustee_snp_vcek_milan.der").read_bytes(), "VCEK")
    verify_report_signature(rebuilt, vcek)


def test_snp_ext_report_ioctl_grows_cert_buffer_and_retries_busy(
    tmp_path: Path, snp_report: bytes
) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/sev-guest").touch()
    big = build_cert_table([("VCEK", b"v" * 9000), ("ASK", b"a" * 7000), ("ARK", b"r" * 5000)])
    dev = FakeSevGuest(lambda ud, vmpl: _report_with(snp_report, ud), certs=big, busy=1)
    att = SnpAttester(tmp_path, ioctl=dev, busy_wait=0)
    ev = att.evidence(b"\x09" * 64)
    assert [c["cert_type"] for c in ev["cert_chain"]] == ["VCEK", "ASK", "ARK"]
    assert dev.seen_certs_len == [16384, 16384, 24576]
    assert bytes(ev["attestation_report"]["report_data"]) == b"\x09" * 64


def test_snp_ioctl_without_certs_and_busy_forever(tmp_path: Path, snp_report: bytes) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/sev-guest").touch()
    dev = FakeSevGuest(lambda ud, vmpl: _report_with(snp_report, ud))
    assert SnpAttester(tmp_path, ioctl=dev).evidence(b"")["cert_chain"] is None
    dev = FakeSevGuest(lambda ud, vmpl: _report_with(snp_report, ud), busy=100)
    with pytest.raises(AttesterUnavailable, match="busy"):
        SnpAttester(tmp_path, ioctl=dev, busy_wait=0, attempts=3).evidence(b"")


def test_snp_binding_host_data(tmp_path: Path, snp_report: bytes) -> None:
    initdata = parse_initdata(DOC384)
    host = initdata.digest()[:32]
    fake = FakeTsm(
        tmp_path, "sev_guest", lambda p, i, lvl: (_report_with(snp_report, i, host), None)
    )
    att = SnpAttester(tmp_path, fs=fake)
    assert att.initdata_binding() == host
    check_initdata_binding(initdata, att)
    other = parse_initdata(DOC256)
    with pytest.raises(BindingError) as info:
        check_initdata_binding(other, att)
    assert "HOST_DATA" in info.value.message
    assert host.hex() in info.value.message and other.digest().hex() in info.value.message


def test_snp_garbage_from_the_kernel_is_refused(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path, "sev_guest", lambda p, i, lvl: (b"\x00" * 100, None))
    with pytest.raises(EvidenceError, match="expected 1184"):
        SnpAttester(tmp_path, fs=fake).evidence(b"")
    _no_leftovers(fake)


# ---------------------------------------------------------------------------------------------
# a hostile kernel / host: whatever bytes come back, the attester returns valid evidence for the
# requested report data or raises a clean error


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(max_size=6000), aux=st.none() | st.binary(max_size=300))
def test_property_hostile_configfs_output(tmp_path: Path, blob: bytes, aux: bytes | None) -> None:
    for provider, cls in (("tdx_guest", TdxAttester), ("sev_guest", SnpAttester)):
        fake = FakeTsm(tmp_path, provider, lambda p, i, lvl: (blob, aux))
        with contextlib.suppress(EvidenceError, AttesterUnavailable):
            cls(tmp_path, fs=fake).evidence(b"\x01" * 64)
        _no_leftovers(fake)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(certs=st.binary(max_size=5000))
def test_property_hostile_snp_cert_table(tmp_path: Path, snp_report: bytes, certs: bytes) -> None:
    dev_dir = tmp_path / "dev"
    dev_dir.mkdir(exist_ok=True)
    (dev_dir / "sev-guest").touch()
    dev = FakeSevGuest(lambda ud, vmpl: _report_with(snp_report, ud), certs=certs)
    with contextlib.suppress(EvidenceError, AttesterUnavailable):
        SnpAttester(tmp_path, ioctl=dev).evidence(b"")
