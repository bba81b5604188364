"""KBS round trips with `tpm` evidence from swtpm: quote signature, PCR digest, extraData, PCR8."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from agent.kbs.client import AttestationFailed, KbsClient
from agent.kbs.jwe import KEY_ALGORITHMS
from evidence.tpm import TpmAttester
from tests.kbs.fixtures import kbs_uri
from tests.kbs.server import LoopbackKbs
from tests.kbs.swtpm import ToolsTpmAttester, pcr8_after_extend

pytestmark = pytest.mark.swtpm

KEY = "kbs:///default/pgdata/luks"
SECRET = b"tpm-bound-volume-key-0123456789!"
INITDATA = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"cva.toml\" = '''version = 1'''\n"


class Init:
    def text(self) -> str:
        return INITDATA


async def fetch(kbs: LoopbackKbs, attester: Any, **kw: Any) -> bytes:
    async with KbsClient(kbs.url, attester=attester, deadline=30, **kw) as c:
        with await c.get_resource(kbs_uri(KEY)) as s:
            return bytes(s.data)


@pytest.fixture
def kbs(loopback_kbs: LoopbackKbs) -> LoopbackKbs:
    loopback_kbs.add_resource(KEY, SECRET)
    loopback_kbs.allow_only(KEY, {"tpm"})
    return loopback_kbs


@pytest.mark.parametrize("alg", KEY_ALGORITHMS)
async def test_round_trip_every_key_type_tpm(
    kbs: LoopbackKbs, tools_tpm_attester: ToolsTpmAttester, alg: str
) -> None:
    assert await fetch(kbs, tools_tpm_attester, key_algorithm=alg) == SECRET
    assert len(kbs.requests) == 3
    assert kbs.last_attestation is not None
    evidence = kbs.last_attestation["tee-evidence"]["primary_evidence"]
    assert set(evidence) == {"tpm_quote", "ak_public"} and len(evidence["tpm_quote"]["pcrs"]) == 24


async def test_tpm_with_initdata_in_pcr8(
    kbs: LoopbackKbs, tools_tpm_attester: ToolsTpmAttester
) -> None:
    digest = hashlib.sha256(INITDATA.encode()).digest()
    tools_tpm_attester.extend_pcr8(digest)
    assert tools_tpm_attester.initdata_binding() == pcr8_after_extend(digest)
    kbs.expected_initdata_digest = digest
    assert await fetch(kbs, tools_tpm_attester, initdata=Init()) == SECRET


async def test_tpm_pcr8_mismatch_is_an_attestation_failure(
    kbs: LoopbackKbs, tools_tpm_attester: ToolsTpmAttester
) -> None:
    tools_tpm_attester.extend_pcr8(hashlib.sha256(b"another initdata").digest())
    with pytest.raises(AttestationFailed, match="PCR8"):
        await fetch(kbs, tools_tpm_attester, initdata=Init())


async def test_tpm_wrong_report_data_is_refused(
    kbs: LoopbackKbs, tools_tpm_attester: ToolsTpmAttester
) -> None:
    class Stale:
        tee = "tpm"

        def evidence(self, report_data: bytes) -> dict[str, Any]:
            return tools_tpm_attester.evidence(b"\x01" * 32)

        def initdata_binding(self) -> bytes | None:
            return None

    with pytest.raises(AttestationFailed, match="extraData"):
        await fetch(kbs, Stale())


# -- the real attester (evidence.tpm.TpmAttester) on the evidence stream's swtpm fixture ------


@pytest.fixture
def tpm_attester(swtpm_tcti: str) -> TpmAttester:
    return TpmAttester(swtpm_tcti)


@pytest.mark.parametrize("alg", KEY_ALGORITHMS)
async def test_round_trip_every_key_type_real_tpm_attester(
    kbs: LoopbackKbs, tpm_attester: TpmAttester, alg: str
) -> None:
    assert await fetch(kbs, tpm_attester, key_algorithm=alg) == SECRET
    assert len(kbs.requests) == 3


async def test_real_tpm_attester_with_initdata_in_pcr8(
    kbs: LoopbackKbs, tpm_attester: TpmAttester
) -> None:
    digest = hashlib.sha256(INITDATA.encode()).digest()
    tpm_attester.extend_initdata(digest)
    assert tpm_attester.initdata_binding() == pcr8_after_extend(digest)
    kbs.expected_initdata_digest = digest
    assert await fetch(kbs, tpm_attester, initdata=Init()) == SECRET
    kbs.expected_initdata_digest = None
    with pytest.raises(AttestationFailed, match="PCR8"):

        class Other:
            def text(self) -> str:
                return INITDATA + "# another document\n"

        await fetch(kbs, tpm_attester, initdata=Other())
