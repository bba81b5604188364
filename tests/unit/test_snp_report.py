"""SNP reports v2..v5, the cert table, the serde JSON form: vectors, signatures, hostile input."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence.errors import EvidenceError
from evidence.snp_report import (
    REPORT_SIZE,
    build_cert_table,
    load_certificate,
    parse_cert_table,
    parse_report,
    report_claims,
    report_from_json,
    report_to_json,
    verify_chain,
    verify_report_signature,
)
from tests.conftest import VECTORS

SNP = VECTORS / "snp"


def _read(vectors: Path, name: str) -> bytes:
    return (vectors / "snp" / name).read_bytes()


def _chain(vectors: Path, name: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(_read(vectors, name))


def test_trustee_milan_v2_report(vectors: Path) -> None:
    r = parse_report(_read(vectors, "trustee_snp_report_v2_milan.bin"))
    vcek = load_certificate(_read(vectors, "trustee_snp_vcek_milan.der"), "VCEK")
    verify_report_signature(r, vcek)
    ask, ark, _asvk = _chain(vectors, "trustee_milan_ask_ark_asvk.pem")
    verify_chain(vcek, ask, ark)
    assert (r.version, r.guest_svn, r.policy, r.vmpl, r.sig_algo) == (2, 4, 0x3001F, 0, 1)
    assert r.current_tcb == 0xCE08000000000003
    assert r.reported_tcb == 0x7308000000000003
    tcb = r.tcb(r.reported_tcb)
    assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode) == (3, 0, 8, 0x73)
    assert r.report_data.hex() == (
        "ec6c52d7533cc2c4f45be7849cf112ab82b2009fe7bd43e71ed08c14400ad7e2" + "00" * 32
    )
    claims = report_claims(r)
    assert claims["measurement"] == (
        "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f63fd75d98f1ef827c"
        "23500644e0e692e6be917f9050d3d38c"
    )
    assert claims["host_data"] == "00" * 32
    assert claims["chip_id"].startswith("c38427a30d4c7af9")
    assert claims["chip_id"].endswith("e477524e")


@pytest.mark.parametrize(("offset", "what"), [(42, "signature"), (384, "signature")])
def test_flipped_report_bytes_break_the_signature(vectors: Path, offset: int, what: str) -> None:
    data = bytearray(_read(vectors, "trustee_snp_report_v2_milan.bin"))
    data[offset] ^= 1
    vcek = load_certificate(_read(vectors, "trustee_snp_vcek_milan.der"), "VCEK")
    with pytest.raises(EvidenceError, match=what):
        verify_report_signature(parse_report(bytes(data)), vcek)


def test_vlek_v3_report(vectors: Path) -> None:
    r = parse_report(_read(vectors, "trustee_snp_report_v3_vlek.bin"))
    vlek = load_certificate(_read(vectors, "trustee_snp_vlek.der"), "VLEK")
    verify_report_signature(r, vlek)
    _ask, ark, asvk = _chain(vectors, "trustee_milan_ask_ark_asvk.pem")
    verify_chain(vlek, asvk, ark)
    assert r.signing_key == "VLEK" and r.key_info == 0x4
    assert (r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step) == (0x19, 0x01, 0x01)
    assert r.chip_id == bytes(64)
    assert (r.vmpl, r.policy, r.plat_info) == (1, 0x30000, 0x27)
    assert r.report_data.hex().startswith("819770b7e6ea6df8")
    assert r.measurement.hex().startswith("8922ebbdd00ec2c5")
    # a VCEK chain does not validate the VLEK
    ask, ark, _ = _chain(vectors, "trustee_milan_ask_ark_asvk.pem")
    with pytest.raises(EvidenceError):
        verify_chain(vlek, ask, ark)


def test_gosev_v2_report(vectors: Path) -> None:
    r = parse_report(_read(vectors, "gosev_attestation_v2_milan.bin"))
    vcek = load_certificate(_read(vectors, "gosev_vcek_milan.der"), "VCEK")
    verify_report_signature(r, vcek)
    ask, ark = _chain(vectors, "gosev_ask_ark_milan.pem")
    verify_chain(vcek, ask, ark)
    assert r.report_data == bytes([1, 2, 3, 4, 5]) + bytes(59)
    assert r.reported_tcb == 0x4405000000000002
    tcb = r.tcb(r.reported_tcb)
    assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode) == (2, 0, 5, 68)
    assert r.policy == 0xB0000
    assert r.chip_id.hex().startswith("3ac3fe21e13fb099")
    assert r.measurement.hex().startswith("b07af9620f3b839b")
    # the wrong VCEK does not verify it
    other = load_certificate(_read(vectors, "trustee_snp_vcek_milan.der"), "VCEK")
    with pytest.raises(EvidenceError):
        verify_report_signature(r, other)


def test_e2e_evidence_json_round_trip_and_signature(vectors: Path) -> None:
    doc = json.loads(_read(vectors, "trustee_snp_evidence_e2e.json"))
    raw = report_from_json(doc["attestation_report"])
    r = parse_report(raw)
    vcek = load_certificate(bytes(doc["cert_chain"][0]["data"]), "VCEK")
    verify_report_signature(r, vcek)
    assert (r.version, r.cpuid_fam_id, r.cpuid_mod_id) == (3, 25, 0xA0)
    assert r.report_data.hex().startswith("7e732088")
    assert r.measurement.hex().startswith("6a6519d7") and r.measurement.hex().endswith("5506e73e")
    back = report_to_json(r)
    for key, value in doc["attestation_report"].items():
        assert back[key] == value, key
    assert back["launch_mit_vector"] is None and back["current_mit_vector"] is None
    assert list(back) == [*doc["attestation_report"], "launch_mit_vector", "current_mit_vector"][
        : len(back)
    ] or set(back) >= set(doc["attestation_report"])


def test_turin_tcb_layout_and_v5_fields(vectors: Path) -> None:
    data = bytearray(_read(vectors, "trustee_snp_report_v2_milan.bin"))
    struct.pack_into("<I", data, 0, 5)
    data[0x188] = 0x1A  # Turin
    struct.pack_into("<Q", data, 0x180, 0x3300000004030201)
    struct.pack_into("<Q", data, 0x1F8, 7)
    r = parse_report(bytes(data))
    t = r.tcb(r.reported_tcb)
    assert (t.fmc, t.bootloader, t.tee, t.snp, t.microcode) == (1, 2, 3, 4, 0x33)
    assert r.launch_mit_vector == 7
    j = report_to_json(r)
    assert j["reported_tcb"] == {"fmc": 1, "bootloader": 2, "tee": 3, "snp": 4, "microcode": 0x33}
    assert report_to_json(parse_report(report_from_json(j))) == j


def test_cert_table_round_trip_and_types() -> None:
    table = build_cert_table([("VCEK", b"v" * 10), ("ASK", b"a" * 3), ("ARK", b"r")])
    entries = parse_cert_table(table + bytes(100))
    assert [(e.cert_type, e.data) for e in entries] == [
        ("VCEK", b"v" * 10),
        ("ASK", b"aaa"),
        ("ARK", b"r"),
    ]
    assert entries[0].to_json() == {"cert_type": "VCEK", "data": list(b"v" * 10)}


def test_cert_table_hostile() -> None:
    with pytest.raises(EvidenceError, match="past the end"):
        parse_cert_table(b"\x01" * 24)
    with pytest.raises(EvidenceError, match="terminating"):
        parse_cert_table(b"\x01" * 16 + bytes(8))
    with pytest.raises(EvidenceError, match="terminating"):
        parse_cert_table(b"")
    table = bytearray(build_cert_table([("VCEK", b"v" * 10)]))
    struct.pack_into("<I", table, 20, 1 << 31)  # length
    with pytest.raises(EvidenceError, match="past the end"):
        parse_cert_table(bytes(table))
    unknown = bytearray(build_cert_table([("VCEK", b"x")]))
    unknown[0] ^= 0xFF
    (entry,) = parse_cert_table(bytes(unknown))
    assert entry.cert_type == "OTHER"
    assert "OTHER" in entry.to_json()["cert_type"]
    many = b"".join(b"\x11" * 16 + struct.pack("<II", 0, 0) for _ in range(100)) + bytes(24)
    with pytest.raises(EvidenceError, match="more than"):
        parse_cert_table(many)


def test_hostile_reports(vectors: Path) -> None:
    good = _read(vectors, "trustee_snp_report_v2_milan.bin")
    for cut in (0, 1, 100, REPORT_SIZE - 1):
        with pytest.raises(EvidenceError, match="expected 1184"):
            parse_report(good[:cut])
    with pytest.raises(EvidenceError, match="expected 1184"):
        parse_report(good + b"\0")
    for version in (0, 1, 6, 0xFFFFFFFF):
        bad = bytearray(good)
        struct.pack_into("<I", bad, 0, version)
        with pytest.raises(EvidenceError, match="version"):
            parse_report(bytes(bad))
    bad = bytearray(good)
    struct.pack_into("<I", bad, 0x34, 2)
    with pytest.raises(EvidenceError, match="signature algorithm"):
        parse_report(bytes(bad))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("measurement"),
        lambda d: d.__setitem__("report_data", [0] * 63),
        lambda d: d.__setitem__("report_data", [256] + [0] * 63),
        lambda d: d.__setitem__("version", -1),
        lambda d: d.__setitem__("version", True),
        lambda d: d.__setitem__("policy", "1"),
        lambda d: d.__setitem__("current_tcb", [1, 2]),
        lambda d: d.__setitem__("signature", {"r": [0] * 72}),
        lambda d: d.__setitem__("current", None),
    ],
)
def test_hostile_serde_json(vectors: Path, mutate: object) -> None:
    doc = json.loads(_read(vectors, "trustee_snp_evidence_e2e.json"))["attestation_report"]
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(EvidenceError):
        report_from_json(doc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_property_report_and_table_any_bytes(data: bytes) -> None:
    for fn in (parse_report, parse_cert_table):
        with contextlib.suppress(EvidenceError):
            fn(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=REPORT_SIZE, max_size=REPORT_SIZE), st.integers(2, 5))
def test_property_sized_reports_parse_or_clean_error(data: bytes, version: int) -> None:
    raw = struct.pack("<I", version) + data[4:0x34] + struct.pack("<I", 1) + data[0x38:]
    j = report_to_json(parse_report(raw))
    assert report_to_json(parse_report(report_from_json(json.loads(json.dumps(j))))) == j


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=5), c),
        max_leaves=20,
    )
)
def test_property_any_json_for_the_report(doc: object) -> None:
    with contextlib.suppress(EvidenceError):
        report_from_json(doc)
