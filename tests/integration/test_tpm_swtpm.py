"""The TPM attester against a real software TPM (swtpm): AK, quote, verification, PCR8 binding."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from agent.binding import check_initdata_binding
from agent.initdata import parse_initdata
from evidence.errors import AttesterUnavailable, BindingError, EvidenceError
from evidence.tpm import AK_HANDLE, TpmAttester
from evidence.tpm_quote import parse_attest, tpm_evidence_from_json, verify_quote

pytestmark = pytest.mark.swtpm

SHA256_DOC = b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"cva.toml" = "x"\n'
OTHER_DOC = b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"cva.toml" = "y"\n'


def _check_quote_independently(ev: dict[str, object], report_data: bytes) -> None:
    """Verify with `cryptography` alone (not evidence.tpm_quote): signature and extraData."""
    quote = ev["tpm_quote"]
    assert isinstance(quote, dict)
    message = base64.b64decode(quote["message"])
    signature = base64.b64decode(quote["signature"])
    key = serialization.load_der_public_key(base64.b64decode(ev["ak_public"]))  # type: ignore[arg-type]
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 2048
    sig_alg, hash_alg, size = struct.unpack(">HHH", signature[:6])
    assert (sig_alg, hash_alg) == (0x0014, 0x000B)  # RSASSA, SHA-256
    key.verify(signature[6 : 6 + size], message, padding.PKCS1v15(), hashes.SHA256())
    assert message[:4] == b"\xffTCG"
    assert struct.unpack(">H", message[4:6])[0] == 0x8018
    name_len = struct.unpack(">H", message[6:8])[0]
    off = 8 + name_len
    extra_len = struct.unpack(">H", message[off : off + 2])[0]
    assert message[off + 2 : off + 2 + extra_len] == report_data[:32].ljust(32, b"\0")
    pcrs = [bytes.fromhex(p) for p in quote["pcrs"]]
    assert len(pcrs) == 24
    assert message.endswith(b"\x00\x20" + hashlib.sha256(b"".join(pcrs)).digest())


def test_ak_is_created_then_reused_and_quote_verifies(swtpm_tcti: str) -> None:
    att = TpmAttester(swtpm_tcti)
    assert att.tee == "tpm"
    rd = hashlib.sha384(b"runtime data").digest()
    ev1 = att.evidence(rd)
    assert set(ev1) == {"tpm_quote", "ak_public"}
    assert set(ev1["tpm_quote"]) == {"signature", "message", "pcrs"}
    _check_quote_independently(ev1, rd)
    # the AK now lives at the persistent handle and is reused
    ev2 = att.evidence(b"short")
    assert ev2["ak_public"] == ev1["ak_public"]
    _check_quote_independently(ev2, b"short")
    # our own parser/verifier agrees
    quote, ak = tpm_evidence_from_json(ev1)
    attest = verify_quote(quote, ak)
    assert attest.extra_data == rd[:32]
    assert attest.selections[0].pcrs == tuple(range(24))


def test_ak_handle_is_the_coco_default(swtpm_tcti: str) -> None:
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import TPM2_CAP

    TpmAttester(swtpm_tcti).evidence(b"")
    ctx = ESAPI(swtpm_tcti)
    try:
        _more, cap = ctx.get_capability(TPM2_CAP.HANDLES, 0x81000000, 32)
        assert AK_HANDLE == 0x81010002
        assert 0x81010002 in [int(h) for h in cap.data.handles]
    finally:
        ctx.close()


def test_tampered_quote_is_refused(swtpm_tcti: str) -> None:
    ev = TpmAttester(swtpm_tcti).evidence(b"a" * 48)
    quote, ak = tpm_evidence_from_json(ev)
    msg = bytearray(quote.message)
    msg[-1] ^= 1
    with pytest.raises(EvidenceError, match="signature"):
        verify_quote(type(quote)(bytes(msg), quote.signature, quote.pcrs), ak)
    pcrs = list(quote.pcrs)
    pcrs[3] = b"\x01" * 32
    with pytest.raises(EvidenceError, match="PCR digest"):
        verify_quote(type(quote)(quote.message, quote.signature, tuple(pcrs)), ak)
    assert parse_attest(quote.message).extra_data == b"a" * 32


def test_report_data_over_64_bytes_is_refused(swtpm_tcti: str) -> None:
    with pytest.raises(EvidenceError, match="at most 64"):
        TpmAttester(swtpm_tcti).evidence(b"x" * 65)


def test_pcr8_binding_extends_once_then_matches(swtpm_tcti: str) -> None:
    att = TpmAttester(swtpm_tcti)
    initdata = parse_initdata(SHA256_DOC)
    assert att.initdata_binding() == bytes(32)
    check_initdata_binding(initdata, att)  # PCR8 was zero: extended
    expected = hashlib.sha256(bytes(32) + hashlib.sha256(SHA256_DOC).digest()).digest()
    assert att.initdata_binding() == expected
    check_initdata_binding(initdata, att)  # second start: not extended again
    assert att.initdata_binding() == expected
    ev = att.evidence(b"")
    assert ev["tpm_quote"]["pcrs"][8] == expected.hex()


def test_pcr8_binding_mismatch_is_fatal_and_names_both(swtpm_tcti: str) -> None:
    att = TpmAttester(swtpm_tcti)
    check_initdata_binding(parse_initdata(SHA256_DOC), att)
    measured = att.initdata_binding()
    assert measured is not None
    other = parse_initdata(OTHER_DOC)
    expected = hashlib.sha256(bytes(32) + other.digest()).digest()
    with pytest.raises(BindingError) as info:
        check_initdata_binding(other, att)
    assert expected.hex() in info.value.message
    assert measured.hex() in info.value.message
    assert att.initdata_binding() == measured  # a mismatch never extends


def test_pcr8_already_extended_by_someone_else_is_refused(swtpm_tcti: str) -> None:
    att = TpmAttester(swtpm_tcti)
    att.extend_initdata(b"\x42" * 32)
    with pytest.raises(BindingError, match="PCR8"):
        check_initdata_binding(parse_initdata(SHA256_DOC), att)


def test_existing_non_restricted_key_at_ak_handle_is_refused(swtpm_tcti: str) -> None:
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT
    from tpm2_pytss.types import TPM2B_PUBLIC

    ctx = ESAPI(swtpm_tcti)
    try:
        attrs = (
            TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH
            | TPMA_OBJECT.SIGN_ENCRYPT
            | TPMA_OBJECT.DECRYPT
        )
        tmpl = TPM2B_PUBLIC.parse("rsa2048:null:null", objectAttributes=attrs)
        h, *_ = ctx.create_primary(None, tmpl, ESYS_TR.OWNER)
        ctx.evict_control(ESYS_TR.OWNER, h, AK_HANDLE)
        ctx.flush_context(h)
    finally:
        ctx.close()
    with pytest.raises(AttesterUnavailable, match="restricted signing key"):
        TpmAttester(swtpm_tcti).evidence(b"")


def test_missing_tpm_is_a_clean_error() -> None:
    with pytest.raises(AttesterUnavailable, match="cannot open the TPM"):
        TpmAttester("device:/nonexistent/tpmrm0").evidence(b"")


class _MovingPcrs(TpmAttester):
    """PCR values read after the quote differ from the quoted ones `moves` times."""

    def __init__(self, tcti: str, moves: int) -> None:
        super().__init__(tcti)
        self.moves = moves

    def _read_pcrs(self, ctx: object) -> list[bytes]:
        values = super()._read_pcrs(ctx)
        if self.moves:
            self.moves -= 1
            values[10] = b"\x99" * 32
        return values


def test_pcr_moving_between_quote_and_read_is_retried(swtpm_tcti: str) -> None:
    att = _MovingPcrs(swtpm_tcti, moves=1)
    quote, ak = tpm_evidence_from_json(att.evidence(b"r"))
    verify_quote(quote, ak)
    with pytest.raises(AttesterUnavailable, match="kept changing"):
        _MovingPcrs(swtpm_tcti, moves=10).evidence(b"r")
