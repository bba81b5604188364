"""`cva evidence parse`, pure: recognise a quote / report / evidence document and turn it into
claims named as Trustee names them, with the offline verification result.

Recognised: TDX quote v4/v5 (binary), TDREPORT (1024 bytes, type 0x81), SNP report (1184 bytes,
version 2..5), and the JSON evidence objects cva/guest-components send for tdx, snp, tpm, sample.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

from cryptography import x509

from evidence import quote as tdx
from evidence import snp_report as snp
from evidence.errors import EvidenceError
from evidence.tpm_quote import tpm_evidence_from_json, verify_quote

MAX_INPUT = 4 * 1024 * 1024
MAX_JSON_DEPTH = 64


def detect_binary(data: bytes) -> str:
    if len(data) == snp.REPORT_SIZE and struct.unpack_from("<I", data)[0] in snp.VERSIONS:
        return "snp-report"
    if len(data) == tdx.TDREPORT_SIZE and data[0] == tdx.TEE_TDX:
        return "tdreport"
    if len(data) >= 8 and struct.unpack_from("<HHI", data) in ((4, 2, 0x81), (5, 2, 0x81)):
        return "tdx-quote"
    raise EvidenceError(
        f"input ({len(data)} bytes) is not a TDX quote, TDREPORT, SNP report or evidence JSON"
    )


def _tdx_quote(raw: bytes) -> dict[str, Any]:
    q = tdx.parse_quote(raw)
    certs = tdx.verify_quote(q)
    out: dict[str, Any] = {"tee": "tdx", "format": f"tdx-quote-v{q.header.version}"}
    out.update(tdx.quote_claims(q))
    out["body_type"] = "tdx-1.5" if q.body_type == 3 else "tdx-1.0"
    out["signature"] = {
        "verified": True,
        "checks": ["quote ECDSA-P256 by attestation key", "QE report by PCK leaf",
                   "QE report binds attestation key", "PCK chain signatures"],
        "pck_chain": [c.subject.rfc4514_string() for c in certs],
    }  # fmt: skip
    out["trailing_bytes"] = q.trailing
    return out


def _snp(
    raw: bytes, signer: x509.Certificate | None, chain: list[x509.Certificate] | None
) -> dict[str, Any]:
    r = snp.parse_report(raw)
    out: dict[str, Any] = {"tee": "snp", "format": f"snp-report-v{r.version}"}
    out.update(snp.report_claims(r))
    if signer is None:
        out["signature"] = {"verified": False, "reason": "no VCEK/VLEK given (--vcek)"}
        return out
    snp.verify_report_signature(r, signer)
    sig: dict[str, Any] = {"verified": True, "signer": signer.subject.rfc4514_string()}
    if chain:
        if len(chain) < 2:
            raise EvidenceError("--chain must hold the ASK (or ASVK) and the ARK")
        ark = next((c for c in chain if c.subject == c.issuer), chain[-1])
        intermediates = [c for c in chain if c is not ark and c.issuer == ark.subject]
        issuer = next((c for c in intermediates if c.subject == signer.issuer), None)
        if issuer is None:
            raise EvidenceError("--chain holds no certificate that issued the VCEK/VLEK")
        snp.verify_chain(signer, issuer, ark)
        sig["chain"] = [issuer.subject.rfc4514_string(), ark.subject.rfc4514_string()]
    out["signature"] = sig
    return out


def _b64(value: Any, field: str) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * MAX_INPUT:
        raise EvidenceError(f"{field} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceError(f"{field} is not valid base64") from None


def _json_doc(
    doc: Any, signer: x509.Certificate | None, chain: list[x509.Certificate] | None
) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise EvidenceError("evidence JSON must be an object")
    if "quote" in doc:
        out = _tdx_quote(_b64(doc["quote"], "quote"))
        log = doc.get("cc_eventlog")
        out["cc_eventlog_bytes"] = None if log is None else len(_b64(log, "cc_eventlog"))
        return out
    if "attestation_report" in doc:
        raw = snp.report_from_json(doc["attestation_report"])
        certs = doc.get("cert_chain") or []
        if not isinstance(certs, list):
            raise EvidenceError("cert_chain must be a list or null")
        if signer is None:
            for entry in certs:
                if isinstance(entry, dict) and entry.get("cert_type") in ("VCEK", "VLEK"):
                    data = entry.get("data")
                    if not isinstance(data, list) or not all(
                        isinstance(b, int) and 0 <= b < 256 for b in data
                    ):
                        raise EvidenceError("cert_chain data must be byte values")
                    signer = snp.load_certificate(bytes(data), "cert_chain VCEK/VLEK")
        out = _snp(raw, signer, chain)
        out["format"] = "snp-evidence"
        return out
    if "tpm_quote" in doc and "ak_public" in doc:
        quote, ak = tpm_evidence_from_json(doc)
        attest = verify_quote(quote, ak)
        return {
            "tee": "tpm",
            "format": "tpm-evidence",
            "report_data": attest.extra_data.hex(),
            "init_data": quote.pcrs[8].hex(),
            **{f"pcr{i:02d}": p.hex() for i, p in enumerate(quote.pcrs)},
            "signature": {"verified": True, "checks": ["RSA signature by ak_public", "PCR digest"]},
        }
    if set(doc) == {"svn", "report_data"}:
        return {
            "tee": "sample",
            "format": "sample-evidence",
            "svn": str(doc["svn"]),
            "report_data": _b64(doc["report_data"], "report_data").hex(),
        }
    raise EvidenceError("JSON is not tdx, snp, tpm or sample evidence")


def _bounded_json(text: bytes) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise EvidenceError("evidence JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise EvidenceError(f"evidence JSON is malformed: {exc}") from None


def parse_any(
    data: bytes,
    *,
    signer: x509.Certificate | None = None,
    chain: list[x509.Certificate] | None = None,
) -> dict[str, Any]:
    """Claims for any supported input; raises EvidenceError (one line) for anything else."""
    if len(data) > MAX_INPUT:
        raise EvidenceError(f"input is {len(data)} bytes; the limit is {MAX_INPUT}")
    if data.lstrip()[:1] == b"{":
        return _json_doc(_bounded_json(data), signer, chain)
    kind = detect_binary(data)
    if kind == "snp-report":
        return _snp(data, signer, chain)
    if kind == "tdreport":
        out: dict[str, Any] = {"tee": "tdx", "format": "tdreport"}
        out.update(tdx.tdreport_claims(tdx.parse_tdreport(data)))
        out["signature"] = {"verified": False, "reason": "a TDREPORT is MACed, not signed"}
        return out
    return _tdx_quote(data)
