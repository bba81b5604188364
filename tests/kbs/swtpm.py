"""A swtpm TPM and a tpm2-tools based `tpm` attester: the KBS tests' own TPM evidence source.

`ToolsTpmAttester` produces guest-components' `tpm` evidence (SPEC §c.5) with tpm2-tools against
a swtpm: an RSA-2048 restricted signing AK (RSASSA-SHA256) made as a primary key, a TPM2_Quote
over all 24 SHA-256 PCRs with the report data as qualifying data, the PCR values, and the AK as
DER SubjectPublicKeyInfo. It exercises the loopback KBS's TPM verifier with quotes from a real
TPM implementation, independently of `evidence.tpm` (which the round-trip tests also use once
it is available). Every tool runs through `luks.run.run` with a timeout.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luks.run import run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Swtpm:
    """A fresh swtpm (TPM 2.0, started and cleared) on loopback TCP; `tcti` for tpm2-tools."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.port = _free_port()
        ctrl = self.port + 1  # the swtpm TCTI always uses the next port for control
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("swtpm did not start")

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def tool(self, *argv: str) -> bytes:
        return run(argv, timeout=30, env={"TPM2TOOLS_TCTI": self.tcti}).stdout

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ToolsTpmAttester:
    """The `tpm` TEE's evidence, made with tpm2-tools (see module docstring)."""

    tee = "tpm"

    def __init__(self, tpm: Swtpm, workdir: Path) -> None:
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
def tools_tpm_attester() -> Iterator[ToolsTpmAttester]:
    """A fresh swtpm and a tpm2-tools attester on it (skips when swtpm/tpm2-tools are absent)."""
    for tool in ("swtpm", "tpm2_quote", "tpm2_createprimary"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    with tempfile.TemporaryDirectory(prefix="cva-swtpm-") as tmp:
        state, work = Path(tmp) / "state", Path(tmp) / "work"
        state.mkdir()
        work.mkdir()
        tpm = Swtpm(state)
        try:
            yield ToolsTpmAttester(tpm, work)
        finally:
            tpm.stop()
