"""The initdata binding check (SPEC §b.3/§b.5): the digest of the initdata cva read must equal
what the hardware measured, after the exact pad/truncate rule of the TEE.

TDX: MRCONFIGID (48 B) = digest zero-padded/truncated to 48. SNP: HOST_DATA (32 B) likewise to
32. TPM: PCR8 (SHA-256 bank) = SHA-256(0^32 || digest), i.e. one extend from zero; cva extends it
itself only while PCR8 is still zero (first start), and never a second time. A mismatch is fatal
and the error names both values. An attester without such a register (sample) is a refusal here:
this check never skips. Only the image config can run cva without a measured initdata
(`[evidence] allow_sample`, agent/trust.py), never the contract.
"""

from __future__ import annotations

import hmac
from typing import Protocol, runtime_checkable

from agent.initdata import REFERENCE_FIELDS, InitData, reference_field, reference_value
from evidence.base import Attester
from evidence.errors import BindingError


@runtime_checkable
class ExtendsInitdata(Protocol):
    """An attester whose initdata register the guest extends itself (TPM PCR8)."""

    def extend_initdata(self, digest: bytes) -> None: ...


def check_initdata_binding(initdata: InitData, attester: Attester) -> None:
    """Raise BindingError unless the attester's measured register matches `initdata`."""
    tee = attester.tee
    if tee not in REFERENCE_FIELDS:
        raise BindingError(
            f"the {tee} TEE measures no initdata, so nothing binds the contract to this VM;"
            " refusing to continue"
        )
    expected = reference_value(initdata, tee)
    field = reference_field(tee)
    measured = attester.initdata_binding()
    if measured is None:
        raise BindingError(f"the {tee} attester reports no {field}; cannot check the initdata")
    if field == "PCR8" and not any(measured) and isinstance(attester, ExtendsInitdata):
        attester.extend_initdata(initdata.digest())
        measured = attester.initdata_binding()
        if measured is None:
            raise BindingError(f"the {tee} attester reports no {field} after extending it")
    if len(measured) != len(expected) or not hmac.compare_digest(measured, expected):
        raise BindingError(
            f"initdata does not match the measured {field}: expected {expected.hex()}"
            f" ({initdata.algorithm} digest of the initdata), measured {measured.hex()};"
            " the host started this VM with different initdata - refusing to continue"
        )
