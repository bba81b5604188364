"""Volume keys from the KBS: one lazily created, shared session for all volumes.

Attestation happens on the first `get_resource` (the first PrepareVolumes that needs a key), not
at start: the KBS may not be reachable yet, and a guest that never needs a key never attests.
All volumes share one `KbsClient` (one auth/attest exchange; its session cookie is reused).
A KBS that cannot be reached is retried with backoff until the deadline; a KBS that answers
with a refusal (policy, attestation, missing resource, protocol) is not retried.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.errors import CvaError
from agent.secret import Secret

if TYPE_CHECKING:
    from agent.contract import KbsResourceUri
    from agent.kbs import KbsClient

# exception class names of agent.kbs that are final answers, not outages
FINAL_KBS_ERRORS = frozenset(
    {"PolicyDenied", "AttestationFailed", "ResourceNotFound", "ProtocolMismatch"}
)


def is_transient(exc: BaseException) -> bool:
    """A KBS failure worth retrying: the KBS could not be reached or answered 5xx."""
    if not isinstance(exc, CvaError):
        return False
    names = {cls.__name__ for cls in type(exc).__mro__}
    return "KbsError" in names and not (names & FINAL_KBS_ERRORS)


class LazyKbsKeySource:
    """`KeySource` over a `KbsClient` made on first use by `factory` and shared afterwards."""

    def __init__(
        self,
        factory: Callable[[], KbsClient],
        *,
        deadline: float,
        first_backoff: float = 0.5,
        max_backoff: float = 5.0,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._factory = factory
        self._client: KbsClient | None = None
        self._lock = asyncio.Lock()
        self._deadline = deadline
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._on_retry = on_retry or (lambda _msg: None)

    async def _get_client(self) -> KbsClient:
        async with self._lock:
            if self._client is None:
                self._client = self._factory()
            return self._client

    async def get_resource(self, uri: KbsResourceUri) -> Secret:
        client = await self._get_client()
        end = time.monotonic() + self._deadline
        backoff = self._first_backoff
        while True:
            try:
                secret: Secret = await client.get_resource(uri)
                return secret
            except Exception as exc:
                left = end - time.monotonic()
                if not is_transient(exc) or left <= 0:
                    raise
                delay = min(backoff, left) * (0.5 + random.random() / 2)  # noqa: S311 - jitter
                self._on_retry(f"KBS unavailable ({type(exc).__name__}); retrying in {delay:.1f}s")
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self._max_backoff)

    async def aclose(self) -> None:
        async with self._lock:
            if self._client is not None:
                await self._client.aclose()
                self._client = None
