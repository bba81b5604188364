"""`cva evidence parse|collect` as a subprocess: vectors, garbage, swtpm collection."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.conftest import run_cva


def _parse(*args: str) -> dict[str, object]:
    proc = run_cva("evidence", "parse", *args)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_parse_tdx_v4_reproduces_trustee_claims(vectors: Path) -> None:
    out = _parse(str(vectors / "tdx/trustee_tdx_quote_v4.dat"))
    expected = json.loads((vectors / "tdx/trustee_parse_tdx_claims_expected.json").read_text())
    assert out["quote"] == expected["quote"]
    assert out["report_data"] == expected["report_data"]
    assert out["init_data"] == expected["init_data"]
    assert out["signature"]["verified"] is True  # type: ignore[index]


def test_parse_tdx_v5_tdx15(vectors: Path) -> None:
    out = _parse(str(vectors / "tdx/trustee_tdx_quote_v5_tdx15.dat"))
    body = out["quote"]["body"]  # type: ignore[index]
    assert out["format"] == "tdx-quote-v5" and out["body_type"] == "tdx-1.5"
    assert body["mr_td"].startswith("dfba221b48a22af8")
    assert body["mr_servicetd"].startswith("383c87d3bbb047b2")
    assert body["rtmr_0"].startswith("9b529f3689e2e8eb")


def test_parse_tdx_mrconfigid_and_tdreport(vectors: Path) -> None:
    out = _parse(str(vectors / "tdx/trustee_tdx_quote_v4_mrconfigid.dat"))
    assert out["init_data"].startswith("889abf4718f037e3")  # type: ignore[union-attr]
    assert out["trailing_bytes"] == 70
    rep = _parse(str(vectors / "tdx/gc_tdreport_1.bin"))
    assert rep["format"] == "tdreport"
    assert rep["tdreport"]["rtmr_0"].startswith("f4ec1a04670fe792")  # type: ignore[index]


def test_parse_snp_with_vcek_and_chain(vectors: Path) -> None:
    snp = vectors / "snp"
    out = _parse(
        str(snp / "trustee_snp_report_v2_milan.bin"),
        "--vcek", str(snp / "trustee_snp_vcek_milan.der"),
        "--chain", str(snp / "trustee_milan_ask_ark_asvk.pem"),
    )  # fmt: skip
    assert out["measurement"].startswith("a1f3930413247bb3")  # type: ignore[union-attr]
    assert out["report_data"].startswith("ec6c52d7533cc2c4")  # type: ignore[union-attr]
    assert out["host_data"] == "00" * 32
    assert out["signature"]["verified"] is True  # type: ignore[index]
    assert "ARK-Milan" in out["signature"]["chain"][1]  # type: ignore[index]
    vlek = _parse(
        str(snp / "trustee_snp_report_v3_vlek.bin"),
        "--vcek", str(snp / "trustee_snp_vlek.der"),
        "--chain", str(snp / "trustee_milan_ask_ark_asvk.pem"),
    )  # fmt: skip
    assert vlek["signing_key"] == "VLEK" and vlek["signature"]["verified"] is True  # type: ignore[index]
    unsigned = _parse(str(snp / "gosev_attestation_v2_milan.bin"))
    assert unsigned["signature"]["verified"] is False  # type: ignore[index]


def test_parse_snp_evidence_json_uses_its_vcek(vectors: Path) -> None:
    out = _parse(str(vectors / "snp/trustee_snp_evidence_e2e.json"))
    assert out["format"] == "snp-evidence"
    assert out["signature"]["verified"] is True  # type: ignore[index]
    assert out["measurement"].startswith("6a6519d7")  # type: ignore[union-attr]


def test_parse_tpm_and_sample_evidence(vectors: Path) -> None:
    tpm = _parse(str(vectors / "tpm/trustee_tpm_evidence.json"))
    assert tpm["tee"] == "tpm" and len(tpm["report_data"]) == 128  # type: ignore[arg-type]
    assert len(tpm["init_data"]) == 64  # type: ignore[arg-type]
    sample = _parse(str(vectors / "sample/gc_api_server_rest_sample_evidence.json"))
    assert sample == {
        "tee": "sample",
        "format": "sample-evidence",
        "svn": "1",
        "report_data": "78787878",
    }


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"\x04\x00\x02\x00\x81\x00\x00\x00" + b"\0" * 10, b"{", b"[" * 100000,
     b'{"quote": "!!"}', b"\x00" * 1184, b"{}"],
)  # fmt: skip
def test_garbage_exits_non_zero_with_one_line(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "bad"
    f.write_bytes(content)
    proc = run_cva("evidence", "parse", str(f))
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("cva: "), err
    assert "Traceback" not in err and proc.stdout == b""


def test_tampered_quote_exits_non_zero(tmp_path: Path, vectors: Path) -> None:
    data = bytearray((vectors / "tdx/trustee_tdx_quote_v4.dat").read_bytes())
    data[200] ^= 1
    f = tmp_path / "q"
    f.write_bytes(bytes(data))
    proc = run_cva("evidence", "parse", str(f))
    assert proc.returncode == 1
    assert b"signature does not verify" in proc.stderr


def test_missing_and_oversized_files(tmp_path: Path) -> None:
    proc = run_cva("evidence", "parse", str(tmp_path / "nope"))
    assert proc.returncode == 1 and b"cannot read" in proc.stderr
    big = tmp_path / "big"
    big.write_bytes(bytes(5 * 1024 * 1024))
    proc = run_cva("evidence", "parse", str(big))
    assert proc.returncode == 1 and b"larger than" in proc.stderr


def test_collect_sample() -> None:
    proc = run_cva("evidence", "collect", "--report-data", "78787878", "--tee", "sample")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "tee": "sample",
        "evidence": {"svn": "1", "report_data": "eHh4eA=="},
    }


def test_collect_bad_report_data() -> None:
    for value in ("zz", "00" * 65):
        proc = run_cva("evidence", "collect", "--report-data", value, "--tee", "sample")
        assert proc.returncode == 1 and proc.stderr.count(b"\n") == 1


@pytest.mark.swtpm
def test_collect_tpm_from_swtpm(swtpm_tcti: str) -> None:
    rd = "ab" * 48
    proc = run_cva("evidence", "collect", "--report-data", rd, "--tee", "tpm", "--tcti", swtpm_tcti)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tee"] == "tpm"
    # and the collected evidence parses + verifies
    proc = run_cva("evidence", "parse", "-", input=json.dumps(out["evidence"]).encode())
    assert proc.returncode == 0, proc.stderr
    parsed = json.loads(proc.stdout)
    assert parsed["report_data"] == "ab" * 32
    assert base64.b64decode(out["evidence"]["ak_public"])
