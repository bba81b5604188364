"""CCEL trimming, kernel ABI constants, the binding rules, and `parse_any` on any bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.binding import check_initdata_binding
from agent.initdata import InitDataError, parse_initdata
from evidence import snp, tdx
from evidence.ccel import parse_ccel, trim_ccel
from evidence.errors import AttesterUnavailable, BindingError, EvidenceError
from evidence.inspect import parse_any
from evidence.qgs import decode_get_quote_response, qgs_port
from evidence.sample import SampleAttester


def _iowr(kind: str, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | nr


def test_ioctl_numbers_and_struct_sizes_match_the_uapi_headers() -> None:
    assert tdx.TDX_CMD_GET_REPORT0 == _iowr("T", 1, 64 + 1024) == 0xC4405401
    assert snp.SNP_GET_EXT_REPORT == _iowr("S", 2, 32) == 0xC0205302
    assert snp.GUEST_REQ.size == 32
    assert snp.EXT_REQ.size == 112


def test_ccel_vector_events_match_trustee(vectors: Path) -> None:
    ccel = (vectors / "tdx/trustee_CCEL_data.bin").read_bytes()
    expected = json.loads((vectors / "tdx/trustee_parse_tdx_claims_expected.json").read_text())
    events = parse_ccel(ccel)
    logs = expected["uefi_event_logs"]
    assert len(events) == len(logs) == 5
    for ev, log in zip(events, logs, strict=True):
        assert ev.mr_index == log["index"]
        assert [d.hex() for _alg, d in ev.digests] == [d["digest"] for d in log["digests"]]
    trimmed = trim_ccel(ccel)
    assert len(trimmed) == 9822 and ccel.startswith(trimmed)


def test_ccel_hostile() -> None:
    with pytest.raises(EvidenceError):
        trim_ccel(b"")
    header = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", 4) + b"abcd"
    assert trim_ccel(header + b"\xff" * 8) == header
    with pytest.raises(EvidenceError, match="end marker"):
        trim_ccel(header)
    event = struct.pack("<III", 1, 4, 1) + struct.pack("<H", 0x0C) + bytes(48)
    with pytest.raises(EvidenceError, match="past the end"):
        trim_ccel(header + event + struct.pack("<I", 0xFFFFFFF0) + bytes(8))
    bad_alg = struct.pack("<III", 1, 4, 1) + struct.pack("<H", 0x99)
    with pytest.raises(EvidenceError, match="algorithm"):
        trim_ccel(header + bad_alg + bytes(64))
    many = struct.pack("<III", 1, 4, 1000)
    with pytest.raises(EvidenceError, match="digests"):
        trim_ccel(header + many + bytes(64))


def test_qgs_port_config(tmp_path: Path) -> None:
    assert qgs_port(tmp_path) is None
    (tmp_path / "etc").mkdir()
    conf = tmp_path / "etc/tdx-attest.conf"
    for text, port in [("port = 4050\n", 4050), ("# port = 1\n", None), ("port=x\n", None)]:
        conf.write_text(text)
        assert qgs_port(tmp_path) == port


def test_binding_pad_and_truncate_rules() -> None:
    class Fixed:
        def __init__(self, tee: str, value: bytes | None) -> None:
            self._tee, self.value = tee, value

        @property
        def tee(self) -> str:
            return self._tee

        def evidence(self, report_data: bytes) -> dict[str, object]:
            return {}

        def initdata_binding(self) -> bytes | None:
            return self.value

    def doc(alg: str) -> bytes:
        return f'version = "0.1.0"\nalgorithm = "{alg}"\n[data]\n'.encode()

    d256, d384, d512 = (parse_initdata(doc(a)) for a in ("sha256", "sha384", "sha512"))
    check_initdata_binding(d256, Fixed("tdx", d256.digest() + bytes(16)))  # padded to 48
    check_initdata_binding(d384, Fixed("tdx", d384.digest()))
    check_initdata_binding(d512, Fixed("tdx", d512.digest()[:48]))  # truncated
    check_initdata_binding(d384, Fixed("snp", d384.digest()[:32]))
    check_initdata_binding(d256, Fixed("snp", d256.digest()))
    check_initdata_binding(d256, Fixed("tpm", hashlib.sha256(bytes(32) + d256.digest()).digest()))
    with pytest.raises(BindingError):
        check_initdata_binding(d256, Fixed("tdx", d256.digest() + b"\x01" * 16))
    with pytest.raises(BindingError):
        check_initdata_binding(d384, Fixed("snp", d384.digest()[:31]))
    with pytest.raises(BindingError, match="reports no"):
        check_initdata_binding(d384, Fixed("tdx", None))
    with pytest.raises(InitDataError, match="sha256"):
        check_initdata_binding(d384, Fixed("tpm", bytes(32)))
    # PCR8 still zero but the attester cannot extend: refused, not silently accepted
    with pytest.raises(BindingError):
        check_initdata_binding(d256, Fixed("tpm", bytes(32)))
    # nothing is measured on sample: the check refuses it (only the image may go without it)
    with pytest.raises(BindingError, match="measures no initdata"):
        check_initdata_binding(d256, SampleAttester())
    with pytest.raises(BindingError, match="measures no initdata"):
        check_initdata_binding(d256, Fixed("az-snp-vtpm", bytes(32)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_property_parse_any_and_friends(data: bytes) -> None:
    for fn in (parse_any, trim_ccel, decode_get_quote_response):
        with contextlib.suppress(EvidenceError, AttesterUnavailable):
            fn(data)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(
            st.sampled_from(["quote", "attestation_report", "tpm_quote", "ak_public", "svn",
                             "report_data", "cert_chain", "message", "signature", "pcrs"]),
            c, max_size=4),
        max_leaves=20,
    )
)  # fmt: skip
def test_property_parse_any_json(doc: object) -> None:
    if not isinstance(doc, dict):
        doc = {"x": doc}
    with contextlib.suppress(EvidenceError):
        parse_any(json.dumps(doc).encode())


def test_real_configfs_operations_on_plain_files(tmp_path: Path) -> None:
    import errno

    from evidence.tsm import RealConfigFs

    fs = RealConfigFs()
    d = tmp_path / "cva-x"
    fs.mkdir(d)
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    (d / "inblob").touch()
    fs.write(d / "inblob", b"\x01" * 64)
    assert fs.read(d / "inblob", 64) == b"\x01" * 64
    with pytest.raises(OSError) as info:
        fs.read(d / "inblob", 63)
    assert info.value.errno == errno.EFBIG
    (d / "inblob").unlink()
    fs.rmdir(d)
    assert not d.exists()
