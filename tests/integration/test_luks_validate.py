"""luks.validate: DESIGN §6 steps 1-3 on real headers, activation (verify-only) from the copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from luks import libcryptsetup as lc
from luks.header import parse_luks2, read_header_area
from luks.secret import Secret
from luks.token import TokenError, derive_keys, make_token, token_json
from luks.validate import HeaderRefused, validate_header_copy
from tests.luks_headers import luks2_area, mutated, write_image

try:
    lc._library()
except lc.CryptError:
    pytest.skip("libcryptsetup.so.12 not installed", allow_module_level=True)


def _volume(tmp_path: Path, name: str, secret: bytes, state: str = "ready") -> str:
    img = tmp_path / f"{name}.img"
    with img.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    passphrase, mac_key = derive_keys(Secret(secret), name)
    with lc.CryptDevice.open(str(img)) as cd:
        cd.format_luks2(integrity=False)
        cd.keyslot_add_by_volume_key(passphrase)
        hdr = parse_luks2(read_header_area(str(img)))
        cd.token_json_set(0, token_json(make_token(hdr, state, name, mac_key)))
    return str(img)


def test_validated_copy_opens(tmp_path: Path) -> None:
    secret = bytes(range(50))
    img = _volume(tmp_path, "pgdata", secret, "initializing")
    passphrase, mac_key = derive_keys(Secret(secret), "pgdata")
    checked = validate_header_copy(
        read_header_area(img), volume_name="pgdata", mac_key=mac_key, integrity=False
    )
    assert checked.state == "initializing"
    with lc.header_copy(checked.area) as path, lc.CryptDevice.open(img, header=path) as cd:
        cd.load()
        assert cd.activate_by_passphrase(None, passphrase) == 0


def test_header_swapped_after_copy_has_no_effect(tmp_path: Path) -> None:
    """The host swaps the on-disk header after cva copied it: the checked copy is used."""
    secret = bytes(range(50))
    img = _volume(tmp_path, "pgdata", secret)
    hostile = _volume(tmp_path, "other", b"\x07" * 32)
    passphrase, mac_key = derive_keys(Secret(secret), "pgdata")
    checked = validate_header_copy(
        read_header_area(img), volume_name="pgdata", mac_key=mac_key, integrity=False
    )
    swapped = Path(hostile).read_bytes()[: 16 * 1024 * 1024]
    with Path(img).open("r+b") as f:
        f.write(swapped)
    with lc.header_copy(checked.area) as path, lc.CryptDevice.open(img, header=path) as cd:
        cd.load()
        assert cd.uuid == checked.header.uuid
        assert cd.activate_by_passphrase(None, passphrase) == 0
    # and the swapped header itself is refused on the next open
    with pytest.raises(TokenError):
        validate_header_copy(
            read_header_area(img), volume_name="pgdata", mac_key=mac_key, integrity=False
        )


def test_other_volumes_key_refused(tmp_path: Path) -> None:
    img = _volume(tmp_path, "pgdata", bytes(range(50)))
    _, wrong_mac = derive_keys(Secret(b"\x09" * 32), "pgdata")
    with pytest.raises(TokenError, match="MAC"):
        validate_header_copy(
            read_header_area(img), volume_name="pgdata", mac_key=wrong_mac, integrity=False
        )


def test_hostile_header_refused_with_all_reasons(tmp_path: Path) -> None:
    def change(m: dict[str, object]) -> None:
        m["segments"]["0"]["encryption"] = "cipher_null-ecb"  # type: ignore[index]
        m["keyslots"]["0"]["area"]["encryption"] = "cipher_null-ecb"  # type: ignore[index]

    img = tmp_path / "bad.img"
    write_image(img, luks2_area(mutated(change)))
    _, mac_key = derive_keys(Secret(bytes(32)), "pgdata")
    with pytest.raises(HeaderRefused) as info:
        validate_header_copy(
            read_header_area(str(img)), volume_name="pgdata", mac_key=mac_key, integrity=False
        )
    assert {r.split(":")[0] for r in info.value.reasons} >= {"segment-cipher", "keyslot-cipher"}
    assert "\n" not in str(info.value)


def test_unreadable_header_refused(tmp_path: Path) -> None:
    _, mac_key = derive_keys(Secret(bytes(32)), "pgdata")
    with pytest.raises(HeaderRefused, match="header: primary header"):
        validate_header_copy(bytes(4096), volume_name="pgdata", mac_key=mac_key, integrity=False)


def test_mutable_area_rejected() -> None:
    _, mac_key = derive_keys(Secret(bytes(32)), "pgdata")
    with pytest.raises(TypeError):
        validate_header_copy(
            bytearray(10),  # type: ignore[arg-type]
            volume_name="pgdata",
            mac_key=mac_key,
            integrity=False,
        )
