"""A guest that panics or never starts its job ends in a clear failure, not a hung run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm import preflight
from tests.vm.build import GuestImage, ensure_image
from tests.vm.machine import Machine, MachineSpec

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture(scope="module")
def image() -> GuestImage:
    missing = preflight.missing_tools()
    if missing:
        message = preflight.missing_message(missing)
        if preflight.in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return ensure_image()


def test_kernel_panic_is_reported_with_the_console_tail(image: GuestImage, tmp_path: Path) -> None:
    spec = MachineSpec(image=image, job_dir=tmp_path, extra_append="init=/bin/false", timeout=180)
    machine = Machine(spec)
    result = machine.run()
    assert not result.finished
    assert result.problem is not None
    assert "Kernel panic" in result.failure()
    assert "last lines of the serial console" in result.failure()
    assert machine._qemu is not None and machine._qemu.poll() is not None


def test_guest_that_never_starts_its_job_is_stopped(image: GuestImage, tmp_path: Path) -> None:
    spec = MachineSpec(
        image=image, job_dir=tmp_path, extra_append="cva_vm.nojob=1", start_timeout=20
    )
    machine = Machine(spec)
    result = machine.run()
    assert result.problem is not None
    assert "did not start its job within 20 s" in result.problem
    assert machine._qemu is not None and machine._qemu.poll() is not None
