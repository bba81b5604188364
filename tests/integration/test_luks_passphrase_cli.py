"""`cva luks passphrase`: the recovery passphrase is exactly the one cva's keyslot uses (the plain
`cryptsetup` CLI unlocks a header made the way luks.volume makes it), and the command never lets
the secret or the passphrase reach a terminal, an existing file, a symlink target or stderr."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.cli.luks import MAX_SECRET_FILE_BYTES
from agent.kbs.client import MAX_RESOURCE_BYTES
from luks import libcryptsetup as lc
from luks.secret import Secret
from luks.token import derive_keys
from tests.conftest import REPO, run_cva

SECRET = bytes(range(0x40, 0x40 + 48))  # 48 printable "random" bytes: a marker stderr must not show


def _secret_file(tmp_path: Path, data: bytes = SECRET) -> Path:
    path = tmp_path / "kbs-resource.bin"
    path.write_bytes(data)
    return path


def _no_secret_in(text: bytes) -> None:
    expected, _ = derive_keys(Secret(SECRET), "pgdata")
    for marker in (SECRET, bytes(expected.data)):
        assert marker not in text
        assert marker.hex().encode() not in text


def test_stdout_is_the_derived_passphrase(tmp_path: Path) -> None:
    proc = run_cva(
        "luks", "passphrase", "--secret-file", str(_secret_file(tmp_path)), "--volume", "pgdata"
    )
    assert proc.returncode == 0, proc.stderr
    passphrase, _ = derive_keys(Secret(SECRET), "pgdata")
    assert proc.stdout == bytes(passphrase.data) and len(proc.stdout) == 32
    # pinned independently of luks.token: HKDF-SHA256, no salt, the documented label
    kdf = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"cva/v1/luks-passphrase/pgdata"
    )
    assert proc.stdout == kdf.derive(SECRET)
    assert proc.stderr == b""


def test_stdin_secret_and_per_volume_passphrases(tmp_path: Path) -> None:
    a = run_cva("luks", "passphrase", "--secret-file", "-", "--volume", "pgdata", input=SECRET)
    b = run_cva("luks", "passphrase", "--secret-file", "-", "--volume", "logs", input=SECRET)
    assert a.returncode == b.returncode == 0
    assert a.stdout != b.stdout and len(b.stdout) == 32


def test_output_file_is_new_and_private(tmp_path: Path) -> None:
    out = tmp_path / "pp"
    args = (
        "luks",
        "passphrase",
        "--secret-file",
        str(_secret_file(tmp_path)),
        "--volume",
        "pgdata",
    )
    proc = run_cva(*args, "--output", str(out))
    assert proc.returncode == 0 and proc.stdout == b"", proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600 and out.stat().st_size == 32
    again = run_cva(*args, "--output", str(out))  # never overwrites
    assert again.returncode == 2 and b"File exists" in again.stderr
    target = tmp_path / "elsewhere"
    link = tmp_path / "link"
    link.symlink_to(target)
    via_link = run_cva(*args, "--output", str(link))
    assert via_link.returncode == 2 and not target.exists()
    _no_secret_in(again.stderr + via_link.stderr)


@pytest.mark.parametrize(
    ("data", "volume", "needle"),
    [
        (SECRET[:31], "pgdata", b"at least 32 random bytes"),
        (b"\x01" * (1024 * 1024 + 1), "pgdata", b"not a key resource"),
        (SECRET, "Bad/Name", b"is not [a-z0-9]"),
        (SECRET, "../etc", b"is not [a-z0-9]"),
    ],
)
def test_refusals_name_the_cause_and_leak_nothing(
    tmp_path: Path, data: bytes, volume: str, needle: bytes
) -> None:
    proc = run_cva(
        "luks", "passphrase", "--secret-file", str(_secret_file(tmp_path, data)), "--volume", volume
    )
    assert proc.returncode == 2 and proc.stdout == b""
    assert needle in proc.stderr and proc.stderr.count(b"\n") == 1
    _no_secret_in(proc.stderr)


def test_missing_secret_file(tmp_path: Path) -> None:
    proc = run_cva(
        "luks", "passphrase", "--secret-file", str(tmp_path / "nope"), "--volume", "pgdata"
    )
    assert proc.returncode == 2 and b"No such file" in proc.stderr


def test_refuses_a_terminal(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "luks",
                "passphrase",
                "--secret-file",
                str(_secret_file(tmp_path)),
                "--volume",
                "pgdata",
            ],
            stdout=secondary,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
            timeout=60,
            check=False,
        )
        os.set_blocking(primary, False)
        try:
            shown = os.read(primary, 4096)
        except BlockingIOError:
            shown = b""
    finally:
        os.close(primary)
        os.close(secondary)
    assert proc.returncode == 2 and b"terminal" in proc.stderr
    assert shown == b""


try:
    lc._library()
    HAVE_LIB = True
except lc.CryptError:
    HAVE_LIB = False


@pytest.mark.skipif(not HAVE_LIB or shutil.which("cryptsetup") is None, reason="no cryptsetup")
def test_plain_cryptsetup_accepts_it_as_key_file(tmp_path: Path) -> None:
    """A keyslot made as luks.volume makes it (libcryptsetup, the derived passphrase) opens with
    `cryptsetup --key-file` and the command's output (no device-mapper: --test-passphrase)."""
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    passphrase, mac_key = derive_keys(Secret(SECRET), "pgdata")
    mac_key.wipe()
    with lc.CryptDevice.open(str(img)) as cd:
        cd.format_luks2(integrity=False)
        assert cd.keyslot_add_by_volume_key(passphrase, keyslot=0) == 0
    out = tmp_path / "pp"
    proc = run_cva(
        "luks",
        "passphrase",
        "--secret-file",
        str(_secret_file(tmp_path)),
        "--volume",
        "pgdata",
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    ok = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", str(out), str(img)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    wrong = run_cva("luks", "passphrase", "--secret-file", "-", "--volume", "other", input=SECRET)
    bad = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(img)],
        input=wrong.stdout,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode != 0


def test_reads_what_the_kbs_client_could_have_been_given() -> None:
    assert MAX_SECRET_FILE_BYTES == MAX_RESOURCE_BYTES
