"""luks.libcryptsetup activation paths with a real device-mapper (inside the qemu guest, root).

Runs only in the guest (CVA_IN_GUEST=1): image files under tmp_path on loop devices, so no
test disk is needed. Checks what the host cannot: activation from a validated in-memory
header copy, the live dm table (cipher, key size, sector size, offset, workqueue flags),
read-only, wrong passphrase creates no mapping, integrity format passes the allow-list,
online resize, deactivate/status.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from luks import libcryptsetup as lc
from luks.header import allow_list_reasons, parse_luks2, read_header_area
from luks.run import run
from luks.secret import Secret
from luks.token import derive_keys, make_token, token_json
from luks.validate import validate_header_copy

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.environ.get("CVA_IN_GUEST") != "1", reason="runs inside the guest"),
]

SECRET = bytes(range(100, 164))
MIB = 1024 * 1024


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(64 * MIB)
    dev = run(["losetup", "--find", "--show", str(img)], timeout=30).text.strip()
    try:
        yield dev, img
    finally:
        run(["losetup", "-d", dev], timeout=30, check=False)


def _make_volume(dev: str, name: str, *, integrity: bool = False) -> Secret:
    passphrase, mac_key = derive_keys(Secret(SECRET), name)
    with lc.CryptDevice.open(dev) as cd:
        cd.format_luks2(integrity=integrity)
        cd.keyslot_add_by_volume_key(passphrase)
        hdr = parse_luks2(read_header_area(dev))
        cd.token_json_set(0, token_json(make_token(hdr, "ready", name, mac_key)))
    return passphrase


def _table(name: str) -> list[str]:
    return run(["dmsetup", "table", name], timeout=30).text.split()


def test_activate_from_validated_copy_and_dm_table(loop: tuple[str, Path]) -> None:
    dev, _ = loop
    passphrase = _make_volume(dev, "guestvol")
    _, mac_key = derive_keys(Secret(SECRET), "guestvol")
    checked = validate_header_copy(
        read_header_area(dev), volume_name="guestvol", mac_key=mac_key, integrity=False
    )
    mapper = "cva-test-guestvol"
    with lc.header_copy(checked.area) as path, lc.CryptDevice.open(dev, header=path) as cd:
        cd.load()
        cd.activate_by_passphrase(mapper, passphrase)
        try:
            assert lc.active_status(mapper) in {"active", "busy"}
            table = _table(mapper)
            # start len crypt cipher key iv_offset device offset [#opts opts...]
            assert table[2] == "crypt" and table[3] == "aes-xts-plain64"
            assert table[7] == str(16 * MIB // 512)
            assert "sector_size:4096" in table
            assert "no_read_workqueue" in table and "no_write_workqueue" in table
            key = table[4]
            assert key.startswith(":64:") or len(key) == 128  # keyring ref or 64-byte hex
            marker = b"cva-guest-plaintext-marker" * 100
            with open(f"/dev/mapper/{mapper}", "r+b") as f:
                f.write(marker.ljust(4096, b"\0"))
                f.flush()
                os.fsync(f.fileno())
            with open(dev, "rb") as raw:
                assert b"cva-guest-plaintext-marker" not in raw.read(32 * MIB)
        finally:
            cd.deactivate(mapper)
    assert lc.active_status(mapper) == "inactive"


def test_wrong_passphrase_creates_no_mapping(loop: tuple[str, Path]) -> None:
    dev, _ = loop
    _make_volume(dev, "wrongpw")
    area = read_header_area(dev)
    with lc.header_copy(area) as path, lc.CryptDevice.open(dev, header=path) as cd:
        cd.load()
        with pytest.raises(lc.WrongPassphrase):
            cd.activate_by_passphrase("cva-test-wrongpw", Secret(b"x" * 32))
    assert lc.active_status("cva-test-wrongpw") == "inactive"
    assert read_header_area(dev) == area


def test_read_only_activation(loop: tuple[str, Path]) -> None:
    dev, _ = loop
    passphrase = _make_volume(dev, "rovol")
    with lc.CryptDevice.open(dev) as cd:
        cd.load()
        cd.activate_by_passphrase("cva-test-rovol", passphrase, read_only=True)
        try:
            # Linux 6.12 lets a read-only dm device be opened for writing; the kernel's
            # read-only flag is what refuses the writes, so check that flag.
            ro = run(["blockdev", "--getro", "/dev/mapper/cva-test-rovol"], timeout=30)
            assert ro.text.strip() == "1"
        finally:
            lc.deactivate_by_name("cva-test-rovol")


def test_integrity_format_is_in_profile(loop: tuple[str, Path]) -> None:
    dev, _ = loop
    passphrase = _make_volume(dev, "integ", integrity=True)
    hdr = parse_luks2(read_header_area(dev))
    assert allow_list_reasons(hdr, integrity=True) == []
    with lc.header_copy(read_header_area(dev)) as path, lc.CryptDevice.open(dev, header=path) as cd:
        cd.load()
        cd.activate_by_passphrase("cva-test-integ", passphrase)
        try:
            assert lc.active_status("cva-test-integ") in {"active", "busy"}
        finally:
            cd.deactivate("cva-test-integ")


def test_online_resize(loop: tuple[str, Path]) -> None:
    dev, img = loop
    passphrase = _make_volume(dev, "grow")
    mapper = "cva-test-grow"
    with lc.CryptDevice.open(dev) as cd:
        cd.load()
        cd.activate_by_passphrase(mapper, passphrase)
        try:
            before = int(_table(mapper)[1])
            with img.open("r+b") as f:
                f.truncate(128 * MIB)
            run(["losetup", "--set-capacity", dev], timeout=30)
            cd.activate_by_passphrase(None, passphrase, keyring=True)
            cd.resize(mapper, 0)
            assert int(_table(mapper)[1]) == before + 64 * MIB // 512
        finally:
            cd.deactivate(mapper)
