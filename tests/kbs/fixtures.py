"""pytest fixtures around the loopback KBS (imported by tests/conftest.py)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest

from agent.contract import KbsResourceUri, parse_kbs_uri
from tests.kbs.server import LoopbackKbs
from tests.kbs.swtpm import tools_tpm_attester

__all__ = ["FakeSampleAttester", "kbs_uri", "loopback_kbs", "sample_attester", "tools_tpm_attester"]


class FakeSampleAttester:
    """The `sample` TEE's evidence (SPEC §c.1), for tests until evidence.sample lands."""

    tee = "sample"

    def evidence(self, report_data: bytes) -> dict[str, Any]:
        return {"svn": "1", "report_data": base64.b64encode(report_data).decode()}

    def initdata_binding(self) -> bytes | None:
        return None


def sample_attester() -> Any:
    try:
        from evidence.sample import SampleAttester
    except ImportError:
        return FakeSampleAttester()
    return SampleAttester()


@pytest.fixture
def loopback_kbs() -> Iterator[LoopbackKbs]:
    """A started loopback KBS on 127.0.0.1:<ephemeral> with no resources (add_resource them)."""
    with LoopbackKbs() as kbs:
        yield kbs


def kbs_uri(text: str) -> KbsResourceUri:
    return parse_kbs_uri(text)
