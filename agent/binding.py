"""The initdata binding check (SPEC §b.3/§b.5): the digest of the initdata cva read must equal
what the hardware measured, after the exact pad/truncate rule of the TEE.

TDX: MRCONFIGID (48 B) = digest zero-padded/truncated to 48. SNP: HOST_DATA (32 B) likewise to
32. TPM: PCR8 (SHA-256 bank) = SHA-256(0^32 || digest), i.e. one extend from zero. A mismatch is
fatal and the error names both values. An attester without such a register (sample) is a
refusal here: this check never skips. Only the image config can run cva without a measured
initdata (`[evidence] allow_sample`, agent/trust.py), never the contract.

Who extends PCR8 (TPM images, SPEC §e.6 last bullet) is the image's choice, one writer per
boot (`[evidence] pcr8_extender`, issue 21 #4): guest-components' TPM attester extends PCR8 with
the digest whenever kata-agent starts the Attestation Agent with initdata, unconditionally, so
cva extending it too gives extend(extend(0, d), d), which matches no reference value.
* `cva` (no AA in the image): cva extends PCR8 at start while it is still zero, never a
  second time.
* `aa`: cva never extends PCR8; it verifies it at start when it is already extended, else
  (cva starts before kata-agent, which starts the AA) at its first attestation.
In both, `CheckedBinding` verifies PCR8 again before every TPM evidence leaves cva, so a second
writer (an AA in an image that says `cva`) is refused with a cause, not left to the verifier.
Deferring the check loses nothing: on a TPM, whoever extends PCR8 extends it from the
initdata the host handed the guest; what binds the contract is the verifier comparing PCR8
with the reference value, and cva's check only keeps its evidence consistent with that.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from typing import Protocol, runtime_checkable

from agent.initdata import REFERENCE_FIELDS, InitData, reference_field, reference_value
from evidence.base import JSON, Attester
from evidence.errors import BindingError


@runtime_checkable
class ExtendsInitdata(Protocol):
    """An attester whose initdata register the guest extends itself (TPM PCR8)."""

    def extend_initdata(self, digest: bytes) -> None: ...


def check_initdata_binding(initdata: InitData, attester: Attester, *, extend: bool = True) -> bool:
    """Raise BindingError unless the attester's measured register matches `initdata`.

    True: verified. False only for a PCR8 still zero when `extend` is False (the Attestation
    Agent extends it: verify later, `CheckedBinding`)."""
    tee = attester.tee
    if tee not in REFERENCE_FIELDS:
        raise BindingError(
            f"the {tee} TEE measures no initdata, so nothing binds the contract to this VM;"
            " refusing to continue"
        )
    field = reference_field(tee)
    measured = attester.initdata_binding()
    if measured is None:
        raise BindingError(f"the {tee} attester reports no {field}; cannot check the initdata")
    if field == "PCR8" and not any(measured):
        if not extend:
            return False
        if isinstance(attester, ExtendsInitdata):
            attester.extend_initdata(initdata.digest())
            measured = attester.initdata_binding()
            if measured is None:
                raise BindingError(f"the {tee} attester reports no {field} after extending it")
    _compare(initdata, tee, measured)
    return True


def _compare(initdata: InitData, tee: str, measured: bytes) -> None:
    expected = reference_value(initdata, tee)
    field = reference_field(tee)
    if len(measured) == len(expected) and hmac.compare_digest(measured, expected):
        return
    twice = field == "PCR8" and measured == hashlib.sha256(expected + initdata.digest()).digest()
    if twice:
        raise BindingError(
            f"PCR8 holds this initdata's digest extended twice ({measured.hex()}), which no"
            " reference value matches: two writers bound it (cva and the Attestation Agent);"
            ' an image that runs the AA sets [evidence] pcr8_extender = "aa" in'
            " /etc/cva/config.toml; restart the VM"
        )
    raise BindingError(
        f"initdata does not match the measured {field}: expected {expected.hex()}"
        f" ({initdata.algorithm} digest of the initdata), measured {measured.hex()};"
        " the host started this VM with different initdata - refusing to continue"
    )


class CheckedBinding:
    """A TPM attester whose PCR8 is verified before every evidence it produces: exactly one
    extend of this initdata's digest, by whichever writer the image named (`extender`)."""

    def __init__(self, inner: Attester, initdata: InitData, extender: str) -> None:
        self._inner = inner
        self._initdata = initdata
        self._extender = extender
        self._lock = threading.Lock()

    @property
    def tee(self) -> str:
        return self._inner.tee

    @property
    def inner(self) -> Attester:
        return self._inner

    def verify(self) -> None:
        """Raise BindingError unless PCR8 holds exactly one extend of the initdata digest."""
        with self._lock:
            measured = self._inner.initdata_binding()
            if measured is None:
                raise BindingError("the tpm attester reports no PCR8; cannot check the initdata")
            if not any(measured):
                if self._extender == "aa":
                    raise BindingError(
                        "PCR8 is still zero at cva's attestation: the Attestation Agent, which"
                        ' this image says binds initdata ([evidence] pcr8_extender = "aa"), has'
                        " not extended it; start the AA with the initdata (kata-agent does with"
                        " agent.guest_components_procs=attestation-agent), or set"
                        ' pcr8_extender = "cva" in an image without the AA'
                    )
                raise BindingError(
                    "PCR8 was reset to zero after cva bound the initdata (TPM restarted?);"
                    " refusing to attest - restart the VM"
                )
            _compare(self._initdata, self.tee, measured)

    def evidence(self, report_data: bytes) -> JSON:
        self.verify()
        return self._inner.evidence(report_data)

    def initdata_binding(self) -> bytes | None:
        return self._inner.initdata_binding()
