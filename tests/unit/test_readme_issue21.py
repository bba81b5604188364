"""The README states exactly what holds (issue 21 #2, #3, #4, #5): each sentence here is one a
platform engineer or a verifier acts on, and each is proved by the tests named beside it."""

from __future__ import annotations

import re

from tests.conftest import REPO

README = " ".join((REPO / "README.md").read_text().split())  # one line: phrases may wrap


def _section(start: str, end: str) -> str:
    at = README.index(start)
    return README[at : README.index(end, at)]


def test_rollback_says_what_seq_detects_and_promises_no_freshness() -> None:
    """tests/guest/test_rollback_limits.py, test_storage_volume.test_seq_in_the_log_..."""
    start = "**Rollback: what `seq` detects, and what it does not.**"
    text = _section(start, "**What Trustee sees")
    assert "a replayed header alone, or a whole-image restore" in text
    assert "does **not** detect a rollback of the data alone" in text
    assert "newest seq + 1" in text
    assert "cva makes no promise of data freshness" in text
    assert not re.search(r"detects the rollback\.", text)  # the old, too broad promise


def test_the_tpm_sink_only_on_a_tpm_tee_and_production_pins_tee() -> None:
    """tests/integration/test_measure_rtmr.py, tests/unit/test_tee_decision.py"""
    assert "**only when the image's TEE decision is `tpm`**" in README
    assert "**production images pin `tee`**" in README
    assert "the `tdx_guest` flag in `/proc/cpuinfo`" in README


def test_one_pcr8_writer_and_the_bounds_are_documented() -> None:
    """test_pcr8_one_writer.py, test_ttrpc_limits.py, test_measure_budget.py"""
    assert "**PCR8 has one writer per boot**" in README and 'pcr8_extender = "aa"' in README
    assert "capped per method, 16 KiB by default" in README
    assert "**512 events per contract volume**" in README
    assert "`ephemeral-create` and `ephemeral-close`" in README


def test_key_material_residue_is_documented() -> None:
    """tests/unit/test_key_material_buffers.py"""
    text = _section("## Key material in memory", "## Code map")
    assert "ECDH shared secret Z" in text and "unwrapped content key" in text
    assert "`derive_into`" in text
