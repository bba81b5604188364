"""Volume keys from the KBS: one lazily created, shared session for all volumes.

Attestation happens on the first `get_resource` (the first PrepareVolumes that needs a key), not
at start: the KBS may not be reachable yet, and a guest that never needs a key never attests.
All volumes share one `KbsClient` (one auth/attest exchange, single-flight; its session is
reused). The client itself retries an unreachable KBS with backoff until its deadline and then
raises `KbsUnavailable`; every other KBS error is a final answer (policy, attestation, missing
resource, protocol, TLS).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from luks.secret import Secret

if TYPE_CHECKING:
    from agent.contract import KbsResourceUri
    from agent.kbs.client import KbsClient

TRANSIENT_KBS_ERRORS = frozenset({"KbsUnavailable"})


def is_transient(exc: BaseException) -> bool:
    """The KBS could not be reached before the deadline (worth retrying later: UNAVAILABLE)."""
    return any(cls.__name__ in TRANSIENT_KBS_ERRORS for cls in type(exc).__mro__)


class LazyKbsKeySource:
    """`KeySource` over a `KbsClient` made on first use by `factory` and shared afterwards."""

    def __init__(self, factory: Callable[[], KbsClient]) -> None:
        self._factory = factory
        self._client: KbsClient | None = None
        self._lock = asyncio.Lock()

    async def _get_client(self) -> KbsClient:
        async with self._lock:
            if self._client is None:
                # in a worker thread: the first use imports the KBS client (httpx, cryptography)
                # and builds its TLS context, seconds under an emulated CPU, during which the
                # event loop must keep serving (a prestart hook that went away is noticed, and
                # its container killed, at once)
                self._client = await asyncio.to_thread(self._factory)
            return self._client

    async def get_resource(self, uri: KbsResourceUri) -> Secret:
        client = await self._get_client()
        secret: Secret = await client.get_resource(uri)
        return secret

    def session_state(self) -> tuple[str, float | None]:
        """The shared KBS session for `cva status`: "not-started" until the first key request,
        then the client's (agent.kbs.client.KbsClient.session_state)."""
        if self._client is None:
            return "not-started", None
        return self._client.session_state()

    async def aclose(self) -> None:
        async with self._lock:
            if self._client is not None:
                await self._client.aclose()
                self._client = None
