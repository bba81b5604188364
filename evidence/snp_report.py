"""AMD SEV-SNP, pure: ATTESTATION_REPORT v2..v5 (1184 bytes, SPEC §d.6), the GHCB certificate
table (SPEC §d.5), the guest-components/serde JSON form of the report (SPEC §c.3), and offline
verification (report signature by the VCEK/VLEK, VCEK <- ASK <- ARK, VLEK <- ASVK <- ARK).

`cryptography` is imported by the verification functions only: the attester and the binding
check parse reports, and `cva serve` reaches READY=1 without it.
"""

from __future__ import annotations

import struct
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evidence.errors import EvidenceError

if TYPE_CHECKING:
    from cryptography import x509

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
VERSIONS = (2, 3, 4, 5)
SIG_ALGO_ECDSA_P384_SHA384 = 1
MAX_CERT_TABLE = 64 * 1024 * 1024
MAX_CERT_ENTRIES = 64
TURIN_FAMILY = 0x1A

CERT_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "VCEK",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "VLEK",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ASK",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ARK",
    uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea"): "CRL",
}
GUID_OF = {name: guid for guid, name in CERT_GUIDS.items()}


@dataclass(frozen=True)
class Tcb:
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: int, *, turin: bool) -> Tcb:
        b = raw.to_bytes(8, "little")
        if turin:
            return cls(bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0])
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def encode(self) -> int:
        b = bytearray(8)
        if self.fmc is not None:
            b[0], b[1], b[2], b[3] = self.fmc, self.bootloader, self.tee, self.snp
        else:
            b[0], b[1], b[6] = self.bootloader, self.tee, self.snp
        b[7] = self.microcode
        return int.from_bytes(b, "little")

    def to_json(self) -> dict[str, int | None]:
        return {
            "fmc": self.fmc,
            "bootloader": self.bootloader,
            "tee": self.tee,
            "snp": self.snp,
            "microcode": self.microcode,
        }


@dataclass(frozen=True)
class SnpReport:
    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    sig_algo: int
    current_tcb: int
    plat_info: int
    key_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: int
    current: tuple[int, int, int]  # major, minor, build
    committed: tuple[int, int, int]
    launch_tcb: int
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: bytes  # 72 bytes little-endian
    signature_s: bytes

    @property
    def signed(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def signing_key(self) -> str:
        return {0: "VCEK", 1: "VLEK", 7: "none"}.get((self.key_info >> 2) & 7, "reserved")

    @property
    def turin(self) -> bool:
        return self.cpuid_fam_id == TURIN_FAMILY

    def tcb(self, raw: int) -> Tcb:
        return Tcb.decode(raw, turin=self.turin)


def _u(data: bytes, off: int, fmt: str) -> int:
    return int(struct.unpack_from("<" + fmt, data, off)[0])


def parse_report(data: bytes) -> SnpReport:
    """Parse a 1184-byte ATTESTATION_REPORT (version 2..5); raises EvidenceError."""
    data = bytes(data)
    if len(data) != REPORT_SIZE:
        raise EvidenceError(f"SNP report is {len(data)} bytes, expected {REPORT_SIZE}")
    version = _u(data, 0x00, "I")
    if version not in VERSIONS:
        raise EvidenceError(f"SNP report version {version} is not supported (2..5)")
    sig_algo = _u(data, 0x34, "I")
    if sig_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise EvidenceError(f"SNP report signature algorithm {sig_algo} is not ECDSA P-384 (1)")

    def at(off: int, size: int) -> bytes:
        return data[off : off + size]

    v3 = version >= 3
    v5 = version >= 5
    return SnpReport(
        raw=data,
        version=version,
        guest_svn=_u(data, 0x04, "I"),
        policy=_u(data, 0x08, "Q"),
        family_id=at(0x10, 16),
        image_id=at(0x20, 16),
        vmpl=_u(data, 0x30, "I"),
        sig_algo=sig_algo,
        current_tcb=_u(data, 0x38, "Q"),
        plat_info=_u(data, 0x40, "Q"),
        key_info=_u(data, 0x48, "I"),
        report_data=at(0x50, 64),
        measurement=at(0x90, 48),
        host_data=at(0xC0, 32),
        id_key_digest=at(0xE0, 48),
        author_key_digest=at(0x110, 48),
        report_id=at(0x140, 32),
        report_id_ma=at(0x160, 32),
        reported_tcb=_u(data, 0x180, "Q"),
        cpuid_fam_id=data[0x188] if v3 else None,
        cpuid_mod_id=data[0x189] if v3 else None,
        cpuid_step=data[0x18A] if v3 else None,
        chip_id=at(0x1A0, 64),
        committed_tcb=_u(data, 0x1E0, "Q"),
        current=(data[0x1EA], data[0x1E9], data[0x1E8]),
        committed=(data[0x1EE], data[0x1ED], data[0x1EC]),
        launch_tcb=_u(data, 0x1F0, "Q"),
        launch_mit_vector=_u(data, 0x1F8, "Q") if v5 else None,
        current_mit_vector=_u(data, 0x200, "Q") if v5 else None,
        signature_r=at(0x2A0, 72),
        signature_s=at(0x2E8, 72),
    )


# ---------------------------------------------------------------------------------------------
# the serde JSON form guest-components sends (SPEC §c.3)


def report_to_json(r: SnpReport) -> dict[str, Any]:
    def ints(b: bytes) -> list[int]:
        return list(b)

    def version(v: tuple[int, int, int]) -> dict[str, int]:
        return {"major": v[0], "minor": v[1], "build": v[2]}

    return {
        "version": r.version,
        "guest_svn": r.guest_svn,
        "policy": r.policy,
        "family_id": ints(r.family_id),
        "image_id": ints(r.image_id),
        "vmpl": r.vmpl,
        "sig_algo": r.sig_algo,
        "current_tcb": r.tcb(r.current_tcb).to_json(),
        "plat_info": r.plat_info,
        "key_info": r.key_info,
        "report_data": ints(r.report_data),
        "measurement": ints(r.measurement),
        "host_data": ints(r.host_data),
        "id_key_digest": ints(r.id_key_digest),
        "author_key_digest": ints(r.author_key_digest),
        "report_id": ints(r.report_id),
        "report_id_ma": ints(r.report_id_ma),
        "reported_tcb": r.tcb(r.reported_tcb).to_json(),
        "cpuid_fam_id": r.cpuid_fam_id,
        "cpuid_mod_id": r.cpuid_mod_id,
        "cpuid_step": r.cpuid_step,
        "chip_id": ints(r.chip_id),
        "committed_tcb": r.tcb(r.committed_tcb).to_json(),
        "current": version(r.current),
        "committed": version(r.committed),
        "launch_tcb": r.tcb(r.launch_tcb).to_json(),
        "launch_mit_vector": r.launch_mit_vector,
        "current_mit_vector": r.current_mit_vector,
        "signature": {"r": ints(r.signature_r), "s": ints(r.signature_s)},
    }


def _field(doc: dict[str, Any], name: str) -> Any:
    if name not in doc:
        raise EvidenceError(f"attestation_report.{name} is missing")
    return doc[name]


def _int(doc: dict[str, Any], name: str, bits: int, *, optional: bool = False) -> int | None:
    value = doc.get(name) if optional else _field(doc, name)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise EvidenceError(f"attestation_report.{name} must be a u{bits}")
    return value


def _bytes(doc: Any, name: str, size: int) -> bytes:
    value = _field(doc, name)
    if (
        not isinstance(value, list)
        or len(value) != size
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 256 for v in value)
    ):
        raise EvidenceError(f"attestation_report.{name} must be {size} byte values")
    return bytes(value)


def _tcb(doc: dict[str, Any], name: str) -> int:
    value = _field(doc, name)
    if not isinstance(value, dict):
        raise EvidenceError(f"attestation_report.{name} must be a TCB object")
    parts = {k: _int(value, k, 8) for k in ("bootloader", "tee", "snp", "microcode")}
    fmc = _int(value, "fmc", 8, optional=True)
    return Tcb(fmc=fmc, **{k: int(v or 0) for k, v in parts.items()}).encode()


def _ver(doc: dict[str, Any], name: str) -> bytes:
    value = _field(doc, name)
    if not isinstance(value, dict):
        raise EvidenceError(f"attestation_report.{name} must be a version object")
    return bytes([int(_int(value, k, 8) or 0) for k in ("build", "minor", "major")])


def report_from_json(doc: Any) -> bytes:
    """Rebuild the binary report from its serde JSON form (reserved bytes zero)."""
    if not isinstance(doc, dict):
        raise EvidenceError("attestation_report must be a JSON object")
    b = bytearray(REPORT_SIZE)

    def put(off: int, raw: bytes) -> None:
        b[off : off + len(raw)] = raw

    def put_int(off: int, fmt: str, value: int | None) -> None:
        struct.pack_into("<" + fmt, b, off, int(value or 0))

    put_int(0x00, "I", _int(doc, "version", 32))
    put_int(0x04, "I", _int(doc, "guest_svn", 32))
    put_int(0x08, "Q", _int(doc, "policy", 64))
    put(0x10, _bytes(doc, "family_id", 16))
    put(0x20, _bytes(doc, "image_id", 16))
    put_int(0x30, "I", _int(doc, "vmpl", 32))
    put_int(0x34, "I", _int(doc, "sig_algo", 32))
    put_int(0x38, "Q", _tcb(doc, "current_tcb"))
    put_int(0x40, "Q", _int(doc, "plat_info", 64))
    put_int(0x48, "I", _int(doc, "key_info", 32))
    put(0x50, _bytes(doc, "report_data", 64))
    put(0x90, _bytes(doc, "measurement", 48))
    put(0xC0, _bytes(doc, "host_data", 32))
    put(0xE0, _bytes(doc, "id_key_digest", 48))
    put(0x110, _bytes(doc, "author_key_digest", 48))
    put(0x140, _bytes(doc, "report_id", 32))
    put(0x160, _bytes(doc, "report_id_ma", 32))
    put_int(0x180, "Q", _tcb(doc, "reported_tcb"))
    for off, name in ((0x188, "cpuid_fam_id"), (0x189, "cpuid_mod_id"), (0x18A, "cpuid_step")):
        put_int(off, "B", _int(doc, name, 8, optional=True))
    put(0x1A0, _bytes(doc, "chip_id", 64))
    put_int(0x1E0, "Q", _tcb(doc, "committed_tcb"))
    put(0x1E8, _ver(doc, "current"))
    put(0x1EC, _ver(doc, "committed"))
    put_int(0x1F0, "Q", _tcb(doc, "launch_tcb"))
    put_int(0x1F8, "Q", _int(doc, "launch_mit_vector", 64, optional=True))
    put_int(0x200, "Q", _int(doc, "current_mit_vector", 64, optional=True))
    sig = _field(doc, "signature")
    if not isinstance(sig, dict):
        raise EvidenceError("attestation_report.signature must be an object")
    put(0x2A0, _bytes(sig, "r", 72))
    put(0x2E8, _bytes(sig, "s", 72))
    return bytes(b)


# ---------------------------------------------------------------------------------------------
# certificate table (GHCB MSG_REPORT_REQ extended)


@dataclass(frozen=True)
class CertEntry:
    guid: uuid.UUID
    data: bytes

    @property
    def cert_type(self) -> str:
        return CERT_GUIDS.get(self.guid, "OTHER")

    def to_json(self) -> dict[str, Any]:
        kind: Any = self.cert_type if self.cert_type != "OTHER" else {"OTHER": str(self.guid)}
        return {"cert_type": kind, "data": list(self.data)}


def parse_cert_table(buf: bytes) -> list[CertEntry]:
    """Entries `{GUID 16, offset u32, length u32}` up to an all-zero entry; offsets from the
    start of the buffer. Every entry must lie inside the buffer."""
    buf = bytes(buf)
    if len(buf) > MAX_CERT_TABLE:
        raise EvidenceError(f"SNP certificate table is {len(buf)} bytes (limit {MAX_CERT_TABLE})")
    entries: list[CertEntry] = []
    pos = 0
    while True:
        if pos + 24 > len(buf):
            raise EvidenceError("SNP certificate table has no terminating all-zero entry")
        raw_guid = buf[pos : pos + 16]
        offset, length = struct.unpack_from("<II", buf, pos + 16)
        if raw_guid == bytes(16) and offset == 0 and length == 0:
            return entries
        if len(entries) >= MAX_CERT_ENTRIES:
            raise EvidenceError(f"SNP certificate table has more than {MAX_CERT_ENTRIES} entries")
        if offset + length > len(buf):
            raise EvidenceError(
                f"SNP certificate table entry {len(entries)} ({offset}+{length}) points past"
                f" the end ({len(buf)} bytes)"
            )
        entries.append(CertEntry(uuid.UUID(bytes=raw_guid), buf[offset : offset + length]))
        pos += 24


def build_cert_table(entries: Sequence[tuple[str, bytes]]) -> bytes:
    """The inverse of parse_cert_table (used by tests and the fake kernel)."""
    header = bytearray()
    offset = 24 * (len(entries) + 1)
    blobs = b""
    for name, data in entries:
        header += GUID_OF[name].bytes + struct.pack("<II", offset + len(blobs), len(data))
        blobs += data
    return bytes(header + bytes(24) + blobs)


# ---------------------------------------------------------------------------------------------
# verification


def _signature_der(r: SnpReport) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.utils import (  # noqa: PLC0415 - verification
        encode_dss_signature,
    )

    return encode_dss_signature(
        int.from_bytes(r.signature_r, "little"), int.from_bytes(r.signature_s, "little")
    )


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    from cryptography import x509  # noqa: PLC0415 - verification only
    from cryptography.utils import CryptographyDeprecationWarning  # noqa: PLC0415

    try:
        with warnings.catch_warnings():
            # AMD's VCEKs carry a zero serial number; cryptography warns but parses them
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            if data.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise EvidenceError(f"{what} is not an X.509 certificate: {exc}") from None


def verify_report_signature(r: SnpReport, signer: x509.Certificate) -> None:
    """The report's ECDSA P-384 signature with the VCEK/VLEK certificate's key."""
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - verification only
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    key = signer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise EvidenceError("the VCEK/VLEK key is not an ECDSA P-384 key")
    try:
        key.verify(_signature_der(r), r.signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise EvidenceError(
            "SNP report signature does not verify with the given VCEK/VLEK"
        ) from None


def _issued_by(child: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - verification only

    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise EvidenceError(f"{what}: signature check failed") from None


def verify_chain(
    signer: x509.Certificate, ask_or_asvk: x509.Certificate, ark: x509.Certificate
) -> None:
    """VCEK <- ASK <- ARK (or VLEK <- ASVK <- ARK), ARK self-signed."""
    _issued_by(ark, ark, "ARK is not self-signed")
    _issued_by(ask_or_asvk, ark, "ASK/ASVK is not signed by the ARK")
    _issued_by(signer, ask_or_asvk, "VCEK/VLEK is not signed by the ASK/ASVK")


# ---------------------------------------------------------------------------------------------
# claims


def report_claims(r: SnpReport) -> dict[str, Any]:
    """Hex/integer claims named as Trustee names them for SNP."""
    tcb = r.tcb(r.reported_tcb)
    claims: dict[str, Any] = {
        "version": r.version,
        "guest_svn": r.guest_svn,
        "policy": f"{r.policy:#x}",
        "policy_abi_major": (r.policy >> 8) & 0xFF,
        "policy_abi_minor": r.policy & 0xFF,
        "policy_smt_allowed": bool(r.policy >> 16 & 1),
        "policy_migrate_ma": bool(r.policy >> 18 & 1),
        "policy_debug_allowed": bool(r.policy >> 19 & 1),
        "policy_single_socket": bool(r.policy >> 20 & 1),
        "family_id": r.family_id.hex(),
        "image_id": r.image_id.hex(),
        "vmpl": r.vmpl,
        "sig_algo": r.sig_algo,
        "platform_info": f"{r.plat_info:#x}",
        "platform_smt_enabled": bool(r.plat_info & 1),
        "platform_tsme_enabled": bool(r.plat_info >> 1 & 1),
        "signing_key": r.signing_key,
        "report_data": r.report_data.hex(),
        "measurement": r.measurement.hex(),
        "host_data": r.host_data.hex(),
        "init_data": r.host_data.hex(),
        "id_key_digest": r.id_key_digest.hex(),
        "author_key_digest": r.author_key_digest.hex(),
        "report_id": r.report_id.hex(),
        "report_id_ma": r.report_id_ma.hex(),
        "reported_tcb_bootloader": tcb.bootloader,
        "reported_tcb_tee": tcb.tee,
        "reported_tcb_snp": tcb.snp,
        "reported_tcb_microcode": tcb.microcode,
        "current_tcb": f"{r.current_tcb:#018x}",
        "reported_tcb": f"{r.reported_tcb:#018x}",
        "committed_tcb": f"{r.committed_tcb:#018x}",
        "launch_tcb": f"{r.launch_tcb:#018x}",
        "chip_id": r.chip_id.hex(),
    }
    if tcb.fmc is not None:
        claims["reported_tcb_fmc"] = tcb.fmc
    if r.cpuid_fam_id is not None:
        claims["cpuid_fam_id"] = r.cpuid_fam_id
        claims["cpuid_mod_id"] = r.cpuid_mod_id
        claims["cpuid_step"] = r.cpuid_step
    return claims
