"""The error type every layer raises for a refusal the user must see.

A `CvaError` carries one line that names the cause and, where there is one, the next step.
The CLI prints exactly that line to stderr and exits non-zero; the daemon maps it to a gRPC
status. Its message must never contain secret material: build it from names, sizes and public
values only.

The libraries have their own refusal types with the same one-line behaviour (`message`,
`exit_code`): luks.errors.StorageError and evidence.errors.EvidenceFailure. `REFUSALS` is the one
place that knows all of them; every `except` in agent that can see a library error catches it.
`INPUT_REFUSALS` are the hostile-input kinds among them (ttRPC maps them to INVALID_ARGUMENT).
"""

from __future__ import annotations

from evidence.errors import EvidenceError, EvidenceFailure
from luks.errors import StorageError, StorageInputError


class CvaError(Exception):
    """A refusal or failure with a one-line, secret-free message."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        if "\n" in message:
            message = " ".join(message.split())
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])


class InputError(CvaError):
    """Hostile or malformed input (initdata, contract, evidence, header, request)."""


REFUSALS: tuple[type[CvaError | StorageError | EvidenceFailure], ...] = (
    CvaError,
    StorageError,
    EvidenceFailure,
)
INPUT_REFUSALS: tuple[type[CvaError | StorageError | EvidenceFailure], ...] = (
    InputError,
    StorageInputError,
    EvidenceError,
)
