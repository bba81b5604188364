"""Shared by the measured-volume tests (test_measure_tpm, test_measure_rtmr): a crash at a named
point of evidence.measure_log's write-ahead steps, and a volume identity derived from a name."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator

import pytest

from agent.measure import VolumeIdentity
from evidence import measure_log


class Crash(Exception):
    pass


@pytest.fixture
def crash_at() -> Iterator[list[str]]:
    """The names of the points at which measure_log "dies" (raises Crash) in this test."""
    points: list[str] = []

    def hook(name: str) -> None:
        if name in points:
            raise Crash(name)

    measure_log.crash_hook = hook
    yield points
    measure_log.crash_hook = None


def ident(name: str, seq: int | None = None) -> VolumeIdentity:
    return VolumeIdentity(
        name,
        str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
        hashlib.sha256(name.encode()).digest(),
        "ext4",
        False,
        seq,
    )
