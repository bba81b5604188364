from __future__ import annotations

import os
import time

import pytest

from luks.run import ToolError, run, secret_fd
from luks.secret import Secret


def test_run_captures_and_checks() -> None:
    r = run(["sh", "-c", "echo out; echo err >&2"], timeout=10)
    assert r.stdout == b"out\n" and r.stderr == "err\n" and r.returncode == 0


def test_failure_names_tool_and_last_line() -> None:
    with pytest.raises(ToolError, match=r"sh -c failed \(exit 3\): boom"):
        run(["sh", "-c", "echo boom >&2; exit 3"], timeout=10)


def test_timeout_kills_the_whole_group() -> None:
    t0 = time.monotonic()
    with pytest.raises(ToolError, match=r"timed out after 0\.5s"):
        # a child that ignores SIGTERM, like cryptsetup in a KDF
        run(["sh", "-c", "trap '' TERM; sleep 30 & wait"], timeout=0.5)
    assert time.monotonic() - t0 < 10


def test_secret_stdin_and_redaction() -> None:
    with Secret(b"hunter2-key") as s:
        r = run(["sh", "-c", "cat; echo hunter2 >&2"], timeout=10, stdin=s, redact=["hunter2"])
    assert r.stdout == b"hunter2-key"
    assert "hunter2" not in r.stderr


def test_env_is_minimal() -> None:
    os.environ["CVA_SHOULD_NOT_LEAK"] = "1"
    r = run(["sh", "-c", "env"], timeout=10)
    assert b"CVA_SHOULD_NOT_LEAK" not in r.stdout


def test_secret_fd_reaches_child_without_argv() -> None:
    with secret_fd(b"memfd-secret") as path:
        fd = int(path.rsplit("/", 1)[1])
        r = run(["sh", "-c", f"cat /dev/fd/{fd}"], timeout=10, pass_fds=[fd])
    assert r.stdout == b"memfd-secret"


def test_missing_tool_is_one_line() -> None:
    with pytest.raises(ToolError, match="not found"):
        run(["definitely-not-a-tool-xyz"], timeout=5)
