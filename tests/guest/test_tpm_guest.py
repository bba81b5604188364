"""The TPM attester inside the qemu guest, through the kernel's TPM resource manager (swtpm).

Runs only in the guest (CVA_IN_GUEST=1, root). PCR8 is not asserted here: the guest's boot
loader may already measure into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evidence.detect import attester_for, detect_tee
from evidence.tpm import TpmAttester
from evidence.tpm_quote import tpm_evidence_from_json, verify_quote

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.environ.get("CVA_IN_GUEST") != "1", reason="runs inside the guest"),
]


def test_auto_detects_the_guest_tpm() -> None:
    assert Path("/dev/tpmrm0").exists()
    assert detect_tee() == "tpm"
    assert isinstance(attester_for("auto"), TpmAttester)


def test_quote_through_dev_tpmrm0_verifies() -> None:
    rd = hashlib.sha384(b"guest runtime data").digest()
    ev = TpmAttester("device:/dev/tpmrm0").evidence(rd)
    quote, ak = tpm_evidence_from_json(ev)
    attest = verify_quote(quote, ak)
    assert attest.extra_data == rd[:32]
    assert TpmAttester().evidence(b"again")["ak_public"] == ev["ak_public"]  # AK persisted


def test_cli_collect_auto_in_guest() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "evidence", "collect", "--report-data", "00" * 48],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tee"] == "tpm"
