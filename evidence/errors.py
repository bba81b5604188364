"""The errors of the evidence area, each a one-line `EvidenceFailure`.

`EvidenceFailure` behaves like the application's `CvaError` (one secret-free line, `message`,
`exit_code`); the application maps it (agent.errors.REFUSALS). `EvidenceError`: a quote, report
or evidence document is malformed or fails verification (hostile input). `AttesterUnavailable`:
no usable TEE interface, or the kernel/TPM refused the request. `BindingError`: the initdata
digest does not match the value the hardware measured (fatal; raised by agent.binding).
"""

from __future__ import annotations


class EvidenceFailure(Exception):
    """An evidence refusal or failure with a one-line, secret-free message."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        if "\n" in message:
            message = " ".join(message.split())
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])


class EvidenceError(EvidenceFailure):
    """Malformed, truncated, oversized or unverifiable evidence."""


class AttesterUnavailable(EvidenceFailure):
    """The TEE interface is missing or refused the request."""


class BindingError(EvidenceFailure):
    """The initdata digest differs from the measured register (MRCONFIGID/HOST_DATA/PCR8)."""
