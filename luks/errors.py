"""The storage stack's refusal types (the application maps them, it does not lend them).

A `StorageError` carries one line that names the cause and, where there is one, the next step,
like the application's `CvaError`: the CLI prints it and exits non-zero, the daemon maps it to a
gRPC/ttRPC status (agent.errors.REFUSALS). Its message must never contain secret material: build
it from names, sizes and public values only. `StorageInputError` is hostile or malformed input
(a LUKS2 header, a cva token, a dm table read back).
"""

from __future__ import annotations


class StorageError(Exception):
    """A storage refusal or failure with a one-line, secret-free message."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        if "\n" in message:
            message = " ".join(message.split())
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])


class StorageInputError(StorageError):
    """Hostile or malformed on-disk input (LUKS2 header, cva token)."""
