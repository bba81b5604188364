"""The attester interface: one implementation per TEE (guest-components' seam).

An attester knows how to produce the TEE's evidence for a 64-byte report-data value and how to
read the measured value the initdata digest is bound to (TDX MRCONFIGID, SNP HOST_DATA, TPM PCR8).
Detection lives in `evidence.detect` and fails closed; `sample` is only ever built by name.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

# Wire names of Trustee's `Tee` enum (serialised lower-case / kebab-case); cva attests as
# tdx, snp, tpm or sample only (evidence.detect.TEES).
TEE_NAMES = ("tdx", "snp", "tpm", "az-snp-vtpm", "az-tdx-vtpm", "sample")

JSON = dict[str, Any]


@runtime_checkable
class Attester(Protocol):
    """What the KBS client and the daemon need from a TEE."""

    @property
    def tee(self) -> str:
        """The wire name sent as `tee` in the KBS Request (one of TEE_NAMES)."""
        ...

    def evidence(self, report_data: bytes) -> JSON:
        """The `primary_evidence`-style JSON object for this report data (<= 64 bytes)."""
        ...

    def initdata_binding(self) -> bytes | None:
        """The measured initdata value (MRCONFIGID 48 B / HOST_DATA 32 B / PCR8 32 B), or None
        when the TEE has no such register (sample)."""
        ...
