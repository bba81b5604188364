"""pytest fixtures around the loopback KBS (imported by tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.contract import KbsResourceUri, parse_kbs_uri
from evidence.sample import SampleAttester
from tests.kbs.server import LoopbackKbs
from tests.kbs.swtpm import tools_tpm_attester

__all__ = ["kbs_uri", "loopback_kbs", "sample_attester", "tools_tpm_attester"]


def sample_attester() -> SampleAttester:
    """The real `sample` attester (evidence.sample): no hardware, exact report-data bytes."""
    return SampleAttester()


@pytest.fixture
def loopback_kbs() -> Iterator[LoopbackKbs]:
    """A started loopback KBS on 127.0.0.1:<ephemeral> with no resources (add_resource them)."""
    with LoopbackKbs() as kbs:
        yield kbs


def kbs_uri(text: str) -> KbsResourceUri:
    return parse_kbs_uri(text)
