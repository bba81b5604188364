"""Intel TDX, pure: DCAP ECDSA quotes v4/v5 (TDX 1.0 and 1.5 bodies) and the TDREPORT (SPEC §d.2,
§d.3), plus the offline checks the quote allows.

All integers little-endian. A quote is `header (48) | [v5: body type u16, body size u32] | body
(584 or 648) | signature_data_len u32 | signature_data`; anything after signature_data is padding
from a fixed-size buffer and is ignored (never signed). Offline verification: the ECDSA-P256
signature over header+body with the attestation key, the QE report's signature by the PCK leaf
certificate, the QE report binding `SHA-256(attestation key || QE auth data)`, and the PCK chain's
internal signatures (leaf <- intermediate <- self-signed root). Whether that root is Intel's and
whether the TCB is current is the KBS verifier's job (it has the collateral).

`cryptography` is imported by the verification functions only: the attester and the binding
check parse reports and quotes, and `cva serve` reaches READY=1 without it.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evidence.errors import EvidenceError
from evidence.reader import Reader

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

MAX_QUOTE = 1024 * 1024
HEADER_SIZE = 48
BODY_10 = 584
BODY_15 = 648
TEE_TDX = 0x81
ATT_KEY_ECDSA_P256 = 2
CERT_QE_REPORT = 6
CERT_PCK_CHAIN = 5
QE_REPORT_SIZE = 384
INTEL_QE_VENDOR = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
TDREPORT_SIZE = 1024


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    reserved: bytes
    qe_vendor_id: bytes
    user_data: bytes
    raw: bytes


@dataclass(frozen=True)
class TdBody:
    """The TD report body (TDX 1.0; 1.5 adds tee_tcb_svn2 and mr_servicetd)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mrsigner_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_servicetd: bytes | None = None


@dataclass(frozen=True)
class QeCertification:
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes


@dataclass(frozen=True)
class TdxQuote:
    header: QuoteHeader
    body_type: int  # 2 = TDX 1.0, 3 = TDX 1.5 (v4 quotes are always 2)
    body: TdBody
    signed: bytes  # header + (v5 type/size) + body: what the attestation key signs
    signature: bytes  # r || s, 64 bytes big-endian
    attestation_key: bytes  # x || y, 64 bytes
    qe: QeCertification
    length: int  # bytes used, without trailing padding
    trailing: int


def _body(r: Reader, size: int) -> TdBody:
    tee_tcb_svn = r.take(16, "tee_tcb_svn")
    mr_seam = r.take(48, "mr_seam")
    mrsigner_seam = r.take(48, "mrsigner_seam")
    seam_attributes = r.take(8, "seam_attributes")
    td_attributes = r.take(8, "td_attributes")
    xfam = r.take(8, "xfam")
    mr_td = r.take(48, "mr_td")
    mr_config_id = r.take(48, "mr_config_id")
    mr_owner = r.take(48, "mr_owner")
    mr_owner_config = r.take(48, "mr_owner_config")
    rtmrs = (r.take(48, "rtmr_0"), r.take(48, "rtmr_1"), r.take(48, "rtmr_2"), r.take(48, "rtmr_3"))
    report_data = r.take(64, "report_data")
    svn2 = servtd = None
    if size == BODY_15:
        svn2 = r.take(16, "tee_tcb_svn2")
        servtd = r.take(48, "mr_servicetd")
    return TdBody(
        tee_tcb_svn, mr_seam, mrsigner_seam, seam_attributes, td_attributes, xfam, mr_td,
        mr_config_id, mr_owner, mr_owner_config, rtmrs, report_data, svn2, servtd,
    )  # fmt: skip


def parse_quote(data: bytes) -> TdxQuote:
    """Parse a TDX DCAP quote v4 or v5; raises EvidenceError for anything else."""
    data = bytes(data)
    if len(data) > MAX_QUOTE:
        raise EvidenceError(f"TDX quote is {len(data)} bytes; the limit is {MAX_QUOTE}")
    r = Reader(data, "TDX quote")
    raw_header = r.take(HEADER_SIZE, "header")
    h = Reader(raw_header, "TDX quote header")
    header = QuoteHeader(
        h.u16le("version"), h.u16le("att_key_type"), h.u32le("tee_type"),
        h.take(4, "reserved"), h.take(16, "qe_vendor_id"), h.take(20, "user_data"), raw_header,
    )  # fmt: skip
    if header.version not in (4, 5):
        raise EvidenceError(f"TDX quote version {header.version} is not supported (4 or 5)")
    if header.tee_type != TEE_TDX:
        raise EvidenceError(f"quote tee_type {header.tee_type:#x} is not TDX (0x81)")
    if header.att_key_type != ATT_KEY_ECDSA_P256:
        raise EvidenceError(f"quote att_key_type {header.att_key_type} is not ECDSA-P256 (2)")
    if header.version == 4:
        body_type, size = 2, BODY_10
    else:
        body_type = r.u16le("body type")
        size = r.u32le("body size")
        expected = {2: BODY_10, 3: BODY_15}.get(body_type)
        if expected is None:
            raise EvidenceError(f"TDX quote v5 body type {body_type} is not a TD report (2 or 3)")
        if size != expected:
            raise EvidenceError(
                f"TDX quote v5 body type {body_type} has size {size}, not {expected}"
            )
    body = _body(r, size)
    signed = data[: r.pos]
    sig_len = r.u32le("signature_data_len")
    s = Reader(data, "TDX quote signature data", start=r.pos, end=r.pos + min(sig_len, r.remaining))
    if sig_len > r.remaining:
        raise EvidenceError(
            f"TDX quote signature_data_len {sig_len} points past the end ({r.remaining} left)"
        )
    signature = s.take(64, "signature")
    att_key = s.take(64, "attestation key")
    cert_type = s.u16le("certification data type")
    cert_size = s.u32le("certification data size")
    if cert_type != CERT_QE_REPORT:
        raise EvidenceError(f"TDX quote certification data type {cert_type} is not 6 (QE report)")
    c = Reader(data, "QE certification data", start=s.pos, end=s.pos + min(cert_size, s.remaining))
    if cert_size > s.remaining:
        raise EvidenceError(
            f"QE certification data size {cert_size} points past the signature data"
            f" ({s.remaining} left)"
        )
    qe_report = c.take(QE_REPORT_SIZE, "QE report")
    qe_sig = c.take(64, "QE report signature")
    auth = c.take(c.u16le("QE auth data size"), "QE auth data")
    inner_type = c.u16le("PCK certification data type")
    inner = c.take(c.u32le("PCK certification data size"), "PCK certification data")
    qe = QeCertification(qe_report, qe_sig, auth, inner_type, inner)
    end = r.pos + sig_len
    return TdxQuote(header, body_type, body, signed, signature, att_key, qe, end, len(data) - end)


# ---------------------------------------------------------------------------------------------
# verification


def _p256_key(xy: bytes) -> ec.EllipticCurvePublicKey:
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - verification only

    x, y = int.from_bytes(xy[:32], "big"), int.from_bytes(xy[32:], "big")
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except ValueError:
        raise EvidenceError("TDX quote attestation key is not a P-256 point") from None


def _verify_p256(key: ec.EllipticCurvePublicKey, rs: bytes, message: bytes, what: str) -> None:
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - verification only
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.utils import (  # noqa: PLC0415
        encode_dss_signature,
    )

    der = encode_dss_signature(int.from_bytes(rs[:32], "big"), int.from_bytes(rs[32:], "big"))
    try:
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise EvidenceError(f"{what} does not verify") from None


def pck_chain(quote: TdxQuote) -> list[x509.Certificate]:
    """The PCK certificate chain (leaf first) from certification data type 5."""
    from cryptography import x509  # noqa: PLC0415 - verification only

    if quote.qe.cert_type != CERT_PCK_CHAIN:
        raise EvidenceError(
            f"QE certification data type {quote.qe.cert_type} is not 5 (PCK chain);"
            " cannot verify offline"
        )
    try:
        certs = x509.load_pem_x509_certificates(quote.qe.cert_data.rstrip(b"\0"))
    except ValueError as exc:
        raise EvidenceError(f"PCK certificate chain is not valid PEM: {exc}") from None
    if len(certs) < 2:
        raise EvidenceError(f"PCK certificate chain has {len(certs)} certificate(s), need >= 2")
    return certs


def _check_chain(certs: list[x509.Certificate]) -> None:
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - verification only

    for child, issuer in itertools.pairwise(certs):
        try:
            child.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise EvidenceError(
                f"PCK chain: {child.subject.rfc4514_string()} is not signed by"
                f" {issuer.subject.rfc4514_string()}"
            ) from None
    root = certs[-1]
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise EvidenceError("PCK chain root is not self-signed") from None


def verify_quote(quote: TdxQuote) -> list[x509.Certificate]:
    """All offline checks; returns the PCK chain (leaf first). Raises EvidenceError."""
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - verification only

    _verify_p256(
        _p256_key(quote.attestation_key), quote.signature, quote.signed, "TDX quote signature"
    )
    certs = pck_chain(quote)
    leaf = certs[0].public_key()
    if not isinstance(leaf, ec.EllipticCurvePublicKey):
        raise EvidenceError("PCK leaf certificate key is not an EC key")
    _verify_p256(leaf, quote.qe.qe_report_signature, quote.qe.qe_report, "QE report signature")
    qe_report_data = quote.qe.qe_report[320:384]
    binding = hashlib.sha256(quote.attestation_key + quote.qe.qe_auth_data).digest()
    if qe_report_data != binding + bytes(32):
        raise EvidenceError("QE report does not bind the quote's attestation key")
    _check_chain(certs)
    return certs


# ---------------------------------------------------------------------------------------------
# TDREPORT


@dataclass(frozen=True)
class TdReport:
    """TDREPORT_STRUCT (1024 bytes) from TDX_CMD_GET_REPORT0."""

    report_type: bytes
    cpu_svn: bytes
    tee_tcb_info_hash: bytes
    tee_info_hash: bytes
    report_data: bytes
    mac: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    servtd_hash: bytes


def parse_tdreport(data: bytes) -> TdReport:
    data = bytes(data)
    if len(data) != TDREPORT_SIZE:
        raise EvidenceError(f"TDREPORT is {len(data)} bytes, expected {TDREPORT_SIZE}")
    if data[0] != TEE_TDX:
        raise EvidenceError(f"TDREPORT type {data[0]:#x} is not TDX (0x81)")

    def at(off: int, size: int) -> bytes:
        return data[off : off + size]

    return TdReport(
        at(0, 4), at(16, 16), at(32, 48), at(80, 48), at(128, 64), at(224, 32),
        at(512, 8), at(520, 8), at(528, 48), at(576, 48), at(624, 48), at(672, 48),
        (at(720, 48), at(768, 48), at(816, 48), at(864, 48)), at(912, 48),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# claims (Trustee's names)


def td_attribute_flags(td_attributes: bytes) -> dict[str, bool]:
    """Trustee's decoded `td_attributes` claim."""
    value = int.from_bytes(td_attributes, "little")
    return {
        "debug": bool(value & 1),
        "septve_disable": bool(value & (1 << 28)),
        "protection_keys": bool(value & (1 << 30)),
        "key_locker": bool(value & (1 << 31)),
        "perfmon": bool(value & (1 << 63)),
    }


def _body_claims(b: TdBody) -> dict[str, str]:
    out = {
        "tcb_svn": b.tee_tcb_svn.hex(),
        "mr_seam": b.mr_seam.hex(),
        "mrsigner_seam": b.mrsigner_seam.hex(),
        "seam_attributes": b.seam_attributes.hex(),
        "td_attributes": b.td_attributes.hex(),
        "xfam": b.xfam.hex(),
        "mr_td": b.mr_td.hex(),
        "mr_config_id": b.mr_config_id.hex(),
        "mr_owner": b.mr_owner.hex(),
        "mr_owner_config": b.mr_owner_config.hex(),
        **{f"rtmr_{i}": m.hex() for i, m in enumerate(b.rtmrs)},
        "report_data": b.report_data.hex(),
    }
    if b.tee_tcb_svn2 is not None and b.mr_servicetd is not None:
        out["tee_tcb_svn2"] = b.tee_tcb_svn2.hex()
        out["mr_servicetd"] = b.mr_servicetd.hex()
    return out


def quote_claims(q: TdxQuote) -> dict[str, object]:
    """The quote as Trustee's claims (`quote.header.*`, `quote.body.*`, `td_attributes`, ...)."""
    raw = q.header.raw
    return {
        "quote": {
            "header": {
                "version": raw[0:2].hex(),
                "att_key_type": raw[2:4].hex(),
                "tee_type": raw[4:8].hex(),
                "reserved": raw[8:12].hex(),
                "vendor_id": raw[12:28].hex(),
                "user_data": raw[28:48].hex(),
            },
            "body": _body_claims(q.body),
        },
        "td_attributes": td_attribute_flags(q.body.td_attributes),
        "init_data": q.body.mr_config_id.hex(),
        "report_data": q.body.report_data.hex(),
    }


def tdreport_claims(t: TdReport) -> dict[str, object]:
    return {
        "tdreport": {
            "report_type": t.report_type.hex(),
            "cpu_svn": t.cpu_svn.hex(),
            "tee_tcb_info_hash": t.tee_tcb_info_hash.hex(),
            "tee_info_hash": t.tee_info_hash.hex(),
            "td_attributes": t.td_attributes.hex(),
            "xfam": t.xfam.hex(),
            "mr_td": t.mr_td.hex(),
            "mr_config_id": t.mr_config_id.hex(),
            "mr_owner": t.mr_owner.hex(),
            "mr_owner_config": t.mr_owner_config.hex(),
            **{f"rtmr_{i}": m.hex() for i, m in enumerate(t.rtmrs)},
            "servtd_hash": t.servtd_hash.hex(),
            "report_data": t.report_data.hex(),
        },
        "td_attributes": td_attribute_flags(t.td_attributes),
        "init_data": t.mr_config_id.hex(),
        "report_data": t.report_data.hex(),
    }
