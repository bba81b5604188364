"""Host-only checks of the VM harness's pure parts (no qemu needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.vm.build import (
    REPO,
    GuestImage,
    base_key,
    guest_test_packages,
    product_files,
    recipe_key,
)
from tests.vm.machine import Disk, GuestForward, HostForward, Machine, MachineSpec
from tests.vm.rawscan import CHUNK, count_markers
from tests.vm.suite import DiskCheck, job_script, parse_junit, run_disk_checks

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.guest.test_harness" name="test_ok" time="0.5"/>
<testcase classname="tests.guest.test_harness" name="test_bad[x]" time="1.0">
  <failure message="assert 1 == 2">long text</failure></testcase>
<testcase classname="tests.guest.test_harness" name="test_skip" time="0">
  <skipped message="no kbs">skip</skipped></testcase>
<testcase classname="tests.guest.test_harness" name="test_err" time="0">
  <error message="fixture exploded">tb</error></testcase>
</testsuite></testsuites>
"""


def test_junit_cases_keep_their_outcome_and_message(tmp_path: Path) -> None:
    path = tmp_path / "j.xml"
    path.write_text(JUNIT)
    cases = {c.nodeid: c for c in parse_junit(path, 1)}
    base = "tests/guest/test_harness.py::"
    assert cases[base + "test_ok"].outcome == "passed"
    assert cases[base + "test_bad[x]"].outcome == "failed"
    assert "assert 1 == 2" in cases[base + "test_bad[x]"].message
    assert cases[base + "test_skip"].outcome == "skipped"
    assert cases[base + "test_err"].outcome == "failed"
    assert "[error]" in cases[base + "test_err"].message


def test_markers_found_across_chunks_and_holes(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    marker, absent = b"CVA-MARKER-123456", b"CVA-ABSENT-654321"
    with image.open("wb") as handle:
        handle.truncate(4 * CHUNK)
        handle.seek(CHUNK - 5)  # spans the first chunk boundary
        handle.write(marker)
        handle.seek(3 * CHUNK + 100)  # after a hole
        handle.write(marker + marker)
    counts = count_markers(image, [marker, absent])
    assert counts == {marker: 3, absent: 0}


def test_disk_checks_never_and_always(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"\0" * 100 + b"CONTROL-0123" + b"\0" * 100)
    checks = [
        DiskCheck(1, "never", "d0", b"SECRET-0123", "t"),
        DiskCheck(1, "always", "d0", b"CONTROL-0123", "t", 1),
        DiskCheck(1, "never", "nope", b"SECRET-0123", "t", 2),
    ]
    results = run_disk_checks(checks, {"d0": image})
    by_serial = {(r.check.serial, r.check.kind): r for r in results}
    assert by_serial[("d0", "never")].ok
    assert by_serial[("d0", "always")].ok
    assert not by_serial[("nope", "never")].ok
    assert "no host image" in by_serial[("nope", "never")].message


def test_job_script_selects_the_boot_and_quotes_env() -> None:
    script = job_script(2, {"CVA_TEST_KBS_URL": "http://10.0.2.100:8001"}, ("-x",), "boot2.xml")
    assert "export CVA_VM_BOOT=2" in script
    assert "-m boot2" in script
    assert "--junitxml=/mnt/vmjob/boot2.xml" in script
    assert "export CVA_TEST_KBS_URL=http://10.0.2.100:8001" in script
    assert "not boot2" in job_script(1, {}, (), "boot1.xml")


def test_qemu_command_line_keeps_the_network_closed(tmp_path: Path) -> None:
    spec = MachineSpec(
        image=GuestImage(tmp_path, "k"),
        job_dir=tmp_path / "job",
        disks=(Disk(tmp_path / "a.img", "cvatest0"),),
        guest_forwards=(GuestForward("10.0.2.100", 8001, 40000),),
        host_forwards=(HostForward(40001, 8080),),
    )
    argv = Machine(spec).qemu_argv(None)
    netdev = argv[argv.index("-netdev") + 1]
    assert "restrict=on" in netdev
    assert "hostfwd=tcp:127.0.0.1:40001-:8080" in netdev
    assert "guestfwd=tcp:10.0.2.100:8001-cmd:socat -lf /dev/null - TCP:127.0.0.1:40000" in netdev
    assert "virtio-blk-pci,drive=disk0,serial=cvatest0" in argv
    assert any("snapshot=on" in a for a in argv)
    assert "-accel" in argv
    assert argv[argv.index("-accel") + 1] == "tcg"


def test_recipe_key_is_stable_and_covers_the_product(tmp_path: Path) -> None:
    assert recipe_key() == recipe_key()
    assert {n.lower() for n in guest_test_packages()} >= {"pytest", "hypothesis"}
    names = {str(p.relative_to(REPO)) for p in product_files()}
    # what the wheel and image/install.sh are made of; README.md only feeds the wheel's text
    assert {"agent/daemon.py", "luks/disk.py", "evidence/tpm.py", "pyproject.toml", "LICENSE",
            "image/install.sh", "image/dist.py", "systemd/cva.service"} <= names  # fmt: skip
    assert "README.md" not in names
    # a copy of the repo's key inputs keys the same; changing one product file changes only
    # the image key, not the base tree's
    for name in ("constraints.txt", *names):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    assert (base_key(tmp_path), recipe_key(tmp_path)) == (base_key(), recipe_key())
    with (tmp_path / "agent" / "daemon.py").open("a") as handle:
        handle.write("# changed\n")
    assert base_key(tmp_path) == base_key() and recipe_key(tmp_path) != recipe_key()
    (tmp_path / "image" / "install.sh").chmod(0o644)  # the mode counts too
    (tmp_path / "agent" / "daemon.py").write_bytes((REPO / "agent" / "daemon.py").read_bytes())
    assert recipe_key(tmp_path) != recipe_key()


def test_vm_suite_boots_only_when_vm_tests_are_selected() -> None:
    from types import SimpleNamespace

    from tests.vm.conftest import _vm_selected

    def config(expr: str) -> object:
        return SimpleNamespace(option=SimpleNamespace(markexpr=expr))

    assert _vm_selected(config(""))  # type: ignore[arg-type]
    assert _vm_selected(config("vm"))  # type: ignore[arg-type]
    assert _vm_selected(config("vm and not slow"))  # type: ignore[arg-type]
    assert not _vm_selected(config("not vm"))  # type: ignore[arg-type]
    assert not _vm_selected(config("swtpm"))  # type: ignore[arg-type]


def test_a_boot_that_never_began_its_job_is_retryable(tmp_path: Path) -> None:
    from tests.vm.machine import BEGIN_MARK, job_began, keep_failed_console

    console = tmp_path / "console.log"
    assert not job_began(console)  # no console at all
    assert keep_failed_console(console, 1) is None
    console.write_text("[    2.689604] Kernel panic - not syncing: Fatal exception in interrupt\n")
    assert not job_began(console)
    kept = keep_failed_console(console, 1)
    assert kept == tmp_path / "console.log.attempt1"
    assert "Kernel panic" in kept.read_text()
    assert not console.exists()
    console.write_text(f"{BEGIN_MARK} uptime=14.2\nsomething later failed\n")
    assert job_began(console)  # the job ran: never boot it again
