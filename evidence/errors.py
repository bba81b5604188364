"""The errors of the evidence area, each a one-line `CvaError`.

`EvidenceError`: a quote, report or evidence document is malformed or fails verification (hostile
input). `AttesterUnavailable`: no usable TEE interface, or the kernel/TPM refused the request.
`BindingError`: the initdata digest does not match the value the hardware measured (fatal).
"""

from __future__ import annotations

from agent.errors import CvaError, InputError


class EvidenceError(InputError):
    """Malformed, truncated, oversized or unverifiable evidence."""


class AttesterUnavailable(CvaError):
    """The TEE interface is missing or refused the request."""


class BindingError(CvaError):
    """The initdata digest differs from the measured register (MRCONFIGID/HOST_DATA/PCR8)."""
