"""TDX quotes v4/v5 and the TDREPORT: upstream vectors, signatures, hostile input, properties."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence.errors import EvidenceError
from evidence.quote import (
    parse_quote,
    parse_tdreport,
    quote_claims,
    tdreport_claims,
    verify_quote,
)
from tests.conftest import VECTORS

Z48 = "00" * 48
V4 = VECTORS / "tdx/trustee_tdx_quote_v4.dat"


def _load(vectors: Path, name: str) -> bytes:
    return (vectors / "tdx" / name).read_bytes()


def test_trustee_v4_claims_equal_trustee_expected_json(vectors: Path) -> None:
    q = parse_quote(_load(vectors, "trustee_tdx_quote_v4.dat"))
    verify_quote(q)
    expected = json.loads(_load(vectors, "trustee_parse_tdx_claims_expected.json"))
    claims = quote_claims(q)
    assert claims["quote"] == expected["quote"]  # header + body, every field, Trustee's names
    assert claims["td_attributes"] == expected["td_attributes"]
    assert claims["report_data"] == expected["report_data"]
    assert claims["init_data"] == expected["init_data"]
    assert q.header.version == 4
    assert (q.length, q.trailing) == (4936, 0)
    body = claims["quote"]["body"]  # type: ignore[index]
    assert body["mr_td"] == (
        "705ee9381b8633a9fbe532b52345e8433343d2868959f57889d84ca377c395b6"
        "89cac1599ccea1b7d420483a9ce5f031"
    )
    assert body["rtmr_0"].startswith("e940da7c2712d279")
    assert body["rtmr_1"].startswith("559cfcf42716ed6c")


def test_trustee_v5_tdx15(vectors: Path) -> None:
    q = parse_quote(_load(vectors, "trustee_tdx_quote_v5_tdx15.dat"))
    verify_quote(q)
    assert (q.header.version, q.body_type) == (5, 3)
    b = quote_claims(q)["quote"]["body"]  # type: ignore[index]
    assert q.header.user_data.hex() == "da2c7e326c5696889a6a6ab4f8a64b1700000000"
    assert b["tcb_svn"] == "05010200000000000000000000000000"
    assert b["mr_td"] == (
        "dfba221b48a22af8511542ee796603f37382800840dcd978703909bf8e64d4c8"
        "a1e9de86e7c9638bfcba422f3886400a"
    )
    assert b["mr_config_id"] == Z48
    assert b["rtmr_0"].startswith("9b529f3689e2e8eb")
    assert b["rtmr_1"].startswith("ca5a979317ffe8a5")
    assert b["report_data"].startswith("6d6ab13b046cff60") and b["report_data"].endswith("fd049f")
    assert b["tee_tcb_svn2"] == "05010200000000000000000000000000"
    assert b["mr_servicetd"].startswith("383c87d3bbb047b2")
    assert struct.unpack_from("<I", _load(vectors, "trustee_tdx_quote_v5_tdx15.dat"), 702)[0]


def test_v4_with_mrconfigid_and_trailing_padding(vectors: Path) -> None:
    data = _load(vectors, "trustee_tdx_quote_v4_mrconfigid.dat")
    q = parse_quote(data)
    verify_quote(q)
    assert (len(data), q.length, q.trailing) == (5006, 4936, 70)
    assert q.body.mr_config_id.hex() == (
        "889abf4718f037e38d74464c11e7c91a6e9890b5546409e1e7df9de7a51ca931"
        "52bf847bd2440328e90adb18b150ed67"
    )
    assert q.body.report_data[48:] == bytes(16)
    assert q.body.report_data[:48].hex().startswith("26cae1c77185617f")
    assert q.body.rtmrs[2].hex().startswith("193edd321148e81f")


def test_gotdx_vectors(vectors: Path) -> None:
    q4 = parse_quote(_load(vectors, "gotdx_quote_v4_SPR_E4.dat"))
    verify_quote(q4)
    assert (q4.length, q4.trailing) == (4935, 39)
    assert q4.body.mr_td.hex().startswith("6363b8043668a3ad")
    assert q4.body.report_data.hex().endswith("281f1113")
    q5 = parse_quote(_load(vectors, "gotdx_quote_v5_sample.dat"))
    verify_quote(q5)
    assert (q5.header.version, q5.body_type) == (5, 3)
    assert q5.body.mr_td.hex().startswith("7348651a34b2d2d3")
    assert q5.body.report_data.hex().startswith("945eaacf5abc1f71")


def test_tdreport_vector(vectors: Path) -> None:
    t = parse_tdreport(_load(vectors, "gc_tdreport_1.bin"))
    assert t.report_type == bytes.fromhex("81000100")
    assert t.rtmrs[0].hex() == (
        "f4ec1a04670fe7926cd5de4aef9aaa7689ab4ceaa132d7c5242b47f67dfaaea6"
        "4c372a17ad68fef9a6ac99aabbddabdc"
    )
    assert t.rtmrs[1].hex() == (
        "4e5f8826653198ab4bc5156fbe4bc99db054c0b8239a16c4b59249fb427f4acc"
        "50eed1b46a85c7d526c4e1e47621b14c"
    )
    assert t.rtmrs[2] == t.rtmrs[3] == bytes(48)
    assert t.mr_td.hex().startswith("98bbc39e3e27b4cb")
    assert t.mr_config_id == bytes(48)
    assert t.report_data == bytes(64)
    assert t.servtd_hash.hex().startswith("383c87d3")
    assert tdreport_claims(t)["init_data"] == Z48


# ---------------------------------------------------------------------------------------------
# tampering and hostile input


@pytest.mark.parametrize(
    ("offset", "match"),
    [
        (184, "TDX quote signature"),  # mr_td
        (632 + 4, "TDX quote signature"),  # the signature itself
        (632 + 4 + 128 + 6 + 10, "QE report signature"),  # inside the QE report
        (632 + 4 + 64 + 3, "TDX quote signature|P-256"),  # attestation key
    ],
)
def test_flipped_bytes_fail_verification(vectors: Path, offset: int, match: str) -> None:
    data = bytearray(_load(vectors, "trustee_tdx_quote_v4.dat"))
    data[offset] ^= 0x01
    with pytest.raises(EvidenceError, match=match):
        verify_quote(parse_quote(bytes(data)))


def test_qe_auth_data_change_breaks_the_binding(vectors: Path) -> None:
    data = bytearray(_load(vectors, "trustee_tdx_quote_v4.dat"))
    auth_off = 632 + 4 + 128 + 6 + 384 + 64 + 2
    data[auth_off] ^= 1
    with pytest.raises(EvidenceError, match="QE report does not bind"):
        verify_quote(parse_quote(bytes(data)))


def test_wrong_versions_and_types(vectors: Path) -> None:
    good = _load(vectors, "trustee_tdx_quote_v4.dat")
    for off, value, match in [
        (0, 3, "version 3"),
        (0, 6, "version 6"),
        (2, 3, "att_key_type"),
        (4, 0, "tee_type"),
    ]:
        bad = bytearray(good)
        struct.pack_into("<H" if off < 4 else "<I", bad, off, value)
        with pytest.raises(EvidenceError, match=match):
            parse_quote(bytes(bad))
    v5 = bytearray(_load(vectors, "trustee_tdx_quote_v5_tdx15.dat"))
    struct.pack_into("<H", v5, 48, 4)
    with pytest.raises(EvidenceError, match="body type 4"):
        parse_quote(bytes(v5))
    v5 = bytearray(_load(vectors, "trustee_tdx_quote_v5_tdx15.dat"))
    struct.pack_into("<I", v5, 50, 584)
    with pytest.raises(EvidenceError, match="size 584"):
        parse_quote(bytes(v5))


def test_lengths_pointing_past_the_end(vectors: Path) -> None:
    good = _load(vectors, "trustee_tdx_quote_v4.dat")
    bad = bytearray(good)
    struct.pack_into("<I", bad, 632, 0xFFFFFFFF)
    with pytest.raises(EvidenceError, match="points past the end"):
        parse_quote(bytes(bad))
    bad = bytearray(good)
    struct.pack_into("<I", bad, 632 + 4 + 128 + 2, 0x7FFFFFFF)  # cert data size
    with pytest.raises(EvidenceError, match="points past"):
        parse_quote(bytes(bad))
    bad = bytearray(good)
    struct.pack_into("<H", bad, 632 + 4 + 128 + 6 + 384 + 64, 0xFFFF)  # QE auth size
    with pytest.raises(EvidenceError, match="QE auth data"):
        parse_quote(bytes(bad))


def test_truncations_are_clean(vectors: Path) -> None:
    good = _load(vectors, "trustee_tdx_quote_v4.dat")
    for cut in (0, 1, 47, 48, 100, 631, 632, 635, 700, 1200, 4935):
        with pytest.raises(EvidenceError):
            parse_quote(good[:cut])


def test_oversized_quote_is_refused() -> None:
    with pytest.raises(EvidenceError, match="limit"):
        parse_quote(bytes(2 * 1024 * 1024))


def test_tdreport_hostile() -> None:
    with pytest.raises(EvidenceError, match="1024"):
        parse_tdreport(bytes(1023))
    with pytest.raises(EvidenceError, match="type"):
        parse_tdreport(bytes(1024))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=6000))
def test_property_any_bytes_parse_or_clean_error(data: bytes) -> None:
    for fn in (parse_quote, parse_tdreport):
        with contextlib.suppress(EvidenceError):
            fn(data)


@pytest.mark.skipif(not V4.exists(), reason="upstream vectors not present")
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_property_mutated_real_quote(data: st.DataObject) -> None:
    base = bytearray(V4.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    with contextlib.suppress(EvidenceError):
        verify_quote(parse_quote(bytes(base[:cut])))
