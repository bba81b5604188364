"""Host side of the VM suite: boot the guest once per session, report each guest test.

`tests/vm/test_guest_suite.py` holds a `GuestSuite` object; the hook below turns it into a
collector that (only when tests marked `vm` are selected) builds/finds the image, starts the
host services, boots the guest for `pytest tests/guest`, boots it again for the `boot2` tests,
checks the raw disks, and yields one host test item per result:

    .../test_guest_suite.py::guest::image               the image is there
    .../test_guest_suite.py::guest::service[echo]       a host service started
    .../test_guest_suite.py::guest::boot1               the guest booted and ran its pytest
    .../test_guest_suite.py::guest::boot1::tests/guest/test_harness.py::test_x
    .../test_guest_suite.py::guest::host_never_sees[cvatest0:tests/guest/...]
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm import preflight
from tests.vm.suite import SuiteRun, run_suite


class GuestSuite:
    """Marker object: a module attribute of this type becomes the VM suite collector."""


class GuestFailure(Exception):
    """A guest-side failure, shown as its text only (no host traceback)."""


def _vm_selected(config: pytest.Config) -> bool:
    expr = config.option.markexpr
    if not expr:
        return True
    try:
        from _pytest.mark.expression import Expression

        def is_vm(name: str, /, **_: str | int | bool | None) -> bool:
            return name == "vm"

        return bool(Expression.compile(expr).evaluate(is_vm))
    except Exception:  # an unknown pytest version: decide on the text
        return "not vm" not in expr


class ResultItem(pytest.Item):
    def __init__(self, *, outcome: str, message: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.outcome = outcome
        self.message = message
        self.add_marker(pytest.mark.vm)

    def runtest(self) -> None:
        if self.outcome == "skipped":
            pytest.skip(self.message or "skipped in the guest")
        if self.outcome != "passed":
            raise GuestFailure(self.message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, GuestFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.name


def _items_from(run: SuiteRun) -> Iterator[tuple[str, str, str]]:
    """(name, outcome, message) for every host-visible result of the run."""
    if run.problem is not None or run.image is None:
        yield "image", "failed", run.problem or "no image"
        return
    yield "image", "passed", ""
    for name, problem in run.service_problems.items():
        yield f"service[{name}]", ("failed" if problem else "passed"), problem or ""
    for boot in run.boots:
        yield f"boot{boot.number}", ("failed" if boot.problem else "passed"), boot.problem or ""
        for case in boot.cases:
            yield f"boot{boot.number}::{case.nodeid}", case.outcome, case.message
    for check in run.checks:
        yield check.check.label, ("passed" if check.ok else "failed"), check.message


class GuestSuiteCollector(pytest.Collector):
    def collect(self) -> Iterator[pytest.Item]:
        config = self.config
        if not _vm_selected(config) or config.option.collectonly:
            yield self._item("suite", "skipped", "VM suite not run (not selected or collect-only)")
            return
        missing = preflight.missing_tools()
        if missing:
            outcome = "failed" if preflight.in_ci() else "skipped"
            yield self._item("preflight", outcome, preflight.missing_message(missing))
            return
        run = _session_run(config)
        for name, outcome, message in _items_from(run):
            yield self._item(name, outcome, message)

    def _item(self, name: str, outcome: str, message: str) -> ResultItem:
        return ResultItem.from_parent(self, name=name, outcome=outcome, message=message)


def _session_run(config: pytest.Config) -> SuiteRun:
    cached: SuiteRun | None = getattr(config, "_cva_vm_run", None)
    if cached is not None:
        return cached
    reporter = config.pluginmanager.get_plugin("terminalreporter")

    def log(line: str) -> None:
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line)

    run_dir = Path(tempfile.mkdtemp(prefix="cva-vm-run-"))
    log(f"vm: run folder {run_dir} (job files, consoles, disk images)")
    run = run_suite(run_dir, log=log)
    config._cva_vm_run = run  # type: ignore[attr-defined]
    if os.environ.get("CVA_VM_KEEP") != "1":
        config.add_cleanup(lambda: _drop_disk_images(run_dir))
    return run


def _drop_disk_images(run_dir: Path) -> None:
    """The raw disks are large; logs and consoles stay (CVA_VM_KEEP=1 keeps everything)."""
    for image in [*run_dir.glob("disks/*.img"), *run_dir.glob("job/disks/*.img")]:
        image.unlink(missing_ok=True)


def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Any:
    if isinstance(obj, GuestSuite):
        return GuestSuiteCollector.from_parent(collector, name=name)
    return None
