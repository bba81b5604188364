"""The lazy, shared KBS session (made on first use, closed once) and the status mapping."""

from __future__ import annotations

import grpc
import pytest

from agent import policy
from agent.errors import CvaError
from agent.keysource import LazyKbsKeySource, is_transient
from agent.rpc.volume_agent import status_for
from agent.volumes import ShuttingDown
from evidence.errors import BindingError, EvidenceError
from luks.errors import StorageError, StorageInputError
from luks.secret import Secret


class KbsError(CvaError):  # same names as agent.kbs.errors's hierarchy
    pass


class PolicyDenied(KbsError):
    pass


class KbsUnavailable(KbsError):
    pass


class KbsProtocolError(KbsError):
    pass


class FakeClient:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls = 0
        self.closed = 0

    async def get_resource(self, uri: object) -> Secret:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return Secret(b"k" * 32)

    async def aclose(self) -> None:
        self.closed += 1


def test_transient_classification() -> None:
    assert is_transient(KbsUnavailable("connection refused until the deadline"))
    assert not is_transient(PolicyDenied("denied"))
    assert not is_transient(KbsProtocolError("not trustee"))
    assert not is_transient(CvaError("other"))
    assert not is_transient(OSError("x"))


async def test_client_is_made_lazily_once_and_shared() -> None:
    made: list[FakeClient] = []

    def factory() -> FakeClient:
        made.append(FakeClient([]))
        return made[-1]

    src = LazyKbsKeySource(factory)  # type: ignore[arg-type]
    assert made == []
    with await src.get_resource("kbs:///a/b/c") as s1, await src.get_resource("kbs:///a/b/d") as s2:
        assert len(s1) == len(s2) == 32
    assert len(made) == 1 and made[0].calls == 2
    await src.aclose()
    await src.aclose()
    assert made[0].closed == 1


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (policy.PolicyDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (policy.RequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (policy.ContainerNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (policy.BundleError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (ShuttingDown("x"), grpc.StatusCode.UNAVAILABLE),
        (KbsUnavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (KbsError("tls"), grpc.StatusCode.FAILED_PRECONDITION),
        (PolicyDenied("kbs said no"), grpc.StatusCode.FAILED_PRECONDITION),
        (CvaError("header refused"), grpc.StatusCode.FAILED_PRECONDITION),
        # the libraries' own refusal types map as the CvaError they were before (agent.errors)
        (StorageError("disk not blank"), grpc.StatusCode.FAILED_PRECONDITION),
        (StorageInputError("header refused"), grpc.StatusCode.FAILED_PRECONDITION),
        (EvidenceError("bad quote"), grpc.StatusCode.FAILED_PRECONDITION),
        (BindingError("initdata does not match"), grpc.StatusCode.FAILED_PRECONDITION),
        (ValueError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(exc: BaseException, code: grpc.StatusCode) -> None:
    assert status_for(exc) == code
