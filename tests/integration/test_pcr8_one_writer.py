"""One PCR8 writer per boot (issue 21 #4, SPEC §e.6 last bullet), against a real swtpm.

guest-components' TPM attester extends PCR8 with the initdata digest whenever kata-agent starts
the Attestation Agent with initdata (`bind_init_data`, unconditionally); cva used to extend it
too when it found it zero at start (it starts before kata-agent, hence before the AA): PCR8 =
extend(extend(0, d), d), matching no reference value. The image now says who extends
(`[evidence] pcr8_extender`); the AA is played here by exactly what it does, one
`extend_pcr(8, digest)` on the same TPM, before and after cva's start."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import agent.trust
from agent.binding import CheckedBinding
from agent.config import DaemonConfig, EvidenceConfig, InitdataSources, parse_config
from agent.initdata import parse_initdata
from agent.trust import Trusted, establish_trust
from evidence.errors import BindingError
from evidence.tpm import TpmAttester
from tests.conftest import REPO

pytestmark = pytest.mark.swtpm


def _machine(tmp_path: Path, tcti: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A TPM VM (no TDX/SNP) whose /dev/tpmrm0 is the swtpm; returns the initdata path."""
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/tpmrm0").touch()
    monkeypatch.setattr(agent.trust, "attester_for", lambda *_a, **_k: TpmAttester(tcti))
    path = tmp_path / "initdata.toml"
    path.write_bytes((REPO / "examples" / "initdata.toml").read_bytes())
    return path


def _start(tmp_path: Path, initdata: Path, extender: str) -> Trusted:
    evidence = EvidenceConfig(tee="tpm", pcr8_extender=extender)
    sources = InitdataSources(devices=(tmp_path / "no-such-disk",), toml=initdata)
    return establish_trust(DaemonConfig(initdata=sources, evidence=evidence), root=tmp_path)


def _aa_binds(tcti: str, initdata: Path) -> None:
    """What the AA's TPM attester does at its start: PCR8 extended with the digest."""
    TpmAttester(tcti).extend_initdata(parse_initdata(initdata.read_bytes()).digest())


def _reference(initdata: Path) -> bytes:
    return hashlib.sha256(bytes(32) + parse_initdata(initdata.read_bytes()).digest()).digest()


def _quoted_pcr8(trusted: Trusted) -> bytes:
    ev = trusted.attester.evidence(b"nonce")
    return bytes.fromhex(ev["tpm_quote"]["pcrs"][8])


def test_aa_image_the_aa_first_cva_verifies_at_start(
    tmp_path: Path, swtpm_tcti: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    initdata = _machine(tmp_path, swtpm_tcti, monkeypatch)
    _aa_binds(swtpm_tcti, initdata)
    trusted = _start(tmp_path, initdata, "aa")
    assert not trusted.binding_deferred
    assert isinstance(trusted.attester, CheckedBinding)
    assert _quoted_pcr8(trusted) == _reference(initdata)  # one extend: the AA's


def test_aa_image_cva_first_verifies_at_its_first_attestation(
    tmp_path: Path, swtpm_tcti: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    initdata = _machine(tmp_path, swtpm_tcti, monkeypatch)
    trusted = _start(tmp_path, initdata, "aa")  # cva starts before kata-agent and the AA
    assert trusted.binding_deferred
    assert TpmAttester(swtpm_tcti).initdata_binding() == bytes(32)  # cva did not extend
    with pytest.raises(BindingError, match="PCR8 is still zero") as err:
        trusted.attester.evidence(b"nonce")  # an attestation before the AA ran
    assert "pcr8_extender" in err.value.message and "\n" not in err.value.message
    _aa_binds(swtpm_tcti, initdata)  # kata-agent starts the AA
    assert _quoted_pcr8(trusted) == _reference(initdata)
    # a restarted cva finds PCR8 extended and verifies at once, without extending again
    again = _start(tmp_path, initdata, "aa")
    assert not again.binding_deferred and _quoted_pcr8(again) == _reference(initdata)


def test_cva_image_cva_extends_once_and_a_second_writer_is_refused(
    tmp_path: Path, swtpm_tcti: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    initdata = _machine(tmp_path, swtpm_tcti, monkeypatch)
    trusted = _start(tmp_path, initdata, "cva")
    assert not trusted.binding_deferred
    assert _quoted_pcr8(trusted) == _reference(initdata)
    _start(tmp_path, initdata, "cva")  # a restart does not extend again
    assert _quoted_pcr8(trusted) == _reference(initdata)
    _aa_binds(swtpm_tcti, initdata)  # an AA in an image that said "cva": today's bug
    with pytest.raises(BindingError, match="extended twice") as err:
        trusted.attester.evidence(b"nonce")
    assert 'pcr8_extender = "aa"' in err.value.message


def test_cva_image_the_aa_first_is_verified_not_extended_again(
    tmp_path: Path, swtpm_tcti: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    initdata = _machine(tmp_path, swtpm_tcti, monkeypatch)
    _aa_binds(swtpm_tcti, initdata)
    trusted = _start(tmp_path, initdata, "cva")
    assert _quoted_pcr8(trusted) == _reference(initdata)


def test_aa_image_a_doubled_pcr8_at_start_refuses_to_start(
    tmp_path: Path, swtpm_tcti: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    initdata = _machine(tmp_path, swtpm_tcti, monkeypatch)
    _aa_binds(swtpm_tcti, initdata)
    _aa_binds(swtpm_tcti, initdata)
    with pytest.raises(BindingError, match="extended twice"):
        _start(tmp_path, initdata, "aa")


def test_the_writer_is_image_config() -> None:
    assert parse_config("[listen]\nvsock_port = 1040\n").evidence.pcr8_extender == "cva"
    config = parse_config('[evidence]\ntee = "tpm"\npcr8_extender = "aa"\n')
    assert config.evidence == EvidenceConfig(tee="tpm", pcr8_extender="aa")
    from agent.config import ConfigError

    for bad in ('"both"', '"AA"', "true", '""'):
        with pytest.raises(ConfigError, match=r"evidence\.pcr8_extender must be cva"):
            parse_config(f"[evidence]\npcr8_extender = {bad}\n")
