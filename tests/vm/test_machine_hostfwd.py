"""Host-driven style: the host talks to a service in the running guest through a hostfwd
(127.0.0.1 only), the pattern for end-to-end tests of the daemon."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from tests.vm import preflight
from tests.vm.build import ensure_image
from tests.vm.machine import HostForward, Machine, MachineSpec, free_port

pytestmark = [pytest.mark.vm, pytest.mark.slow]

GUEST_JOB = """\
mkdir -p /run/www && echo "hello-from-guest" > /run/www/hello.txt
python3 -m http.server 8080 --directory /run/www >/run/http.log 2>&1 &
for _ in $(seq 100); do (: > /dev/tcp/127.0.0.1/8080) 2>/dev/null && break; sleep 0.2; done
touch /mnt/vmjob/listening
for _ in $(seq 600); do [ -f /mnt/vmjob/done ] && exit 0; sleep 0.2; done
exit 3
"""


def _wait_for(path: Path, machine: Machine, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            machine.stop()
            pytest.fail(f"{path.name} never appeared; console: {machine.console}")
        time.sleep(0.25)


def test_host_reaches_guest_service_through_hostfwd(tmp_path: Path) -> None:
    missing = preflight.missing_tools()
    if missing:
        message = preflight.missing_message(missing)
        if preflight.in_ci():
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    (tmp_path / "run.sh").write_text(GUEST_JOB)
    machine = Machine(
        MachineSpec(
            image=ensure_image(),
            job_dir=tmp_path,
            host_forwards=(HostForward(port, 8080),),
            timeout=300,
        )
    )
    machine.start()
    try:
        _wait_for(tmp_path / "listening", machine, 240)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello.txt", timeout=30) as resp:
            body = resp.read()
    finally:
        (tmp_path / "done").touch()
    result = machine.wait()
    assert body == b"hello-from-guest\n"
    assert result.finished, result.failure()
    assert result.job_rc == 0
