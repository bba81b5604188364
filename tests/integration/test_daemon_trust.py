"""Trust before service: the image decides the TEE, then initdata -> contract -> binding check,
with the real modules (the sample TEE and TDX/SNP machines faked at the kernel ABI: a TDX
`mrconfigid` in sysfs, /dev nodes, configfs-tsm; real TDX/SNP/TPM bindings are tested by the
evidence suite and the VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

import agent.trust
from agent.binding import check_initdata_binding
from agent.config import DaemonConfig, EvidenceConfig, InitdataSources
from agent.contract import ContractError
from agent.errors import CvaError
from agent.initdata import parse_initdata
from agent.trust import establish_trust
from evidence.errors import AttesterUnavailable, BindingError
from evidence.sample import SampleAttester
from evidence.tdx import MRCONFIGID_SYSFS
from tests.conftest import REPO
from tests.fake_kernel import FakeTsm

SAMPLE = EvidenceConfig(tee="sample", allow_sample=True)


def _config(tmp_path: Path, toml: Path, evidence: EvidenceConfig = SAMPLE) -> DaemonConfig:
    sources = InitdataSources(devices=(tmp_path / "no-such-disk",), toml=toml)
    return DaemonConfig(initdata=sources, evidence=evidence)


def _initdata(tmp_path: Path, tee: str) -> Path:
    text = (REPO / "examples" / "initdata.toml").read_text()
    assert 'tee = "auto"' in text
    path = tmp_path / "initdata.toml"
    path.write_text(text.replace('tee = "auto"', f'tee = "{tee}"', 1))
    return path


def _tdx_machine(root: Path, mrconfigid: bytes, *, tpm: bool = False) -> None:
    """A TDX guest as cva sees it: /dev/tdx_guest and the MRCONFIGID the TDX module holds."""
    (root / "dev").mkdir(parents=True, exist_ok=True)
    (root / "dev/tdx_guest").touch()
    if tpm:
        (root / "dev/tpmrm0").touch()
    sysfs = root / MRCONFIGID_SYSFS
    sysfs.parent.mkdir(parents=True, exist_ok=True)
    sysfs.write_bytes(mrconfigid)


def _never_called(*_: object, **__: object) -> None:
    raise AssertionError("an attester was built before the contract's tee was checked")


def test_sample_image_trusts_the_example(tmp_path: Path) -> None:
    for tee in ("sample", "auto"):  # the contract may require sample or leave it to the image
        trusted = establish_trust(_config(tmp_path, _initdata(tmp_path, tee)), root=tmp_path)
        assert trusted.attester.tee == "sample"
        assert [v.name for v in trusted.contract.volumes] == ["pgdata", "shared-config"]
        assert len(trusted.initdata.digest()) == 32


def test_auto_never_picks_sample_and_fails_closed(tmp_path: Path) -> None:
    path = _initdata(tmp_path, "auto")
    with pytest.raises(AttesterUnavailable) as info:
        establish_trust(_config(tmp_path, path, EvidenceConfig()), root=tmp_path)
    assert "\n" not in info.value.message
    assert "no TEE found" in info.value.message and "sample" not in info.value.message


def test_contract_sample_on_tdx_hardware_is_refused_not_unbound(tmp_path: Path) -> None:
    """Issue 13 #1: host-supplied initdata saying tee = "sample" skipped the binding check on
    TDX; now the image decides tdx and the contract's requirement is refused."""
    _tdx_machine(tmp_path, bytes(48))  # MRCONFIGID measured for other (no) initdata
    path = _initdata(tmp_path, "sample")
    with pytest.raises(ContractError) as info:
        establish_trust(_config(tmp_path, path, EvidenceConfig()), root=tmp_path)
    message = info.value.message
    assert "kbs.tee" in message and "'sample'" in message and "'tdx'" in message
    assert "\n" not in message


def test_contract_sample_on_snp_hardware_is_refused(tmp_path: Path) -> None:
    fake = FakeTsm(tmp_path, "sev_guest", lambda p, i, lvl: (b"", None))
    path = _initdata(tmp_path, "sample")
    with pytest.raises(ContractError, match="'sample' but this image's TEE is 'snp'"):
        establish_trust(_config(tmp_path, path, EvidenceConfig()), root=tmp_path, fs=fake)


def test_contract_tpm_with_tdx_present_is_refused(tmp_path: Path) -> None:
    """A host-attached swtpm must not vouch for the contract on a TDX machine."""
    _tdx_machine(tmp_path, bytes(48), tpm=True)
    path = _initdata(tmp_path, "tpm")
    with pytest.raises(ContractError, match="'tpm' but this image's TEE is 'tdx'"):
        establish_trust(_config(tmp_path, path, EvidenceConfig()), root=tmp_path)


def test_contract_tee_other_than_the_image_is_refused_before_any_attester(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent.trust, "attester_for", _never_called)
    monkeypatch.setattr(agent.trust, "check_initdata_binding", _never_called)
    for tee in ("tdx", "snp", "tpm"):
        with pytest.raises(ContractError, match=f"requires '{tee}' but this image's TEE is"):
            establish_trust(_config(tmp_path, _initdata(tmp_path, tee)), root=tmp_path)


def test_tdx_binding_is_checked_whatever_the_contract_says(tmp_path: Path) -> None:
    path = _initdata(tmp_path, "auto")
    digest = parse_initdata(path.read_bytes()).digest()
    _tdx_machine(tmp_path, bytes(48))
    with pytest.raises(BindingError, match="MRCONFIGID"):
        establish_trust(_config(tmp_path, path, EvidenceConfig()), root=tmp_path)
    (tmp_path / MRCONFIGID_SYSFS).write_bytes(digest.ljust(48, b"\0"))
    assert (
        establish_trust(_config(tmp_path, path, EvidenceConfig()), root=tmp_path).attester.tee
        == "tdx"
    )
    path = _initdata(tmp_path, "tdx")
    digest = parse_initdata(path.read_bytes()).digest()
    (tmp_path / MRCONFIGID_SYSFS).write_bytes(digest.ljust(48, b"\0"))
    trusted = establish_trust(_config(tmp_path, path, EvidenceConfig()), root=tmp_path)
    assert trusted.attester.tee == "tdx"


def test_sample_image_on_tdx_hardware_is_refused(tmp_path: Path) -> None:
    """A test image's allow_sample never turns the binding off on real TEE hardware."""
    _tdx_machine(tmp_path, bytes(48))
    with pytest.raises(AttesterUnavailable, match="sample TEE is refused on tdx hardware"):
        establish_trust(_config(tmp_path, _initdata(tmp_path, "sample")), root=tmp_path)


def test_sample_without_allow_sample_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, _initdata(tmp_path, "sample"), EvidenceConfig(tee="sample"))
    with pytest.raises(AttesterUnavailable, match="allow_sample = true"):
        establish_trust(config, root=tmp_path)


def test_binding_check_never_skips_an_attester_without_a_register() -> None:
    initdata = parse_initdata((REPO / "examples" / "initdata.toml").read_bytes())
    with pytest.raises(BindingError, match="measures no initdata") as info:
        check_initdata_binding(initdata, SampleAttester())
    assert "\n" not in info.value.message


def test_missing_initdata(tmp_path: Path) -> None:
    with pytest.raises(CvaError, match="no initdata"):
        establish_trust(_config(tmp_path, tmp_path / "absent.toml"), root=tmp_path)


def test_contract_with_unknown_key_is_refused(tmp_path: Path) -> None:
    path = _initdata(tmp_path, "sample")
    path.write_text(path.read_text().replace("version = 1\n", "version = 1\nbogus = 2\n", 1))
    with pytest.raises(CvaError, match="bogus"):
        establish_trust(_config(tmp_path, path), root=tmp_path)


def test_initdata_without_a_cva_contract_serves_no_volumes_but_is_still_bound(
    tmp_path: Path,
) -> None:
    """Issue 22: an image with cva's prestart hook runs every pod; a pod whose initdata carries
    no cva contract gets an empty contract (the hook answers "no volumes"), and its initdata
    must still match the TEE."""
    path = tmp_path / "initdata.toml"
    path.write_text('version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"aa.toml" = "x"\n')
    digest = parse_initdata(path.read_bytes()).digest()
    _tdx_machine(tmp_path, bytes(48))
    with pytest.raises(BindingError, match="MRCONFIGID"):
        establish_trust(_config(tmp_path, path, EvidenceConfig()), root=tmp_path)
    (tmp_path / MRCONFIGID_SYSFS).write_bytes(digest.ljust(48, b"\0"))
    trusted = establish_trust(_config(tmp_path, path, EvidenceConfig()), root=tmp_path)
    assert trusted.attester.tee == "tdx" and trusted.contract.volumes == ()
