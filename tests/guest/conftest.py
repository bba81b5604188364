"""Fixtures for the tests that run INSIDE the qemu guest (started by `make vm-test`).

The host attaches blank sparse disks with virtio serials cvatest0..N-1 (env CVA_VM_DISKS),
shares the repo read-only at /mnt/vmsrc (cwd) and a job folder read-write at /mnt/vmjob, and
runs this suite twice on the same disks and TPM: boot 1 runs everything not marked `boot2`,
boot 2 (CVA_VM_BOOT=2) runs the tests marked `boot2`.

- `blank_disk` -> Path: an unused blank virtio disk (/dev/disk/by-id/virtio-cvatestN).
- `hotplug_disk(size_bytes)` -> Path: asks the host to hot-plug a new disk (QMP) now.
- `host_never_sees(disk, marker)` / `host_sees(disk, marker)`: the host scans the raw image of
  `disk` (a Path from the fixtures above, or a serial) after this boot powers off; each
  registration is its own host test result.
- `boot_state`: small JSON state handed from boot 1 to boot 2 (`save(name, obj)`, `load(name)`).
- `guest_network`: waits until the guest has its DHCP address (needed before any host service).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from luks.run import run

JOB = Path("/mnt/vmjob")
IN_GUEST = os.environ.get("CVA_IN_GUEST") == "1"
BOOT = int(os.environ.get("CVA_VM_BOOT", "1"))
BY_ID = Path("/dev/disk/by-id")
CLAIMS = JOB / "disk-claims.jsonl"
CHECKS = JOB / "disk-checks.jsonl"
BOOT2_COUNT = JOB / "boot2-count"
HOTPLUG = JOB / "hotplug"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "boot2: runs in the guest's second boot on the same disks (state via boot_state)",
    )
    if IN_GUEST:
        # /mnt/vmsrc is read-only: no example database for hypothesis in the guest
        with contextlib.suppress(ImportError):
            from hypothesis import settings

            settings.register_profile("cva-guest", database=None, deadline=None)
            settings.load_profile("cva-guest")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not IN_GUEST:
        skip = pytest.mark.skip(reason="runs only inside the VM guest (make vm-test)")
        for item in items:
            item.add_marker(skip)
        return
    if BOOT == 1:
        # Seen before -m deselects them: tells the host whether a second boot is needed.
        count = sum(1 for item in items if item.get_closest_marker("boot2"))
        _append_atomic(BOOT2_COUNT, f"{count}\n", replace=True)


def _append_atomic(path: Path, text: str, *, replace: bool = False) -> None:
    if replace:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.rename(path)
        return
    with path.open("a") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _serial_of(disk: Path | str) -> str:
    name = disk.name if isinstance(disk, Path) else disk
    return name.removeprefix("virtio-")


def _claimed() -> set[str]:
    if not CLAIMS.exists():
        return set()
    return {json.loads(line)["serial"] for line in CLAIMS.read_text().splitlines() if line}


def _is_blank(device: Path) -> bool:
    with device.open("rb") as handle:
        return not any(handle.read(1024 * 1024))


@pytest.fixture
def blank_disk(request: pytest.FixtureRequest) -> Path:
    """An attached virtio disk no other test (in either boot) has claimed, all zeros."""
    for serial in os.environ.get("CVA_VM_DISKS", "").split():
        if serial in _claimed():
            continue
        device = BY_ID / f"virtio-{serial}"
        record = {"serial": serial, "test": request.node.nodeid, "boot": BOOT}
        _append_atomic(CLAIMS, json.dumps(record) + "\n")
        if device.exists() and _is_blank(device):
            return device
    pytest.fail("no blank disk left: raise CVA_VM_DISKS on the host (default 6)")


def _wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture
def hotplug_disk() -> Callable[..., Path]:
    """hotplug_disk(size_bytes, serial=None) -> the new /dev/disk/by-id/virtio-SERIAL."""

    def plug(size_bytes: int, serial: str | None = None) -> Path:
        serial = serial or f"hp{uuid.uuid4().hex[:8]}"
        HOTPLUG.mkdir(exist_ok=True)
        _append_atomic(HOTPLUG / f"{serial}.request", f"{int(size_bytes)}\n", replace=True)
        reply = HOTPLUG / f"{serial}.reply"
        if not _wait_for(reply, 60):
            pytest.fail(f"the host did not answer the hot-plug request for {serial}")
        answer = reply.read_text().strip()
        if answer != "ok":
            pytest.fail(f"hot-plug of {serial} refused by the host: {answer}")
        device = BY_ID / f"virtio-{serial}"
        run(["udevadm", "settle", "--timeout=30"], timeout=40)
        if not _wait_for(device, 30):
            pytest.fail(f"{device} did not appear after the hot-plug")
        return device

    return plug


def _register(kind: str, request: pytest.FixtureRequest) -> Callable[[Path | str, bytes], None]:
    def register(disk: Path | str, marker: bytes) -> None:
        if len(marker) < 6:
            raise ValueError("markers shorter than 6 bytes match by chance; use a random one")
        record = {
            "boot": BOOT,
            "kind": kind,
            "serial": _serial_of(disk),
            "marker": marker.hex(),
            "test": request.node.nodeid,
        }
        _append_atomic(CHECKS, json.dumps(record) + "\n")

    return register


@pytest.fixture
def host_never_sees(request: pytest.FixtureRequest) -> Callable[[Path | str, bytes], None]:
    """host_never_sees(disk, marker): after poweroff the host asserts 0 hits in the raw image."""
    return _register("never", request)


@pytest.fixture
def host_sees(request: pytest.FixtureRequest) -> Callable[[Path | str, bytes], None]:
    """host_sees(disk, marker): the control; the host asserts >= 1 hit in the raw image."""
    return _register("always", request)


class BootState:
    """JSON values written in boot 1 and read back in boot 2 (files in /mnt/vmjob/state)."""

    folder = JOB / "state"

    def save(self, name: str, value: Any) -> None:
        self.folder.mkdir(exist_ok=True)
        _append_atomic(self.folder / f"{name}.json", json.dumps(value), replace=True)

    def load(self, name: str) -> Any:
        path = self.folder / f"{name}.json"
        if not path.exists():
            pytest.fail(f"no state {name!r} from boot 1 (did its boot-1 test fail?)")
        return json.loads(path.read_text())


@pytest.fixture(scope="session")
def boot_state() -> BootState:
    return BootState()


@pytest.fixture(scope="session")
def guest_network() -> None:
    """Wait for DHCP on qemu's user network (the job starts before network-online)."""
    run(["/lib/systemd/systemd-networkd-wait-online", "--timeout=60"], timeout=70)
