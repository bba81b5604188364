"""Verification of `tpm` evidence as Trustee's TPM verifier does it (SPEC §c.5, §a.9).

Evidence: `{"tpm_quote": {"signature", "message", "pcrs": [24 hex]}, "ak_public": b64 DER SPKI}`.
Checks: the quote (TPMS_ATTEST) is signed by `ak_public` (RSASSA-PKCS1v1_5 / SHA-256), its
extraData equals the expected report data, its PCR digest equals SHA-256 over the selected PCR
values sent alongside, and (when init-data was sent) PCR8 == SHA-256(32 zero bytes || digest).
Returns an error string, or None when the evidence verifies.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

TPM_GENERATED = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_RSASSA = 0x0014
TPM_ALG_SHA256 = 0x000B


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def tpm2b(self) -> bytes:
        return self.take(self.u16())


def _selected_pcrs(r: _Reader) -> list[int]:
    selected: list[int] = []
    for _ in range(r.u32()):
        bank = r.u16()
        bitmap = r.take(r.u8())
        if bank != TPM_ALG_SHA256:
            raise ValueError("quote selects a non-SHA-256 PCR bank")
        selected += [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]
    return selected


def verify_tpm_evidence(
    evidence: Any, report_data: bytes, initdata_digest: bytes | None
) -> str | None:
    try:
        quote = evidence["tpm_quote"]
        message = base64.b64decode(quote["message"], validate=True)
        signature = base64.b64decode(quote["signature"], validate=True)
        pcrs = [bytes.fromhex(p) for p in quote["pcrs"]]
        ak = serialization.load_der_public_key(base64.b64decode(evidence["ak_public"]))
    except (KeyError, TypeError, ValueError) as exc:
        return f"TPM evidence malformed: {exc}"
    if not isinstance(ak, rsa.RSAPublicKey):
        return "TPM AK is not an RSA key"
    try:
        s = _Reader(signature)
        if s.u16() != TPM_ALG_RSASSA or s.u16() != TPM_ALG_SHA256:
            return "TPM quote signature is not RSASSA-SHA256"
        ak.verify(s.tpm2b(), message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return "TPM quote signature does not verify with ak_public"
    except ValueError as exc:
        return f"TPM signature malformed: {exc}"
    try:
        m = _Reader(message)
        if m.u32() != TPM_GENERATED or m.u16() != TPM_ST_ATTEST_QUOTE:
            return "TPM quote is not a TPM2_Quote attestation"
        m.tpm2b()  # qualifiedSigner
        extra = m.tpm2b()
        m.take(8 + 4 + 4 + 1 + 8)  # clockInfo, firmwareVersion
        selected = _selected_pcrs(m)
        pcr_digest = m.tpm2b()
    except ValueError as exc:
        return f"TPM quote malformed: {exc}"
    if extra != report_data:
        return "TPM quote extraData does not match the runtime-data digest"
    if len(pcrs) != 24 or any(len(p) != 32 for p in pcrs) or max(selected, default=0) > 23:
        return "TPM evidence does not carry 24 SHA-256 PCR values"
    if hashlib.sha256(b"".join(pcrs[i] for i in selected)).digest() != pcr_digest:
        return "TPM PCR values do not match the quote's PCR digest"
    if initdata_digest is not None:
        if len(initdata_digest) != 32:
            return "init-data digest must be sha256 on TPM platforms"
        if pcrs[8] != hashlib.sha256(b"\0" * 32 + initdata_digest).digest():
            return "TPM PCR8 does not match the init-data digest"
    return None
