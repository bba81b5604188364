"""Trust before service: initdata -> contract -> binding check, with the real modules
(the sample TEE on the host; TDX/SNP/TPM bindings are tested by the evidence suite and the VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DaemonConfig, InitdataSources
from agent.errors import CvaError
from agent.trust import establish_trust
from tests.conftest import REPO


def _config(tmp_path: Path, toml: Path) -> DaemonConfig:
    return DaemonConfig(initdata=InitdataSources(devices=(tmp_path / "no-such-disk",), toml=toml))


def _initdata(tmp_path: Path, tee: str) -> Path:
    text = (REPO / "examples" / "initdata.toml").read_text()
    assert 'tee = "auto"' in text
    path = tmp_path / "initdata.toml"
    path.write_text(text.replace('tee = "auto"', f'tee = "{tee}"'))
    return path


def test_sample_tee_trusts_the_example(tmp_path: Path) -> None:
    trusted = establish_trust(_config(tmp_path, _initdata(tmp_path, "sample")))
    assert trusted.attester.tee == "sample"
    assert [v.name for v in trusted.contract.volumes] == ["pgdata", "shared-config"]
    assert len(trusted.initdata.digest()) == 32


def test_auto_never_picks_sample_and_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(CvaError) as info:
        establish_trust(_config(tmp_path, _initdata(tmp_path, "auto")), root=tmp_path)
    assert "\n" not in info.value.message


def test_missing_initdata(tmp_path: Path) -> None:
    with pytest.raises(CvaError, match="no initdata"):
        establish_trust(_config(tmp_path, tmp_path / "absent.toml"))


def test_contract_with_unknown_key_is_refused(tmp_path: Path) -> None:
    path = _initdata(tmp_path, "sample")
    path.write_text(path.read_text().replace("version = 1\n", "version = 1\nbogus = 2\n", 1))
    with pytest.raises(CvaError, match="bogus"):
        establish_trust(_config(tmp_path, path))
