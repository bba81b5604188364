"""One PCR8 writer per boot (issue 21 #4) on the guest's TPM (swtpm behind the kernel's resource
manager, /dev/tpmrm0), both orders: boot 1 starts cva before the "Attestation Agent", boot 2
(PCRs reset by the reboot, same TPM) starts it after. The AA is played by tpm2-tools'
`tpm2_pcrextend 8:sha256=<digest>`, another TSS extending PCR8 with the initdata digest exactly
as guest-components' TPM attester does in `bind_init_data`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.binding import CheckedBinding
from agent.config import DaemonConfig, EvidenceConfig, InitdataSources
from agent.initdata import parse_initdata
from agent.trust import Trusted, establish_trust
from evidence.errors import BindingError
from evidence.tpm import TpmAttester
from luks.run import run

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.environ.get("CVA_IN_GUEST") != "1", reason="runs inside the guest"),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def initdata(tmp_path: Path) -> Path:
    pcr8 = TpmAttester("device:/dev/tpmrm0").initdata_binding()
    if pcr8 != bytes(32):
        pytest.skip("PCR8 is not zero at this point of the boot (measured by someone else)")
    path = tmp_path / "initdata.toml"
    path.write_bytes((REPO / "examples" / "initdata.toml").read_bytes())
    return path


def _digest(initdata: Path) -> bytes:
    return parse_initdata(initdata.read_bytes()).digest()


def _start(tmp_path: Path, initdata: Path, extender: str) -> Trusted:
    sources = InitdataSources(devices=(tmp_path / "no-such-disk",), toml=initdata)
    evidence = EvidenceConfig(tee="tpm", pcr8_extender=extender)
    return establish_trust(DaemonConfig(initdata=sources, evidence=evidence))


def _aa_binds(initdata: Path) -> None:
    run(["tpm2_pcrextend", f"8:sha256={_digest(initdata).hex()}"], timeout=60)


def _quoted_pcr8(trusted: Trusted) -> bytes:
    return bytes.fromhex(trusted.attester.evidence(b"guest")["tpm_quote"]["pcrs"][8])


def _reference(initdata: Path) -> bytes:
    return hashlib.sha256(bytes(32) + _digest(initdata)).digest()


def test_cva_before_the_aa_verifies_at_its_first_attestation(
    tmp_path: Path, initdata: Path
) -> None:
    trusted = _start(tmp_path, initdata, "aa")
    assert trusted.binding_deferred and isinstance(trusted.attester, CheckedBinding)
    with pytest.raises(BindingError, match="PCR8 is still zero"):
        trusted.attester.evidence(b"too early")
    _aa_binds(initdata)
    assert _quoted_pcr8(trusted) == _reference(initdata)  # one extend: the AA's


@pytest.mark.boot2
def test_the_aa_before_cva_is_verified_at_start_and_a_second_writer_refused(
    tmp_path: Path, initdata: Path
) -> None:
    _aa_binds(initdata)
    trusted = _start(tmp_path, initdata, "aa")
    assert not trusted.binding_deferred
    assert _quoted_pcr8(trusted) == _reference(initdata)
    # an image that says "cva" next to an AA: cva finds PCR8 extended, verifies, never extends
    cva_image = _start(tmp_path, initdata, "cva")
    assert _quoted_pcr8(cva_image) == _reference(initdata)
    _aa_binds(initdata)  # a second writer after all (today's bug, by whichever order)
    with pytest.raises(BindingError, match="extended twice"):
        trusted.attester.evidence(b"after a second extend")
