"""Day-2 operations inside the qemu guest (root, real dm-crypt/LVM/ext4/xfs), issue 26.

Recovery without cva: a volume cva made opens with the plain `cryptsetup` CLI and the passphrase
`cva luks passphrase` derives from the KBS secret alone (the README's runbook, step by step:
read-only open first, read-only mount, then a read-write open).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from luks.run import run
from tests.guest.storage_support import (
    MIB,
    SECRET,
    WRONG_SECRET,
    Env,
    loop_disk,
    make_volume,
    read_marker,
    unique,
    write_marker,
)

if os.environ.get("CVA_IN_GUEST") != "1":  # before any guest-only mark is looked up
    pytest.skip("runs inside the qemu guest (make vm-test)", allow_module_level=True)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.environ.get("CVA_IN_GUEST") != "1", reason="runs inside the guest"),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path / "cva")


def _cva(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("lvm", "filesystem"), [(False, "ext4"), (True, "xfs")], ids=["disk-ext4", "lvm-xfs"]
)
def test_recovery_with_plain_cryptsetup(
    env: Env, tmp_path: Path, lvm: bool, filesystem: str
) -> None:
    name = unique("rec")
    marker = f"cva-recovery-{name}-".encode()
    vg = f"vg{name.replace('-', '')}"
    with loop_disk(tmp_path, 512 * MIB) as dev:
        vol = make_volume(name, lvm=(vg, "data", 400 * MIB) if lvm else None, filesystem=filesystem)
        write_marker(env.prepare(vol, dev), marker)
        env.release(vol, dev)
        if lvm:  # cva leaves the LV active; the runbook activates it (harmless when active)
            run(["vgchange", "-ay", vg], timeout=60)
        target = Path(f"/dev/{vg}/data") if lvm else dev

        # the operator's copy of the KBS resource (exact bytes) -> the passphrase file
        secret_file = tmp_path / "kbs-resource.bin"
        secret_file.write_bytes(SECRET)
        key_file = tmp_path / "passphrase"
        made = _cva(
            "luks", "passphrase", "--secret-file", str(secret_file), "--volume", name,
            "--output", str(key_file),
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert key_file.stat().st_mode & 0o777 == 0o600

        # a wrong secret's passphrase is refused by the keyslot, the volume untouched
        wrong = _cva("luks", "passphrase", "--secret-file", "-", "--volume", name,
                     stdin=WRONG_SECRET)  # fmt: skip
        refused = subprocess.run(
            ["cryptsetup", "open", "--readonly", "--key-file", "-", str(target), "recx"],
            input=wrong.stdout, capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert refused.returncode != 0

        mapper = f"recovery-{name}"
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        ro_opts = "ro,noload" if filesystem == "ext4" else "ro,norecovery"
        run(["cryptsetup", "open", "--readonly", "--key-file", str(key_file), str(target),
             mapper], timeout=120)  # fmt: skip
        try:
            run(["mount", "-o", ro_opts, f"/dev/mapper/{mapper}", str(mnt)], timeout=60)
            try:
                assert (mnt / "marker").read_bytes() == marker * 64
            finally:
                run(["umount", str(mnt)], timeout=60)
        finally:
            run(["cryptsetup", "close", mapper], timeout=60)

        # then read-write, through stdin (the pipe form of the runbook)
        piped = _cva("luks", "passphrase", "--secret-file", "-", "--volume", name, stdin=SECRET)
        run(["cryptsetup", "open", "--key-file", "-", str(target), mapper],
            stdin=piped.stdout, timeout=120)  # fmt: skip
        try:
            run(["mount", f"/dev/mapper/{mapper}", str(mnt)], timeout=60)
            try:
                (mnt / "recovered").write_bytes(b"written-by-hand")
            finally:
                run(["umount", str(mnt)], timeout=60)
        finally:
            run(["cryptsetup", "close", mapper], timeout=60)

        # cva still opens the volume afterwards (a hand open does not touch the header)
        p = env.prepare(replace(vol, create=False), dev)
        try:
            assert read_marker(p) == marker * 64
            assert (p.guest_path / "recovered").read_bytes() == b"written-by-hand"
        finally:
            env.release(vol, dev)
