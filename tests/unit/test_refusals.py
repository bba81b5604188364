"""The libraries' own refusal types (luks.errors, evidence.errors) are refusals to the whole
application exactly as the `CvaError`s they replaced: one line to the client, the right status."""

from __future__ import annotations

import pytest

from agent.errors import INPUT_REFUSALS, REFUSALS, CvaError, InputError
from agent.log import exception_message
from agent.rpc.ttrpc import Code
from agent.rpc.ttrpc import status_for as ttrpc_status_for
from agent.rpc.ttrpc_service import status_for as ttrpc_service_status_for
from evidence.errors import AttesterUnavailable, BindingError, EvidenceError, EvidenceFailure
from luks.errors import StorageError, StorageInputError
from luks.run import ToolError


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (CvaError("x"), Code.UNKNOWN),
        (InputError("x"), Code.INVALID_ARGUMENT),
        (StorageError("x"), Code.UNKNOWN),
        (ToolError("x"), Code.UNKNOWN),
        (StorageInputError("x"), Code.INVALID_ARGUMENT),
        (EvidenceError("x"), Code.INVALID_ARGUMENT),
        (AttesterUnavailable("x"), Code.UNKNOWN),
        (ValueError("x"), Code.INTERNAL),
    ],
)
def test_ttrpc_default_mapping(exc: Exception, code: Code) -> None:
    assert ttrpc_status_for(exc)[0] == code


@pytest.mark.parametrize(
    "exc", [StorageError("a\nb"), EvidenceFailure("a\nb"), BindingError("a b")]
)
def test_library_refusals_are_one_line_failed_precondition(exc: Exception) -> None:
    assert isinstance(exc, REFUSALS)
    assert ttrpc_service_status_for(exc) == (Code.FAILED_PRECONDITION, "a b")
    assert exception_message(exc) == "a b"  # kept: secret-free by contract, like CvaError


def test_input_refusals_are_refusals() -> None:
    assert all(issubclass(t, REFUSALS) for t in INPUT_REFUSALS)
    assert StorageError("x").exit_code == EvidenceFailure("x").exit_code == CvaError("x").exit_code
