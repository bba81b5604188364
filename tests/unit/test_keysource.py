"""The lazy, shared KBS session: made on first use, retried only on outages, closed once."""

from __future__ import annotations

import grpc
import pytest

from agent import policy
from agent.errors import CvaError
from agent.keysource import LazyKbsKeySource, is_transient
from agent.secret import Secret
from agent.service import status_for
from agent.volumes import ShuttingDown


class KbsError(CvaError):  # same names as agent.kbs's hierarchy
    pass


class PolicyDenied(KbsError):
    pass


class ResourceNotFound(KbsError):
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
    assert is_transient(KbsError("connection refused"))
    assert not is_transient(PolicyDenied("denied"))
    assert not is_transient(ResourceNotFound("no such resource"))
    assert not is_transient(CvaError("other"))
    assert not is_transient(OSError("x"))


async def test_client_is_made_lazily_once_and_shared() -> None:
    made: list[FakeClient] = []

    def factory() -> FakeClient:
        made.append(FakeClient([]))
        return made[-1]

    src = LazyKbsKeySource(factory, deadline=5)  # type: ignore[arg-type]
    assert made == []
    with await src.get_resource("kbs:///a/b/c") as s1, await src.get_resource("kbs:///a/b/d") as s2:
        assert len(s1) == len(s2) == 32
    assert len(made) == 1 and made[0].calls == 2
    await src.aclose()
    await src.aclose()
    assert made[0].closed == 1


async def test_outage_is_retried_until_it_ends() -> None:
    client = FakeClient([KbsError("connection refused"), KbsError("503")])
    retries: list[str] = []
    src = LazyKbsKeySource(
        lambda: client,  # type: ignore[arg-type,return-value]
        deadline=10,
        first_backoff=0.01,
        on_retry=retries.append,
    )
    with await src.get_resource("kbs:///a/b/c") as s:
        assert len(s) == 32
    assert client.calls == 3 and len(retries) == 2


async def test_refusal_is_not_retried() -> None:
    client = FakeClient([PolicyDenied("the KBS policy denied the resource")])
    src = LazyKbsKeySource(lambda: client, deadline=10, first_backoff=0.01)  # type: ignore[arg-type,return-value]
    with pytest.raises(PolicyDenied):
        await src.get_resource("kbs:///a/b/c")
    assert client.calls == 1


async def test_outage_gives_up_at_the_deadline() -> None:
    client = FakeClient([KbsError("down")] * 1000)
    src = LazyKbsKeySource(lambda: client, deadline=0.05, first_backoff=0.01)  # type: ignore[arg-type,return-value]
    with pytest.raises(KbsError):
        await src.get_resource("kbs:///a/b/c")


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (policy.PolicyDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (policy.RequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (policy.ContainerNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (policy.BundleError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (ShuttingDown("x"), grpc.StatusCode.UNAVAILABLE),
        (KbsError("down"), grpc.StatusCode.UNAVAILABLE),
        (PolicyDenied("kbs said no"), grpc.StatusCode.FAILED_PRECONDITION),
        (CvaError("header refused"), grpc.StatusCode.FAILED_PRECONDITION),
        (ValueError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(exc: BaseException, code: grpc.StatusCode) -> None:
    assert status_for(exc) == code
