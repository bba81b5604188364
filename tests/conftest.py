"""Shared fixtures: where the upstream vectors are, and the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.swtpm import swtpm_tcti  # noqa: F401 - shared fixture: a fresh swtpm per test

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO.parent / "shared" / "vectors"
IN_CI = os.environ.get("CI") == "true"

# tests/guest runs only inside the qemu guest (the VM suite, `make vm-test`), never on the host.
if os.environ.get("CVA_IN_GUEST") != "1":
    collect_ignore = ["guest"]

# No per-example time limit: a deadline is a timing assertion, and on a loaded 2-core machine
# (or under TCG) a slow example is not a failure. Speed is measured by `make bench`.
settings.register_profile("cva", deadline=None)
settings.load_profile("cva")


@pytest.fixture(scope="session")
def vectors() -> Path:
    """`../shared/vectors` beside the checkout (never copied into the repo)."""
    if not VECTORS.is_dir():
        if IN_CI:
            pytest.fail(f"upstream vectors missing at {VECTORS}")
        pytest.skip(f"upstream vectors not present at {VECTORS}")
    return VECTORS


def run_cva(
    *args: str, input: bytes | None = None, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m agent ARGS` from this checkout; returns the completed process."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
        check=False,
    )


@pytest.fixture
def cva() -> object:
    return run_cva


@pytest.fixture(scope="session")
def go_ttrpc_client() -> Path:
    """containerd's Go ttrpc client as a test peer (built once, cached; tests/ttrpc_peer.py)."""
    from tests.ttrpc_peer import GoClientUnavailable, go_client

    try:
        return go_client()
    except GoClientUnavailable as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


# the loopback Trustee KBS (tests/kbs/server.py) as a fixture for the host suites; the guest
# image carries only cva's runtime dependencies and its test runner, not joserfc (a dev extra)
if os.environ.get("CVA_IN_GUEST") != "1":
    from tests.kbs.fixtures import loopback_kbs, tools_tpm_attester  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_logging_config() -> Iterator[None]:
    """Each test starts with structlog unconfigured, so cva's loggers write to that test's
    (captured) stdout rather than to a stream an earlier test configured."""
    import structlog

    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
