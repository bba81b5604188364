"""TPM quotes from the upstream vectors (Trustee tpm, az-snp-vtpm, az-tdx-vtpm); hostile input."""

from __future__ import annotations

import base64
import contextlib
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence.errors import EvidenceError
from evidence.quote import parse_quote
from evidence.quote import verify_quote as verify_tdx
from evidence.snp_report import load_certificate, parse_report, verify_report_signature
from evidence.tpm_quote import (
    TpmQuote,
    parse_attest,
    parse_signature,
    pcr_digest,
    quote_from_json,
    tpm_evidence_from_json,
    verify_quote,
)

_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_trustee_tpm_evidence(vectors: Path) -> None:
    doc = json.loads((vectors / "tpm/trustee_tpm_evidence.json").read_text())
    quote, ak = tpm_evidence_from_json(doc)
    attest = verify_quote(quote, ak)
    assert len(quote.pcrs) == 24
    assert len(attest.extra_data.hex()) == 128  # Trustee's report_data claim: 128 hex chars
    assert len(quote.pcrs[8].hex()) == 64  # init_data claim (PCR8): 64 hex chars
    assert attest.selections[0].pcrs == tuple(range(24))
    bad = dict(
        doc, tpm_quote=dict(doc["tpm_quote"], pcrs=["11" * 32, *doc["tpm_quote"]["pcrs"][1:]])
    )
    q2, ak2 = tpm_evidence_from_json(bad)
    with pytest.raises(EvidenceError, match="PCR digest"):
        verify_quote(q2, ak2)


def test_az_snp_vtpm_v2(vectors: Path) -> None:
    doc = json.loads((vectors / "azure/trustee_az_snp_vtpm_evidence_v2.json").read_text())
    assert doc["version"] == 2
    quote = quote_from_json(doc["tpm_quote"], encoding="hex")
    attest = parse_attest(quote.message)
    assert attest.extra_data.hex() == (
        "982f5c6e45df0ed3f10b6f60b02f0c8390e281300f3805e2279c16168cd6ae9a"
        "a398f647caa2338748cd0fd9f5f819ef"
    )
    assert quote.pcrs[0].hex() == "84275b2f4312cd4fc6cbe6b152ad3c3683e513d9f1e23c34fca160c8cca7a6a7"
    assert pcr_digest(attest, quote.pcrs) == attest.pcr_digest
    hcl = base64.urlsafe_b64decode(doc["hcl_report"])
    report = parse_report(hcl[32 : 32 + 1184])  # the HCL report wraps the SNP report
    verify_report_signature(report, load_certificate(base64.urlsafe_b64decode(doc["vcek"]), "VCEK"))


def test_az_tdx_vtpm_v1(vectors: Path) -> None:
    doc = json.loads((vectors / "azure/trustee_az_tdx_vtpm_evidence_v1.json").read_text())
    quote = quote_from_json(doc["tpm_quote"], encoding="hex")
    attest = parse_attest(quote.message)
    assert attest.extra_data == b"challenge"
    assert quote.pcrs[0].hex() == "782b20b10f55cc46e2142cc2145d548698073e5beb82752c8d7f9279f0d8a273"
    assert pcr_digest(attest, quote.pcrs) == attest.pcr_digest
    verify_tdx(parse_quote(base64.urlsafe_b64decode(doc["td_quote"])))


def test_hostile_attest_and_signature(vectors: Path) -> None:
    doc = json.loads((vectors / "tpm/trustee_tpm_evidence.json").read_text())
    message = base64.b64decode(doc["tpm_quote"]["message"])
    for cut in range(len(message)):
        with pytest.raises(EvidenceError):
            parse_attest(message[:cut])
    with pytest.raises(EvidenceError, match="trailing"):
        parse_attest(message + b"\0")
    with pytest.raises(EvidenceError, match="magic"):
        parse_attest(b"\0" * 4 + message[4:])
    with pytest.raises(EvidenceError, match="not a quote"):
        parse_attest(message[:4] + b"\x80\x17" + message[6:])
    long_name = message[:6] + struct.pack(">H", 0xFFFF) + message[8:]
    with pytest.raises(EvidenceError, match="past the end"):
        parse_attest(long_name)
    with pytest.raises(EvidenceError, match="limit"):
        parse_attest(bytes(10000))
    sig = base64.b64decode(doc["tpm_quote"]["signature"])
    assert parse_signature(sig).sig_alg == 0x0014
    with pytest.raises(EvidenceError, match="RSASSA"):
        parse_signature(b"\x00\x18" + sig[2:])
    with pytest.raises(EvidenceError):
        parse_signature(sig[:-1])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("ak_public"),
        lambda d: d.__setitem__("ak_public", "%%%"),
        lambda d: d.__setitem__("ak_public", base64.b64encode(b"junk").decode()),
        lambda d: d["tpm_quote"].__setitem__("pcrs", []),
        lambda d: d["tpm_quote"].__setitem__("pcrs", ["zz"] * 24),
        lambda d: d["tpm_quote"].__setitem__("pcrs", ["00"] * 24),
        lambda d: d["tpm_quote"].__setitem__("message", 5),
        lambda d: d.__setitem__("tpm_quote", []),
    ],
)
def test_hostile_tpm_evidence_json(vectors: Path, mutate: object) -> None:
    doc = json.loads((vectors / "tpm/trustee_tpm_evidence.json").read_text())
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(EvidenceError):
        tpm_evidence_from_json(doc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_property_attest_and_signature(data: bytes) -> None:
    for fn in (parse_attest, parse_signature):
        with contextlib.suppress(EvidenceError):
            fn(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_property_verify_never_escapes(message: bytes, signature: bytes) -> None:
    key = _KEY.public_key()
    with contextlib.suppress(EvidenceError):
        verify_quote(TpmQuote(message, signature, (bytes(32),) * 24), key)
