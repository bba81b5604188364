"""Helpers for the storage guest tests (inside the qemu guest, as root).

Disks are either the harness' blank virtio disks (`blank_disk` fixture) or sparse image files
on loop devices, so each test gets fresh, independent disks. Crash windows are exercised by
running `prepare_volume` in a child process (`python -m tests.guest.storage_child`) that
SIGKILLs itself at the named window; the test then reruns the prepare in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

from agent import contract
from luks import volume
from luks.run import run
from luks.secret import Secret

MIB = 1 << 20
SECRET = bytes(range(7, 71))  # the "KBS resource" of these tests (64 bytes)
WRONG_SECRET = bytes(range(100, 164))


def make_volume(
    name: str,
    *,
    lvm: tuple[str, str, int | None] | None = None,
    filesystem: str = "ext4",
    create: bool = True,
    integrity: bool = False,
    read_only: bool = False,
) -> contract.Volume:
    """A contract Volume (built directly; the contract parser is tested elsewhere)."""
    return contract.Volume(
        name=name,
        key=contract.KbsResourceUri("default", name, "luks"),
        disk=contract.DiskRef("serial", "unused"),
        lvm=contract.LvmSpec(vg=lvm[0], lv=lvm[1], size_bytes=lvm[2]) if lvm else None,
        filesystem=filesystem,  # type: ignore[arg-type]
        mount="/data",
        containers=(),
        create=create,
        integrity=integrity,
        read_only=read_only,
    )


def with_size(vol: contract.Volume, size_bytes: int) -> contract.Volume:
    assert vol.lvm is not None
    return replace(vol, lvm=replace(vol.lvm, size_bytes=size_bytes))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def resize_loop(dev: Path, size: int) -> None:
    """The host enlarges (or shrinks) the disk: its image file, then `losetup -c`, which makes
    the kernel send a block `change` uevent with RESIZE=1, as virtio-blk does on a resize."""
    back = run(["losetup", "--noheadings", "-O", "BACK-FILE", str(dev)], timeout=30).text.strip()
    os.truncate(back, size)
    run(["losetup", "-c", str(dev)], timeout=30)


@contextmanager
def loop_disk(directory: Path, size: int) -> Iterator[Path]:
    img = directory / f"{uuid.uuid4().hex}.img"
    with img.open("wb") as f:
        f.truncate(size)
    dev = run(["losetup", "--find", "--show", str(img)], timeout=30).text.strip()
    try:
        yield Path(dev)
    finally:
        run(["losetup", "-d", dev], timeout=30, check=False)
        with suppress(FileNotFoundError):
            img.unlink()


class Env:
    """Where a test's volumes are mounted and locked."""

    def __init__(self, base: Path) -> None:
        self.mount_base = base / "volumes"
        self.runtime_dir = base / "run"

    def prepare(
        self, vol: contract.Volume, disk: Path, secret: bytes = SECRET
    ) -> volume.PreparedVolume:
        return volume.prepare_volume(
            vol,
            Secret(bytearray(secret)),
            disk=disk,
            runtime_dir=self.runtime_dir,
            mount_base=self.mount_base,
        )

    def release(self, vol: contract.Volume, disk: Path) -> None:
        volume.release_volume(
            vol, disk=disk, mount_base=self.mount_base, runtime_dir=self.runtime_dir
        )

    def prepare_in_child(
        self, vol: contract.Volume, disk: Path, crash_at: str | None, *, grow: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        """Run prepare (`grow`: the online grow of the mounted volume) in a child that SIGKILLs
        itself at window `crash_at`."""
        spec = {
            "volume": volume_to_json(vol),
            "disk": str(disk),
            "runtime_dir": str(self.runtime_dir),
            "mount_base": str(self.mount_base),
            "crash_at": crash_at,
            "grow": grow,
        }
        env = dict(os.environ)
        env["CVA_TEST_PREPARE_SPEC"] = json.dumps(spec)  # no secret in here
        return subprocess.run(
            [sys.executable, "-m", "tests.guest.storage_child"],
            input=SECRET.hex().encode(),  # the secret goes through stdin
            capture_output=True,
            env=env,
            timeout=600,
            check=False,
        )


def volume_to_json(vol: contract.Volume) -> dict[str, object]:
    return {
        "name": vol.name,
        "lvm": [vol.lvm.vg, vol.lvm.lv, vol.lvm.size_bytes] if vol.lvm else None,
        "filesystem": vol.filesystem,
        "create": vol.create,
        "integrity": vol.integrity,
        "read_only": vol.read_only,
    }


def volume_from_json(doc: dict[str, object]) -> contract.Volume:
    lvm = doc["lvm"]
    return make_volume(
        str(doc["name"]),
        lvm=(str(lvm[0]), str(lvm[1]), None if lvm[2] is None else int(lvm[2]))
        if isinstance(lvm, list)
        else None,
        filesystem=str(doc["filesystem"]),
        create=bool(doc["create"]),
        integrity=bool(doc["integrity"]),
        read_only=bool(doc["read_only"]),
    )


def write_marker(prepared: volume.PreparedVolume, marker: bytes, name: str = "marker") -> None:
    path = prepared.guest_path / name
    with path.open("wb") as f:
        f.write(marker * 64)
        f.flush()
        os.fsync(f.fileno())


def read_marker(prepared: volume.PreparedVolume, name: str = "marker") -> bytes:
    return (prepared.guest_path / name).read_bytes()


def raw_contains(device: Path, needle: bytes) -> bool:
    """Scan the raw device for `needle` (after dropping caches)."""
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    with device.open("rb") as f:
        tail = b""
        while True:
            chunk = f.read(4 * MIB)
            if not chunk:
                return False
            if needle in tail + chunk:
                return True
            tail = chunk[-len(needle) :]


def dm_table(mapper: str) -> list[str]:
    return run(["dmsetup", "table", mapper], timeout=30).text.split()


def aead_lines() -> list[str]:
    """The kernel log's "INTEGRITY AEAD ERROR" lines so far (after udev settled)."""
    run(["udevadm", "settle", "--timeout=30"], timeout=60, check=False)
    return [line for line in run(["dmesg"], timeout=30).text.splitlines() if "AEAD ERROR" in line]


@contextmanager
def no_new_aead_lines() -> Iterator[None]:
    """Fail when the block logs an "INTEGRITY AEAD ERROR": cva's own paths never read a block
    nothing wrote, so such a line must mean tampering and nothing else."""
    before = len(aead_lines())
    yield
    new = aead_lines()[before:]
    sectors = sorted({line.rsplit("sector", 1)[-1].strip() for line in new})
    assert not new, f"{len(new)} INTEGRITY AEAD ERROR lines in the kernel log (sectors {sectors})"
