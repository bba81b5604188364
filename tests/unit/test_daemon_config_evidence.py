"""`[evidence]` in /etc/cva/config.toml: the image's root of trust; strict and fail-closed."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, EvidenceConfig, parse_config


def test_defaults_never_allow_sample() -> None:
    assert parse_config("").evidence == EvidenceConfig("auto", False, False)
    assert parse_config("[evidence]\n").evidence == EvidenceConfig()
    assert not EvidenceConfig().allow_sample


@pytest.mark.parametrize(
    ("doc", "evidence"),
    [
        ('tee = "tdx"', EvidenceConfig("tdx")),
        ('tee = "snp"', EvidenceConfig("snp")),
        ('tee = "tpm"', EvidenceConfig("tpm")),
        ('tee = "tpm"\nvtpm_in_tee = true', EvidenceConfig("tpm", vtpm_in_tee=True)),
        ('tee = "sample"\nallow_sample = true', EvidenceConfig("sample", allow_sample=True)),
        ("allow_sample = false\nvtpm_in_tee = false", EvidenceConfig()),
    ],
)
def test_good(doc: str, evidence: EvidenceConfig) -> None:
    assert parse_config(f"[evidence]\n{doc}\n").evidence == evidence


@pytest.mark.parametrize(
    ("doc", "rule"),
    [
        ('tee = "sample"', "go together"),  # sample needs the explicit second key
        ("allow_sample = true", "go together"),  # and the key never widens auto
        ('tee = "tdx"\nallow_sample = true', "go together"),
        ('tee = "auto"\nvtpm_in_tee = true', "vtpm_in_tee = true needs"),
        ('tee = "snp"\nvtpm_in_tee = true', "vtpm_in_tee = true needs"),
        ('tee = "SAMPLE"\nallow_sample = true', "evidence.tee must be one of"),
        ('tee = "az-snp-vtpm"', "evidence.tee must be one of"),
        ('tee = "az-tdx-vtpm"', "evidence.tee must be one of"),
        ('tee = ""', "evidence.tee must be one of"),
        ("tee = 1", "evidence.tee must be one of"),
        ('tee = ["sample"]', "evidence.tee must be one of"),
        ('allow_sample = "true"\ntee = "sample"', "allow_sample must be true or false"),
        ("allow_sample = 1", "allow_sample must be true or false"),
        ("vtpm_in_tee = 1", "vtpm_in_tee must be true or false"),
        ("allow_samples = true", "unknown key evidence.allow_samples"),
        ("allowSample = true", "unknown key evidence.allowSample"),
    ],
)
def test_hostile(doc: str, rule: str) -> None:
    with pytest.raises(ConfigError, match=rule) as info:
        parse_config(f"[evidence]\n{doc}\n")
    assert "\n" not in info.value.message


def test_evidence_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match=r"\[evidence\] must be a table"):
        parse_config('evidence = "sample"\n')
