"""A tpm2-tools based `tpm` attester on swtpm: the KBS tests' second, independent TPM evidence.

`ToolsTpmAttester` produces guest-components' `tpm` evidence (SPEC §c.5) with tpm2-tools against
a swtpm (`swtpm_tcti`, tests/swtpm.py): an RSA-2048 restricted signing AK (RSASSA-SHA256) made as
a primary key, a TPM2_Quote over all 24 SHA-256 PCRs with the report data as qualifying data, the
PCR values, and the AK as DER SubjectPublicKeyInfo. It checks the loopback KBS's TPM verifier
against quotes made by other code than `evidence.tpm` (which the round trips use as well).
Every tool runs through `luks.run.run` with a timeout.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from luks.run import run


class Tpm:
    """tpm2-tools against one TPM, addressed by its TCTI (e.g. the `swtpm_tcti` fixture)."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti

    def tool(self, *argv: str) -> bytes:
        return run(argv, timeout=30, env={"TPM2TOOLS_TCTI": self.tcti}).stdout


class ToolsTpmAttester:
    """The `tpm` TEE's evidence, made with tpm2-tools (see module docstring)."""

    tee = "tpm"

    def __init__(self, tpm: Tpm, workdir: Path) -> None:
        self.tpm, self.dir = tpm, workdir
        self.ak_ctx = str(workdir / "ak.ctx")
        attributes = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda"
        tpm.tool(
            "tpm2_createprimary", "-Q", "-C", "e", "-g", "sha256",
            "-G", "rsa2048:rsassa-sha256:null", "-a", attributes, "-c", self.ak_ctx,
        )  # fmt: skip
        der = workdir / "ak.der"
        tpm.tool("tpm2_readpublic", "-Q", "-c", self.ak_ctx, "-f", "der", "-o", str(der))
        self.ak_der = der.read_bytes()

    def extend_pcr8(self, initdata_digest: bytes) -> None:
        """What guest-components' AA does at start with the init-data digest (sha256 only)."""
        self.tpm.tool("tpm2_pcrextend", f"8:sha256={initdata_digest.hex()}")

    def evidence(self, report_data: bytes) -> dict[str, Any]:
        d = self.dir
        self.tpm.tool(
            "tpm2_quote", "-Q", "-c", self.ak_ctx, "-l", "sha256:all", "-g", "sha256",
            "-q", report_data.hex(), "-m", str(d / "msg"), "-s", str(d / "sig"),
        )  # fmt: skip
        self.tpm.tool("tpm2_pcrread", "-Q", "sha256:all", "-o", str(d / "pcrs"))
        pcrs = (d / "pcrs").read_bytes()
        return {
            "tpm_quote": {
                "signature": base64.b64encode((d / "sig").read_bytes()).decode(),
                "message": base64.b64encode((d / "msg").read_bytes()).decode(),
                "pcrs": [pcrs[i : i + 32].hex() for i in range(0, len(pcrs), 32)],
            },
            "ak_public": base64.b64encode(self.ak_der).decode(),
        }

    def initdata_binding(self) -> bytes | None:
        self.tpm.tool("tpm2_pcrread", "-Q", "sha256:8", "-o", str(self.dir / "pcr8"))
        return (self.dir / "pcr8").read_bytes()


def pcr8_after_extend(initdata_digest: bytes) -> bytes:
    return hashlib.sha256(b"\0" * 32 + initdata_digest).digest()


@pytest.fixture
def tools_tpm_attester(swtpm_tcti: str, tmp_path: Path) -> ToolsTpmAttester:
    """A tpm2-tools attester on a fresh swtpm (tests/swtpm.py); skips without tpm2-tools."""
    for tool in ("tpm2_quote", "tpm2_createprimary", "tpm2_pcrread", "tpm2_pcrextend"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    return ToolsTpmAttester(Tpm(swtpm_tcti), tmp_path)
