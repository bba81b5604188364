"""A real software TPM (swtpm) for tests: `swtpm_tcti` yields a TCTI string for tpm2-pytss.

Use it from any test module with `from tests.swtpm import swtpm_tcti  # noqa: F401` (or import
it in a conftest). Each test gets a fresh TPM (temp state dir, TPM2_Startup(CLEAR) done by swtpm),
listening on 127.0.0.1 only; the process is killed by pid at teardown.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager

import pytest

IN_CI = os.environ.get("CI") == "true"


def _free_port_pair() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 (best effort)."""
    for _ in range(50):
        with closing(socket.socket()) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        try:
            with closing(socket.socket()) as s2:
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for swtpm")


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    stop = time.monotonic() + timeout
    while time.monotonic() < stop:
        if proc.poll() is not None:
            raise RuntimeError(f"swtpm exited with {proc.returncode}")
        try:
            with closing(socket.create_connection(("127.0.0.1", port), timeout=0.5)):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("swtpm did not start listening")


@contextmanager
def swtpm_process() -> Iterator[str]:
    """Start swtpm with a temp state dir; yield `swtpm:host=127.0.0.1,port=P`."""
    exe = shutil.which("swtpm")
    if exe is None:
        if IN_CI:
            pytest.fail("swtpm is not installed (deps/apt-packages.txt)")
        pytest.skip("swtpm is not installed")
    with tempfile.TemporaryDirectory(prefix="cva-swtpm-") as state:
        for attempt in range(3):
            port = _free_port_pair()
            proc = subprocess.Popen(
                [
                    exe, "socket", "--tpm2",
                    "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                    "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                    "--tpmstate", f"dir={state}",
                    "--flags", "not-need-init,startup-clear",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                _wait_listening(port, proc)
            except RuntimeError:
                proc.kill()
                proc.wait(timeout=5)
                if attempt == 2:
                    raise
                continue
            try:
                yield f"swtpm:host=127.0.0.1,port={port}"
            finally:
                proc.kill()
                proc.wait(timeout=5)
            return


@pytest.fixture
def swtpm_tcti() -> Iterator[str]:
    """A fresh swtpm's TCTI string (skips when swtpm is missing, fails in CI)."""
    with swtpm_process() as tcti:
        yield tcti
