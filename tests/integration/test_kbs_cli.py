"""`cva kbs get-resource` end to end against the loopback KBS (in-process and as a process)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cva
from tests.kbs.server import LoopbackKbs

KEY = "kbs:///default/pgdata/luks"
SECRET = bytes(range(200, 232)) + b"tail-bytes"


@pytest.fixture
def kbs(loopback_kbs: LoopbackKbs) -> LoopbackKbs:
    loopback_kbs.add_resource(KEY, SECRET)
    return loopback_kbs


def test_get_resource_sample_in_exactly_three_requests(kbs: LoopbackKbs) -> None:
    p = run_cva("kbs", "get-resource", "--url", kbs.url, "--tee", "sample", KEY)
    assert p.returncode == 0, p.stderr
    assert p.stdout == SECRET
    assert p.stderr == b""
    assert [(r.method, r.path, r.status) for r in kbs.requests] == [
        ("POST", "/kbs/v0/auth", 200),
        ("POST", "/kbs/v0/attest", 200),
        ("GET", "/kbs/v0/resource/default/pgdata/luks", 200),
    ]


def test_verbose_logs_never_show_the_resource(kbs: LoopbackKbs) -> None:
    p = run_cva("kbs", "get-resource", "--verbose", "--url", kbs.url, "--tee", "sample", KEY)
    assert p.returncode == 0 and p.stdout == SECRET
    assert b"kbs resource fetched" in p.stderr
    for form in (SECRET, SECRET.hex().encode(), SECRET[:8]):
        assert form not in p.stderr


def test_initdata_file_is_sent(kbs: LoopbackKbs, tmp_path: Path) -> None:
    text = 'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n'
    (tmp_path / "initdata.toml").write_text(text)
    kbs.expected_initdata_digest = hashlib.sha256(text.encode()).digest()
    p = run_cva(
        "kbs", "get-resource", "--url", kbs.url, "--tee", "sample",
        "--initdata", str(tmp_path / "initdata.toml"), KEY,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert kbs.last_attestation is not None
    assert kbs.last_attestation["init-data"] == {"format": "toml", "body": text}


def _fails(*args: str) -> str:
    p = run_cva("kbs", "get-resource", *args)
    assert p.returncode != 0
    assert p.stdout == b""
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


def test_failures_are_one_line_and_empty_stdout(kbs: LoopbackKbs, tmp_path: Path) -> None:
    kbs.deny(KEY)
    line = _fails("--url", kbs.url, "--tee", "sample", KEY)
    assert line.startswith("cva: KBS policy denied kbs:///default/pgdata/luks (401 PolicyDeny)")
    assert "has no resource" in _fails("--url", kbs.url, "--tee", "sample", "kbs:///a/b/c")
    kbs.expected_version = "0.3.0"
    assert "protocol version mismatch" in _fails("--url", kbs.url, "--tee", "sample", KEY)
    assert "plain http" in _fails("--url", "http://kbs.example:1", "--tee", "sample", KEY)
    _fails("--url", kbs.url, "--tee", "sample", "https://not-a-kbs-uri")
    _fails("--url", kbs.url, "--tee", "sample", "--cacert", str(tmp_path / "missing.pem"), KEY)
    (tmp_path / "bad.pem").write_text("not a certificate")
    _fails(
        "--url",
        "https://127.0.0.1:1",
        "--tee",
        "sample",
        "--cacert",
        str(tmp_path / "bad.pem"),
        KEY,
    )


def test_unreachable_kbs_within_the_deadline() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = _fails("--url", f"http://127.0.0.1:{port}", "--tee", "sample", "--timeout", "1", KEY)
    assert "KBS unavailable" in line and "ConnectError" in line


def test_server_as_a_process(tmp_path: Path) -> None:
    """`python -m tests.kbs.server` as the VM suite and `make demo` start it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kbs.server", "--port", "0",
         "--resource", f"{KEY}={SECRET.hex()}", "--resource", "kbs:///a/b/c=00ff"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        assert url.startswith("http://127.0.0.1:")
        p = run_cva("kbs", "get-resource", "--url", url, "--tee", "sample", KEY)
        assert p.returncode == 0, p.stderr
        assert p.stdout == SECRET
        p = run_cva("kbs", "get-resource", "--url", url, "--tee", "sample", "kbs:///a/b/c")
        assert p.stdout == b"\x00\xff"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
