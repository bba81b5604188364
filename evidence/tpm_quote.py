"""TPM 2.0 quotes, pure: TPMS_ATTEST and TPMT_SIGNATURE parsing and offline verification.

Used for the `tpm` evidence cva emits (SPEC §c.5) and to check the vectors (Trustee `tpm`,
`az-*-vtpm`). All TPM integers are big-endian. Verification: the RSASSA/RSAPSS-SHA256 signature
over the marshalled TPMS_ATTEST with the AK public key, the attestation type is a quote, and the
quote's PCR digest equals SHA-256 over the reported PCR values in selection order.

`cryptography` is imported by the verification functions only: the attester and the binding
check parse quotes, and `cva serve` reaches READY=1 without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evidence.errors import EvidenceError
from evidence.reader import Reader

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

TPM_GENERATED = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
ALG_SHA1, ALG_SHA256, ALG_SHA384, ALG_SHA512 = 0x0004, 0x000B, 0x000C, 0x000D
ALG_RSASSA, ALG_RSAPSS = 0x0014, 0x0016
HASH_NAMES = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}
MAX_MESSAGE = 4096
MAX_SIGNATURE = 1024
PCR_COUNT = 24


@dataclass(frozen=True)
class PcrSelection:
    hash_alg: int
    pcrs: tuple[int, ...]


@dataclass(frozen=True)
class TpmAttest:
    """A parsed TPMS_ATTEST of type quote."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    selections: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class TpmSignature:
    sig_alg: int
    hash_alg: int
    signature: bytes


@dataclass(frozen=True)
class TpmQuote:
    """The three parts of a quote as they travel: message, signature, the PCR values (SHA-256)."""

    message: bytes
    signature: bytes
    pcrs: tuple[bytes, ...]


def parse_attest(message: bytes) -> TpmAttest:
    """Parse a marshalled TPMS_ATTEST that must be a quote; trailing bytes are refused."""
    if len(message) > MAX_MESSAGE:
        raise EvidenceError(f"TPM attest is {len(message)} bytes; the limit is {MAX_MESSAGE}")
    r = Reader(bytes(message), "TPMS_ATTEST")
    magic = r.u32be("magic")
    if magic != TPM_GENERATED:
        raise EvidenceError(f"TPMS_ATTEST: magic {magic:#010x} is not TPM_GENERATED_VALUE")
    st = r.u16be("type")
    if st != TPM_ST_ATTEST_QUOTE:
        raise EvidenceError(f"TPMS_ATTEST: type {st:#06x} is not a quote (0x8018)")
    signer = r.sized16be("qualifiedSigner")
    extra = r.sized16be("extraData")
    clock = r.u64be("clock")
    reset = r.u32be("resetCount")
    restart = r.u32be("restartCount")
    safe = r.u8("safe")
    fw = r.u64be("firmwareVersion")
    count = r.u32be("pcrSelect count")
    if count > 16:
        raise EvidenceError(f"TPMS_ATTEST: {count} PCR selections (at most 16)")
    selections = []
    for _ in range(count):
        alg = r.u16be("pcrSelect hash")
        size = r.u8("sizeofSelect")
        if size > 4:
            raise EvidenceError(f"TPMS_ATTEST: PCR select of {size} bytes (at most 4)")
        bitmap = r.take(size, "pcrSelect")
        pcrs = tuple(i for i in range(size * 8) if bitmap[i // 8] & (1 << (i % 8)))
        selections.append(PcrSelection(alg, pcrs))
    digest = r.sized16be("pcrDigest")
    if r.remaining:
        raise EvidenceError(f"TPMS_ATTEST: {r.remaining} trailing bytes")
    return TpmAttest(
        signer, extra, clock, reset, restart, bool(safe), fw, tuple(selections), digest
    )


def parse_signature(blob: bytes) -> TpmSignature:
    """Parse a marshalled TPMT_SIGNATURE (RSASSA or RSAPSS)."""
    if len(blob) > MAX_SIGNATURE:
        raise EvidenceError(f"TPM signature is {len(blob)} bytes; the limit is {MAX_SIGNATURE}")
    r = Reader(bytes(blob), "TPMT_SIGNATURE")
    alg = r.u16be("sigAlg")
    if alg not in (ALG_RSASSA, ALG_RSAPSS):
        raise EvidenceError(f"TPMT_SIGNATURE: algorithm {alg:#06x} is not RSASSA or RSAPSS")
    hash_alg = r.u16be("hash")
    sig = r.sized16be("signature")
    if r.remaining:
        raise EvidenceError(f"TPMT_SIGNATURE: {r.remaining} trailing bytes")
    return TpmSignature(alg, hash_alg, sig)


def load_ak_public(der: bytes) -> rsa.RSAPublicKey:
    """An RSA SubjectPublicKeyInfo (DER), as in the `ak_public` field."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - verification
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    try:
        key = serialization.load_der_public_key(bytes(der))
    except (ValueError, TypeError) as exc:
        raise EvidenceError(f"ak_public is not a DER SubjectPublicKeyInfo: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise EvidenceError(f"ak_public is a {type(key).__name__}, not an RSA key")
    return key


def pcr_digest(attest: TpmAttest, pcrs: Sequence[bytes]) -> bytes:
    """SHA-256 over the selected PCR values (SHA-256 bank only), in selection order."""
    out = hashlib.sha256()
    for sel in attest.selections:
        if sel.hash_alg != ALG_SHA256:
            raise EvidenceError(f"quote selects hash {sel.hash_alg:#06x}; only SHA-256 is read")
        for index in sel.pcrs:
            if index >= len(pcrs):
                raise EvidenceError(f"quote selects PCR {index} but only {len(pcrs)} are given")
            out.update(pcrs[index])
    return out.digest()


def verify_quote(quote: TpmQuote, ak: rsa.RSAPublicKey) -> TpmAttest:
    """Verify signature and PCR digest; return the parsed attest (caller checks extraData)."""
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - verification only
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415

    attest = parse_attest(quote.message)
    sig = parse_signature(quote.signature)
    if sig.hash_alg != ALG_SHA256:
        raise EvidenceError(f"TPM signature hash {sig.hash_alg:#06x} is not SHA-256")
    pad: padding.AsymmetricPadding
    if sig.sig_alg == ALG_RSASSA:
        pad = padding.PKCS1v15()
    else:
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
    try:
        ak.verify(sig.signature, quote.message, pad, hashes.SHA256())
    except InvalidSignature:
        raise EvidenceError("TPM quote signature does not verify with the AK") from None
    if pcr_digest(attest, quote.pcrs) != attest.pcr_digest:
        raise EvidenceError("TPM quote PCR digest does not match the reported PCR values")
    return attest


# ---------------------------------------------------------------------------------------------
# evidence documents


def _decode(value: Any, field: str, *, encoding: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * limit + 8:
        raise EvidenceError(f"{field} must be a {encoding} string of at most {limit} bytes")
    try:
        if encoding == "hex":
            return bytes.fromhex(value)
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise EvidenceError(f"{field} is not valid {encoding}") from None


def quote_from_json(doc: Any, *, encoding: str) -> TpmQuote:
    """`{"message", "signature", "pcrs": [24 hex]}`; message/signature are base64 for `tpm`
    evidence and hex for the az-*-vtpm evidence."""
    if not isinstance(doc, dict):
        raise EvidenceError("tpm_quote must be a JSON object")
    message = _decode(doc.get("message"), "tpm_quote.message", encoding=encoding, limit=MAX_MESSAGE)
    signature = _decode(
        doc.get("signature"), "tpm_quote.signature", encoding=encoding, limit=MAX_SIGNATURE
    )
    raw_pcrs = doc.get("pcrs")
    if not isinstance(raw_pcrs, list) or len(raw_pcrs) != PCR_COUNT:
        raise EvidenceError(f"tpm_quote.pcrs must be a list of {PCR_COUNT} hex strings")
    pcrs = tuple(_decode(p, "tpm_quote.pcrs[]", encoding="hex", limit=32) for p in raw_pcrs)
    if any(len(p) != 32 for p in pcrs):
        raise EvidenceError("tpm_quote.pcrs entries must be 32-byte SHA-256 values")
    return TpmQuote(message, signature, pcrs)


def tpm_evidence_from_json(doc: Any) -> tuple[TpmQuote, rsa.RSAPublicKey]:
    """The `tpm` evidence object: `{"tpm_quote": {...base64...}, "ak_public": base64 DER}`."""
    if not isinstance(doc, dict):
        raise EvidenceError("tpm evidence must be a JSON object")
    quote = quote_from_json(doc.get("tpm_quote"), encoding="base64")
    ak = load_ak_public(_decode(doc.get("ak_public"), "ak_public", encoding="base64", limit=4096))
    return quote, ak
