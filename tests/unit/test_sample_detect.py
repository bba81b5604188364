"""The sample attester (vector shape) and detection, which fails closed."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from evidence.base import Attester
from evidence.detect import attester_for, detect_tee
from evidence.errors import AttesterUnavailable, EvidenceError
from evidence.sample import SampleAttester
from evidence.tpm import TpmAttester


def test_sample_matches_the_guest_components_example(vectors: Path) -> None:
    expected = json.loads((vectors / "sample/gc_api_server_rest_sample_evidence.json").read_text())
    assert SampleAttester().evidence(b"xxxx") == expected
    assert expected == {"svn": "1", "report_data": "eHh4eA=="}


def test_sample_keeps_exact_bytes_and_has_no_register() -> None:
    att = SampleAttester()
    assert isinstance(att, Attester)
    assert att.tee == "sample"
    digest = bytes(range(48))
    ev = att.evidence(digest)
    assert base64.b64decode(ev["report_data"]) == digest  # no padding to 64
    assert att.initdata_binding() is None
    with pytest.raises(EvidenceError):
        att.evidence(b"x" * 65)


def test_auto_never_picks_sample_and_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(AttesterUnavailable, match="no TEE found"):
        detect_tee(tmp_path)
    with pytest.raises(AttesterUnavailable, match="no TEE found"):
        attester_for("auto", root=tmp_path)


def test_sample_only_by_name(tmp_path: Path) -> None:
    assert isinstance(attester_for("sample", root=tmp_path), SampleAttester)


def test_tpm_detected_from_tpmrm0(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/tpmrm0").touch()
    assert detect_tee(tmp_path) == "tpm"
    att = attester_for("auto", root=tmp_path)
    assert isinstance(att, TpmAttester)
    assert att.tcti == f"device:{tmp_path}/dev/tpmrm0"


def test_device_order_tdx_then_snp_then_tpm(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    for name in ("tpmrm0", "sev-guest", "tdx_guest"):
        (tmp_path / "dev" / name).touch()
    assert detect_tee(tmp_path) == "tdx"
    (tmp_path / "dev/tdx_guest").unlink()
    assert detect_tee(tmp_path) == "snp"
    (tmp_path / "dev/sev-guest").unlink()
    assert detect_tee(tmp_path) == "tpm"


def test_empty_configfs_tsm_without_provider_falls_through(tmp_path: Path) -> None:
    (tmp_path / "sys/kernel/config/tsm/report").mkdir(parents=True)
    with pytest.raises(AttesterUnavailable, match="no TEE found"):
        detect_tee(tmp_path)
    assert list((tmp_path / "sys/kernel/config/tsm/report").iterdir()) == []


@pytest.mark.parametrize("name", ["bogus", "", "SAMPLE", "az-snp-vtpm", "az-tdx-vtpm"])
def test_unknown_or_unsupported_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(AttesterUnavailable):
        attester_for(name, root=tmp_path)
