"""The `tpm` attester (tpm2-pytss): AK at a persistent handle, TPM2_Quote over PCR 0-23 SHA-256.

Evidence (SPEC §c.5): `{"tpm_quote": {"signature": b64(TPMT_SIGNATURE), "message":
b64(TPMS_ATTEST), "pcrs": [24 hex]}, "ak_public": b64(DER SubjectPublicKeyInfo)}`; the quote's
qualifying data is the report data truncated / zero-padded to 32 bytes. The AK lives at
0x81010002; if the handle is empty cva creates an RSA-2048 restricted signing key (RSASSA-SHA256)
from the owner hierarchy there; an object at that handle that is not a restricted signing key
fixed to this TPM is refused. Initdata binding: PCR8 (SHA-256 bank), extended once from zero.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from evidence.base import JSON
from evidence.errors import AttesterUnavailable, EvidenceError
from evidence.tpm_quote import parse_attest, pcr_digest

# libtss2 logs errors straight to stderr; cva reports them itself as one line.
os.environ.setdefault("TSS2_LOG", "all+NONE")

DEFAULT_TCTI = "device:/dev/tpmrm0"
AK_HANDLE = 0x81010002
INITDATA_PCR = 8
REPORT_DATA_SIZE = 32
MAX_REPORT_DATA = 64
PCR_COUNT = 24
QUOTE_ATTEMPTS = 3
_ALL_PCRS = "sha256:" + ",".join(str(i) for i in range(PCR_COUNT))


def _tss() -> Any:
    """tpm2_pytss, imported on first use (it loads libtss2 and FAPI)."""
    try:
        import tpm2_pytss  # noqa: PLC0415 - keeps `cva --help` and non-TPM platforms fast
    except ImportError:
        raise AttesterUnavailable(
            "vTPM evidence needs tpm2-pytss, which is not installed; install cva with its tpm"
            " extra: pip install 'confidential-volume-agent[tpm]' (needs libtss2)"
        ) from None

    return tpm2_pytss


def qualifying_data(report_data: bytes) -> bytes:
    """The report data as the quote's extraData: first 32 bytes, zero-padded (GC/Trustee)."""
    if len(report_data) > MAX_REPORT_DATA:
        raise EvidenceError(
            f"report data is {len(report_data)} bytes; at most {MAX_REPORT_DATA} are allowed"
        )
    return bytes(report_data[:REPORT_DATA_SIZE]).ljust(REPORT_DATA_SIZE, b"\0")


class TpmAttester:
    """A TPM 2.0 reached through a TCTI string (`device:/dev/tpmrm0`, `swtpm:host=..,port=..`)."""

    def __init__(self, tcti: str = DEFAULT_TCTI, *, ak_handle: int = AK_HANDLE) -> None:
        self.tcti = tcti
        self.ak_handle = ak_handle
        self._lock = threading.Lock()

    @property
    def tee(self) -> str:
        return "tpm"

    # -- the TPM session -----------------------------------------------------------------------

    @contextmanager
    def _esapi(self, action: str) -> Iterator[Any]:
        tss = _tss()
        with self._lock:
            try:
                ctx = tss.ESAPI(self.tcti)
            except tss.TSS2_Exception as exc:
                raise AttesterUnavailable(
                    f"cannot open the TPM at {self.tcti!r} ({exc}); check the device / TCTI"
                ) from None
            try:
                yield ctx
            except tss.TSS2_Exception as exc:
                raise AttesterUnavailable(f"TPM {action} failed: {exc}") from None
            finally:
                ctx.close()

    def _ak(self, ctx: Any) -> Any:
        """The AK's ESYS_TR, created and persisted at `ak_handle` if that handle is empty."""
        tss = _tss()
        _more, cap = ctx.get_capability(tss.TPM2_CAP.HANDLES, self.ak_handle, 1)
        present = [int(h) for h in cap.data.handles]
        if self.ak_handle in present:
            tr = ctx.tr_from_tpmpublic(self.ak_handle)
            pub, _name, _qname = ctx.read_public(tr)
            required = (
                tss.TPMA_OBJECT.FIXEDTPM | tss.TPMA_OBJECT.RESTRICTED | tss.TPMA_OBJECT.SIGN_ENCRYPT
            )
            attrs = pub.publicArea.objectAttributes
            if (attrs & required) != required or (attrs & tss.TPMA_OBJECT.DECRYPT):
                raise AttesterUnavailable(
                    f"TPM object at {self.ak_handle:#x} is not a restricted signing key fixed to"
                    " the TPM; evict it or configure another AK handle"
                )
            return tr
        attrs = (
            tss.TPMA_OBJECT.FIXEDTPM
            | tss.TPMA_OBJECT.FIXEDPARENT
            | tss.TPMA_OBJECT.SENSITIVEDATAORIGIN
            | tss.TPMA_OBJECT.USERWITHAUTH
            | tss.TPMA_OBJECT.RESTRICTED
            | tss.TPMA_OBJECT.SIGN_ENCRYPT
        )
        template = tss.TPM2B_PUBLIC.parse("rsa2048:rsassa-sha256:null", objectAttributes=attrs)
        transient, *_ = ctx.create_primary(None, template, tss.ESYS_TR.OWNER)
        try:
            return ctx.evict_control(tss.ESYS_TR.OWNER, transient, self.ak_handle)
        finally:
            ctx.flush_context(transient)

    def _read_pcrs(self, ctx: Any) -> list[bytes]:
        tss = _tss()
        values: list[bytes] = []
        while len(values) < PCR_COUNT:
            want = "sha256:" + ",".join(str(i) for i in range(len(values), PCR_COUNT))
            _upd, _sel, digests = ctx.pcr_read(tss.TPML_PCR_SELECTION.parse(want))
            got = [bytes(d) for d in digests]
            if not got:
                raise AttesterUnavailable("TPM returned no SHA-256 PCR values (bank disabled?)")
            values.extend(got)
        if any(len(v) != 32 for v in values):
            raise AttesterUnavailable("TPM returned SHA-256 PCR values of the wrong size")
        return values[:PCR_COUNT]

    # -- the Attester interface ---------------------------------------------------------------

    def evidence(self, report_data: bytes) -> JSON:
        """Quote PCR 0-23 and read them; retried if a PCR moved between quote and read (the
        quote's PCR digest must match the values sent, or the verifier would refuse them)."""
        tss = _tss()
        extra = qualifying_data(report_data)
        with self._esapi("quote") as ctx:
            ak = self._ak(ctx)
            pub, _name, _qname = ctx.read_public(ak)
            for _ in range(QUOTE_ATTEMPTS):
                attest, signature = ctx.quote(
                    ak,
                    _ALL_PCRS,
                    tss.TPM2B_DATA(extra),
                    tss.TPMT_SIG_SCHEME(scheme=tss.TPM2_ALG.NULL),
                )
                pcrs = self._read_pcrs(ctx)
                message = bytes(attest.marshal()[2:])  # TPM2B_ATTEST -> the TPMS_ATTEST inside
                parsed = parse_attest(message)
                if parsed.extra_data != extra:
                    raise AttesterUnavailable("the TPM quote carries other qualifying data")
                if pcr_digest(parsed, pcrs) == parsed.pcr_digest:
                    break
            else:
                raise AttesterUnavailable(
                    f"PCRs kept changing while quoting ({QUOTE_ATTEMPTS} attempts)"
                )
        return {
            "tpm_quote": {
                "signature": base64.b64encode(bytes(signature.marshal())).decode("ascii"),
                "message": base64.b64encode(message).decode("ascii"),
                "pcrs": [p.hex() for p in pcrs],
            },
            "ak_public": base64.b64encode(bytes(pub.to_der())).decode("ascii"),
        }

    def initdata_binding(self) -> bytes | None:
        """PCR8 of the SHA-256 bank."""
        with self._esapi("PCR read") as ctx:
            return self._read_pcrs(ctx)[INITDATA_PCR]

    def extend_initdata(self, digest: bytes) -> None:
        """Extend PCR8 (SHA-256 bank) with a 32-byte initdata digest."""
        if len(digest) != 32:
            raise EvidenceError(
                f"PCR8 takes a 32-byte SHA-256 digest, got {len(digest)} bytes"
                ' (initdata needs algorithm = "sha256" on TPM platforms)'
            )
        self.extend_pcr(INITDATA_PCR, digest)

    def read_pcr(self, pcr: int) -> bytes:
        """One PCR of the SHA-256 bank."""
        _check_pcr(pcr)
        with self._esapi(f"PCR{pcr} read") as ctx:
            return self._read_pcrs(ctx)[pcr]

    def extend_pcr(self, pcr: int, digest: bytes) -> None:
        """Extend one PCR of the SHA-256 bank with a 32-byte digest: PCR' = SHA-256(PCR || d)."""
        tss = _tss()
        _check_pcr(pcr)
        if len(digest) != 32:
            raise EvidenceError(f"a SHA-256 PCR extend takes 32 bytes, got {len(digest)}")
        values = tss.TPML_DIGEST_VALUES(
            [tss.TPMT_HA(hashAlg=tss.TPM2_ALG.SHA256, digest=tss.TPMU_HA(sha256=bytes(digest)))]
        )
        with self._esapi(f"PCR{pcr} extend") as ctx:
            ctx.pcr_extend(getattr(tss.ESYS_TR, f"PCR{pcr}"), values)


def _check_pcr(pcr: int) -> None:
    if isinstance(pcr, bool) or not isinstance(pcr, int) or not 0 <= pcr < PCR_COUNT:
        raise EvidenceError(f"PCR index {pcr!r} is outside 0..{PCR_COUNT - 1}")
