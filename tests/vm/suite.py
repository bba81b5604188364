"""The VM suite as one run: image, host services, boot 1, boot 2, raw-disk checks.

`run_suite()` boots the guest once to run `pytest tests/guest -m "not boot2"` as root with
the repository at /mnt/vmsrc, then (when any guest test is marked boot2) a second time on the
same data disks and TPM state for `-m boot2`. Each guest pytest writes junit XML into the job
folder; the host turns it into `GuestCase`s. After each boot, the `host_never_sees` /
`host_sees` registrations the guest left in the job folder are checked on the raw images.
Nothing here depends on pytest; tests/vm/conftest.py turns the outcome into test results.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from tests.ttrpc_peer import GoClientUnavailable, go_client
from tests.vm import services
from tests.vm.build import GuestImage, ImageBuildError, ensure_image
from tests.vm.host_services import host_services
from tests.vm.machine import BootResult, Disk, MachineSpec, boot, make_sparse_disk
from tests.vm.rawscan import count_markers

REPO = Path(__file__).resolve().parents[2]
DISK_PREFIX = "cvatest"
CHECKS_FILE = "disk-checks.jsonl"
BOOT2_COUNT_FILE = "boot2-count"

Outcome = Literal["passed", "failed", "skipped"]
Log = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    disk_count: int = 6
    disk_size: int = 2 * 1024**3
    timeout: float = 2400.0
    keep: bool = False
    pytest_args: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            disk_count=int(env.get("CVA_VM_DISKS", "6")),
            disk_size=int(env.get("CVA_VM_DISK_GIB", "2")) * 1024**3,
            timeout=float(env.get("CVA_VM_TIMEOUT", "2400")),
            keep=env.get("CVA_VM_KEEP", "") == "1",
            pytest_args=tuple(shlex.split(env.get("CVA_VM_PYTEST_ARGS", ""))),
        )


@dataclass(frozen=True)
class GuestCase:
    boot: int
    nodeid: str  # as the guest's pytest names it, e.g. tests/guest/test_x.py::test_y
    outcome: Outcome
    message: str
    seconds: float


@dataclass(frozen=True)
class DiskCheck:
    boot: int
    kind: Literal["never", "always"]
    serial: str
    marker: bytes
    test: str
    number: int = 0  # position in the guest's registration file

    @property
    def label(self) -> str:
        verb = "host_never_sees" if self.kind == "never" else "host_sees"
        return f"{verb}[{self.serial}:{self.test}#{self.number}]"


@dataclass(frozen=True)
class CheckResult:
    check: DiskCheck
    ok: bool
    message: str


@dataclass(frozen=True)
class BootOutcome:
    number: int
    result: BootResult
    cases: tuple[GuestCase, ...]
    problem: str | None  # the boot itself failed (hang, panic, guest pytest crash)


@dataclass
class SuiteRun:
    run_dir: Path
    image: GuestImage | None = None
    problem: str | None = None  # no image: nothing booted
    service_problems: dict[str, str | None] = field(default_factory=dict)
    boots: list[BootOutcome] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)


# --- junit --------------------------------------------------------------------------------
def _nodeid(classname: str, name: str) -> str:
    """Rebuild `path.py::Class::test` from junit's dotted classname."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        candidate = Path(*parts[:cut]).with_suffix(".py")
        if (REPO / candidate).is_file():
            return "::".join([candidate.as_posix(), *parts[cut:], name])
    return f"{classname}::{name}" if classname else name


def parse_junit(path: Path, boot_number: int) -> list[GuestCase]:
    cases = []
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        nodeid = _nodeid(case.get("classname", ""), case.get("name", "?"))
        outcome: Outcome = "passed"
        message = ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                head = child.get("message", "")
                message = f"[{child.tag}] {head}\n{child.text or ''}".strip()
                break
            if child.tag == "skipped":
                outcome = "skipped"
                message = child.get("message", "") or (child.text or "")
        cases.append(
            GuestCase(boot_number, nodeid, outcome, message, float(case.get("time", "0") or 0))
        )
    return cases


# --- the guest's job ----------------------------------------------------------------------
def job_script(
    boot_number: int, env: dict[str, str], pytest_args: tuple[str, ...], junit: str
) -> str:
    selection = "boot2" if boot_number == 2 else "not boot2"
    exports = {
        "CVA_IN_GUEST": "1",
        "CVA_VM_BOOT": str(boot_number),
        "PYTHONPATH": "/mnt/vmsrc",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TPM2TOOLS_TCTI": "device:/dev/tpmrm0",
        "HOME": "/root",
        # the image's /tmp is a tmpfs (kata-containers.target requires tmp.mount): tmp_path
        # and loop-device files stay on the root disk, as before
        "TMPDIR": "/var/tmp",
        "PATH": "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        **env,
    }
    lines = ["#!/bin/bash", "# written by tests/vm/suite.py for one boot"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in sorted(exports.items())]
    argv = [
        "/opt/venv/bin/python", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs",
        "tests/guest", "-m", selection, f"--junitxml=/mnt/vmjob/{junit}",
        "-o", "junit_family=xunit2", *pytest_args,
    ]  # fmt: skip
    lines += ["cd /mnt/vmsrc", "exec " + shlex.join(argv)]
    return "\n".join(lines) + "\n"


def read_disk_checks(job_dir: Path) -> list[DiskCheck]:
    path = job_dir / CHECKS_FILE
    if not path.exists():
        return []
    checks = []
    for number, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        item = json.loads(line)
        checks.append(
            DiskCheck(
                boot=int(item["boot"]),
                kind="never" if item["kind"] == "never" else "always",
                serial=str(item["serial"]),
                marker=bytes.fromhex(item["marker"]),
                test=str(item["test"]),
                number=number,
            )
        )
    return checks


def run_disk_checks(checks: list[DiskCheck], disks: dict[str, Path]) -> list[CheckResult]:
    results = []
    by_serial: dict[str, list[DiskCheck]] = {}
    for check in checks:
        by_serial.setdefault(check.serial, []).append(check)
    for serial, group in by_serial.items():
        image = disks.get(serial)
        if image is None:
            results += [
                CheckResult(c, False, f"no host image for the disk serial {serial!r}")
                for c in group
            ]
            continue
        counts = count_markers(image, [c.marker for c in group])
        for check in group:
            hits = counts[check.marker]
            ok = hits == 0 if check.kind == "never" else hits > 0
            want = "0" if check.kind == "never" else "> 0"
            results.append(
                CheckResult(
                    check,
                    ok,
                    f"marker {check.marker!r} found {hits} times in {image} (want {want})",
                )
            )
    return results


def _boot_problem(result: BootResult, junit: Path, output_tail: str) -> str | None:
    if not result.finished:
        return result.failure()
    # pytest: 0 all passed, 1 some failed (reported per case), 5 nothing collected.
    if result.job_rc not in (0, 1, 5) or not junit.exists():
        return (
            f"the guest's pytest ended with rc {result.job_rc}"
            f"{'' if junit.exists() else ' and wrote no junit XML'}\n"
            f"--- last lines of its output:\n{output_tail}"
        )
    return None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


def run_suite(run_dir: Path, *, settings: Settings | None = None, log: Log = print) -> SuiteRun:
    settings = settings or Settings.from_env()
    run = SuiteRun(run_dir=run_dir)
    try:
        run.image = ensure_image(REPO, log=log)
    except (ImageBuildError, OSError) as exc:
        run.problem = f"the guest image could not be built: {exc}"
        return run
    job = run_dir / "job"
    job.mkdir(parents=True, exist_ok=True)
    _install_go_client(job, log)
    disks = {
        f"{DISK_PREFIX}{i}": make_sparse_disk(
            run_dir / "disks" / f"{DISK_PREFIX}{i}.img", settings.disk_size
        )
        for i in range(settings.disk_count)
    }
    running = [
        services.start(service, i, REPO, job) for i, service in enumerate(host_services(REPO))
    ]
    try:
        env = {"CVA_VM_DISKS": " ".join(disks)}
        for item in running:
            run.service_problems[item.service.name] = item.problem
            if item.problem is None:
                env[item.service.env_var] = item.guest_url
        spec = MachineSpec(
            image=run.image,
            job_dir=job,
            src_dir=REPO,
            disks=tuple(Disk(path, serial) for serial, path in disks.items()),
            tpm_state=run_dir / "tpm",
            guest_forwards=tuple(i.forward for i in running if i.problem is None),
            timeout=settings.timeout,
        )
        for number in (1, 2):
            if number == 2 and not _wants_boot2(job):
                break
            junit = job / f"boot{number}.xml"
            junit.unlink(missing_ok=True)
            (job / "run.sh").write_text(job_script(number, env, settings.pytest_args, junit.name))
            log(f"vm: boot {number} (console: {job / f'console-boot{number}.log'})")
            result = boot(replace(spec, console_name=f"console-boot{number}.log"))
            output = job / f"boot{number}-output.log"
            if (job / "output.log").exists():
                (job / "output.log").replace(output)
            problem = _boot_problem(result, junit, _tail(output))
            cases = tuple(parse_junit(junit, number)) if junit.exists() else ()
            run.boots.append(BootOutcome(number, result, cases, problem))
            log(f"vm: boot {number} done in {result.seconds:.0f} s (job rc {result.job_rc})")
            checks = [c for c in read_disk_checks(job) if c.boot == number]
            all_disks = dict(disks)
            all_disks.update({d.serial: d.path for d in _hotplugged(job)})
            run.checks += run_disk_checks(checks, all_disks)
            if problem is not None:
                break
    finally:
        services.stop(running)
    return run


def _install_go_client(job: Path, log: Log) -> None:
    """containerd's Go ttrpc client (tests/ttrpc_client, static) for the guest tests that play
    kata-agent or cloud-api-adaptor: /mnt/vmjob/cva-ttrpc-client. Without Go on the host those
    tests fail naming it; nothing else needs it."""
    try:
        binary = go_client()
    except (GoClientUnavailable, RuntimeError, OSError) as exc:
        log(f"vm: no Go ttrpc client for the guest tests ({exc})")
        return
    target = job / "cva-ttrpc-client"
    shutil.copy(binary, target)
    target.chmod(0o755)


def _hotplugged(job: Path) -> list[Disk]:
    return [Disk(p, p.stem) for p in sorted((job / "disks").glob("*.img"))]


def _wants_boot2(job: Path) -> bool:
    try:
        return int((job / BOOT2_COUNT_FILE).read_text().strip() or "0") > 0
    except (FileNotFoundError, ValueError):
        return False
