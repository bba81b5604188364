"""Proof that the VM harness gives later tests a real kernel: dm-crypt, LVM, file systems, a
TPM, the host loopback network, hot-plug, and persistence across a second boot."""

from __future__ import annotations

import os
import platform
import secrets
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from luks.run import run
from tests.guest.conftest import BootState

LUKS_FAST = ["--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
Register = Callable[[Path | str, bytes], None]


def _marker(kind: str) -> bytes:
    return f"CVA-{kind}-{secrets.token_hex(12)}".encode()


def _write_repeated(path: Path, marker: bytes, copies: int = 200) -> None:
    path.write_bytes((marker + b"\n") * copies)
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def test_guest_environment() -> None:
    assert os.environ["CVA_IN_GUEST"] == "1"
    assert platform.release().startswith("6.12"), platform.release()
    assert Path("/mnt/vmsrc/pyproject.toml").is_file()
    with pytest.raises(OSError):
        Path("/mnt/vmsrc/.write-probe").write_text("x")  # the repo share is read-only
    assert Path("/sys/kernel/config").is_dir()
    run(["modprobe", "dm_crypt"], timeout=30)
    assert "crypt" in run(["dmsetup", "targets"], timeout=30).text


def test_luks2_on_lvm_hides_plaintext_from_host(
    blank_disk: Path, host_never_sees: Register, host_sees: Register, boot_state: BootState
) -> None:
    vg = f"cvavg{secrets.token_hex(3)}"
    key = secrets.token_bytes(64)
    secret, control = _marker("SECRET"), _marker("CONTROL")
    host_never_sees(blank_disk, secret)
    host_sees(blank_disk, control)
    host_sees(blank_disk, b"LUKS\xba\xbe")  # the LUKS2 header is there, in the clear

    run(["pvcreate", "-y", str(blank_disk)], timeout=60)
    run(["vgcreate", vg, str(blank_disk)], timeout=60)
    run(["lvcreate", "-y", "-n", "sealed", "-L", "64M", vg], timeout=60)
    run(["lvcreate", "-y", "-n", "plain", "-L", "16M", vg], timeout=60)
    sealed = f"/dev/{vg}/sealed"

    run(["cryptsetup", "luksFormat", "--batch-mode", *LUKS_FAST, "--key-file", "-", sealed],
        stdin=key, timeout=120)  # fmt: skip
    assert run(["cryptsetup", "isLuks", "--type", "luks2", sealed], timeout=30).returncode == 0
    mapper = f"{vg}-open"
    run(["cryptsetup", "open", "--key-file", "-", sealed, mapper], stdin=key, timeout=120)
    mnt = Path(f"/run/{vg}")
    mnt.mkdir()
    try:
        run(["mkfs.ext4", "-q", f"/dev/mapper/{mapper}"], timeout=120)
        run(["mount", f"/dev/mapper/{mapper}", str(mnt)], timeout=60)
        _write_repeated(mnt / "secret.txt", secret)
        run(["umount", str(mnt)], timeout=60)
        run(["cryptsetup", "close", mapper], timeout=60)

        # reopen: the data survived the close
        run(["cryptsetup", "open", "--key-file", "-", sealed, mapper], stdin=key, timeout=120)
        run(["mount", f"/dev/mapper/{mapper}", str(mnt)], timeout=60)
        assert (mnt / "secret.txt").read_bytes().count(secret) == 200
        run(["umount", str(mnt)], timeout=60)
        run(["cryptsetup", "close", mapper], timeout=60)

        # the control: the same kind of marker on an unencrypted LV (xfs needs >= 300M; ext4)
        run(["mkfs.ext4", "-q", f"/dev/{vg}/plain"], timeout=120)
        run(["mount", f"/dev/{vg}/plain", str(mnt)], timeout=60)
        _write_repeated(mnt / "control.txt", control)
        run(["umount", str(mnt)], timeout=60)
    finally:
        run(["umount", str(mnt)], timeout=60, check=False)
        run(["cryptsetup", "close", mapper], timeout=60, check=False)
        mnt.rmdir()
    run(["vgchange", "-an", vg], timeout=60)
    run(["sync"], timeout=60)
    boot_state.save(
        "luks_lvm",
        {"vg": vg, "key": key.hex(), "secret": secret.decode(), "disk": str(blank_disk)},
    )


@pytest.mark.boot2
def test_luks_volume_persists_across_reboot(boot_state: BootState) -> None:
    state = boot_state.load("luks_lvm")
    vg, key = state["vg"], bytes.fromhex(state["key"])
    assert Path(state["disk"]).exists()
    run(["vgchange", "-ay", vg], timeout=60)
    mapper = f"{vg}-again"
    mnt = Path(f"/run/{vg}")
    mnt.mkdir()
    try:
        run(["cryptsetup", "open", "--key-file", "-", f"/dev/{vg}/sealed", mapper],
            stdin=key, timeout=120)  # fmt: skip
        run(["mount", "-o", "ro", f"/dev/mapper/{mapper}", str(mnt)], timeout=60)
        assert (mnt / "secret.txt").read_bytes().count(state["secret"].encode()) == 200
    finally:
        run(["umount", str(mnt)], timeout=60, check=False)
        run(["cryptsetup", "close", mapper], timeout=60, check=False)
        run(["vgchange", "-an", vg], timeout=60, check=False)


def test_xfs_on_lvm(blank_disk: Path) -> None:
    vg = f"cvaxfs{secrets.token_hex(3)}"
    run(["vgcreate", vg, str(blank_disk)], timeout=60)
    run(["lvcreate", "-y", "-n", "data", "-L", "320M", vg], timeout=60)
    run(["mkfs.xfs", "-q", f"/dev/{vg}/data"], timeout=120)
    mnt = Path(f"/run/{vg}")
    mnt.mkdir()
    try:
        run(["mount", f"/dev/{vg}/data", str(mnt)], timeout=60)
        (mnt / "probe").write_text("xfs")
        assert (mnt / "probe").read_text() == "xfs"
    finally:
        run(["umount", str(mnt)], timeout=60, check=False)
        run(["vgchange", "-an", vg], timeout=60, check=False)


def test_tpm_answers() -> None:
    assert Path("/dev/tpm0").exists()
    assert Path("/dev/tpmrm0").exists()
    out = run(["tpm2_getrandom", "--hex", "16"], timeout=60,
              env={"TPM2TOOLS_TCTI": "device:/dev/tpmrm0"}).text  # fmt: skip
    assert len(out.strip()) == 32
    int(out.strip(), 16)


def test_tpm2_pytss_in_guest_venv() -> None:
    from tpm2_pytss import ESAPI

    with ESAPI("device:/dev/tpmrm0") as esapi:
        assert len(bytes(esapi.get_random(8))) == 8


def test_guest_reaches_host_loopback_service(guest_network: None) -> None:
    url = os.environ.get("CVA_TEST_ECHO_URL")
    assert url, "the host did not start the echo service"
    for attempt in range(2):  # one socat per connection: a second connection works too
        with urllib.request.urlopen(f"{url}/hello/{attempt}", timeout=30) as response:
            assert response.read() == f"cva-vm-echo /hello/{attempt}".encode()


def test_guest_network_is_restricted(guest_network: None) -> None:
    # restrict=on: nothing leaves qemu except the explicit forwards
    with pytest.raises(OSError), socket.create_connection(("10.0.2.2", 22), timeout=5):
        pass


def test_hotplugged_disk_appears(hotplug_disk: Callable[..., Path]) -> None:
    device = hotplug_disk(64 * 1024 * 1024)
    size = int(run(["blockdev", "--getsize64", str(device)], timeout=30).text)
    assert size == 64 * 1024 * 1024
