"""`cva initdata policy` and `cva evidence policy` as a process: the printed policy is what the
Rego engine then evaluates (tests/unit/test_kbs_policy.py covers the policy's logic)."""

from __future__ import annotations

from pathlib import Path

from agent.initdata import encode_annotation, parse_initdata, reference_value
from tests.conftest import REPO, run_cva
from tests.rego_eval import allow, token

EXAMPLE = REPO / "examples" / "initdata.toml"
UUID = "6b1f8c1e-7d4a-4a55-9d0f-2c3e4b5a6d7e"


def test_initdata_policy_from_toml_and_annotation(tmp_path: Path) -> None:
    doc = parse_initdata(EXAMPLE.read_bytes())
    proc = run_cva("initdata", "policy", str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr
    policy = proc.stdout.decode()
    tdx = reference_value(doc, "tdx").hex()
    assert allow(policy, token("tdx", tdx), ["default", "pgdata", "luks"])
    assert allow(policy, token("tdx", tdx), ["default", "config", "luks"])
    assert not allow(policy, token("tpm", reference_value(doc, "tpm").hex()), ["default", "x", "y"])
    # the annotation form of the same document gives the same policy
    ann = tmp_path / "ann.txt"
    ann.write_text(encode_annotation(doc.raw))
    again = run_cva("initdata", "policy", str(ann))
    assert again.returncode == 0, again.stderr
    assert again.stdout == proc.stdout


def test_initdata_policy_tee_and_refusals() -> None:
    doc = parse_initdata(EXAMPLE.read_bytes())
    proc = run_cva("initdata", "policy", str(EXAMPLE), "--tee", "snp")
    assert proc.returncode == 0, proc.stderr
    policy = proc.stdout.decode()
    assert allow(
        policy, token("snp", reference_value(doc, "snp").hex()), ["default", "pgdata", "luks"]
    )
    assert not allow(
        policy, token("tdx", reference_value(doc, "tdx").hex()), ["default", "pgdata", "luks"]
    )
    bad = run_cva("initdata", "policy", str(EXAMPLE), "--tee", "sample")
    assert bad.returncode == 2  # argparse: not a choice
    stdin_twice = run_cva("initdata", "policy", "-", "-", input=EXAMPLE.read_bytes())
    assert stdin_twice.returncode == 1
    assert b"stdin" in stdin_twice.stderr


def test_evidence_policy_prints_a_policy_and_refuses_bad_values() -> None:
    proc = run_cva(
        "evidence", "policy", "--volume", "pgdata", "--uuid", UUID,
        "--header-sha256", "ab" * 32, "--resource", "kbs:///default/app/token",
        "--initdata", str(EXAMPLE), "--min-seq", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    assert "\npackage policy\n" in text
    assert '[["default", "app", "token"]]' in text
    assert "ev.content.seq >= 2" in text
    bad = run_cva(
        "evidence", "policy", "--volume", "pgdata", "--uuid", UUID.upper(),
        "--header-sha256", "ab" * 32, "--resource", "default/app/token",
    )  # fmt: skip
    assert bad.returncode == 1
    assert b"--uuid" in bad.stderr


def test_initdata_policy_with_a_volume_gated_resource() -> None:
    doc = parse_initdata(EXAMPLE.read_bytes())
    proc = run_cva(
        "initdata", "policy", str(EXAMPLE), "--volume", "pgdata", "--uuid", UUID,
        "--header-sha256", "ab" * 32, "--resource", "default/app/token",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    policy = proc.stdout.decode()
    mr = reference_value(doc, "tdx").hex()
    event = {
        "type_name": "EV_EVENT_TAG",
        "index": 4,
        "details": {
            "unicode_name": "AAEL",
            "data": {
                "domain": "cva",
                "operation": "volume-open",
                "content": {"name": "pgdata", "uuid": UUID, "header-sha256": "ab" * 32},
            },
        },
    }
    claims = token("tdx", mr, tee_claims={"uefi_event_logs": [event]})
    assert allow(policy, claims, ["default", "app", "token"])
    assert allow(policy, claims, ["default", "pgdata", "luks"])
    assert not allow(policy, token("tdx", mr), ["default", "app", "token"])
    partial = run_cva("initdata", "policy", str(EXAMPLE), "--volume", "pgdata")
    assert partial.returncode == 1
    assert b"go together" in partial.stderr
