"""luks.token: HKDF key derivation and the `cva` token's MAC."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luks.header import allow_list_reasons, parse_luks2
from luks.secret import Secret
from luks.token import (
    TokenError,
    canonical_metadata,
    derive_keys,
    make_token,
    token_json,
    token_mac,
    verify_token,
)
from tests.luks_headers import good_metadata, luks2_area, mutated

SECRET = bytes(range(32, 96))  # 64 recognisable bytes


def _hkdf_reference(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 written out, to check the derivation independently of `cryptography`."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    okm, block, i = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
        i += 1
    return okm[:length]


def test_derive_keys_matches_rfc5869() -> None:
    passphrase, mac_key = derive_keys(Secret(SECRET), "pgdata")
    assert bytes(passphrase.data) == _hkdf_reference(SECRET, b"cva/v1/luks-passphrase/pgdata")
    assert bytes(mac_key.data) == _hkdf_reference(SECRET, b"cva/v1/header-mac/pgdata")
    assert len(passphrase) == 32 and not passphrase.equals(mac_key)


def test_rfc5869_reference_is_right() -> None:
    # RFC 5869 A.3 (sha256, no salt, no info) checks the reference used above
    okm = _hkdf_reference(b"\x0b" * 22, b"", 42)
    assert okm.hex().startswith("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d")


def test_keys_differ_per_volume() -> None:
    p1, _ = derive_keys(Secret(SECRET), "a")
    p2, _ = derive_keys(Secret(SECRET), "b")
    assert not p1.equals(p2)


def test_short_secret_refused_without_leaking_it() -> None:
    short = b"TOPSECRET-short-key"
    with pytest.raises(TokenError, match="at least 32") as info:
        derive_keys(Secret(short), "pgdata")
    assert "TOPSECRET" not in str(info.value) and short.hex() not in str(info.value)


@pytest.mark.parametrize("name", ["", "A", "-x", "a/b", "a" * 40, "pg data"])
def test_bad_volume_names_refused(name: str) -> None:
    with pytest.raises(TokenError, match="volume name"):
        derive_keys(Secret(SECRET), name)


def _header(meta: dict[str, Any] | None = None) -> Any:
    return parse_luks2(luks2_area(meta or good_metadata()))


def _with_token(token: dict[str, Any], meta: dict[str, Any] | None = None) -> Any:
    base = meta or good_metadata()
    return _header({**base, "tokens": {"0": token}})


def test_token_round_trip() -> None:
    _, mac_key = derive_keys(Secret(SECRET), "pgdata")
    hdr = _header()
    token = make_token(hdr, "initializing", "pgdata", mac_key)
    assert set(token) == {"type", "keyslots", "state", "volume", "seq", "mac"}
    marked = _with_token(json.loads(token_json(token)))
    assert allow_list_reasons(marked, integrity=False) == []
    assert verify_token(marked, "pgdata", mac_key) == "initializing"
    ready = _with_token(make_token(marked, "ready", "pgdata", mac_key))
    assert verify_token(ready, "pgdata", mac_key) == "ready"


def test_metadata_excludes_tokens() -> None:
    _, mac_key = derive_keys(Secret(SECRET), "pgdata")
    hdr = _header()
    marked = _with_token(make_token(hdr, "ready", "pgdata", mac_key))
    assert canonical_metadata(hdr) == canonical_metadata(marked)
    assert b"tokens" not in canonical_metadata(hdr)


def test_canonical_metadata_ignores_json_formatting() -> None:
    meta = good_metadata()
    pretty = json.dumps(meta, indent=3)
    assert canonical_metadata(_header(meta)) == canonical_metadata(parse_luks2(luks2_area(pretty)))


def test_no_token_refused() -> None:
    _, mac_key = derive_keys(Secret(SECRET), "pgdata")
    with pytest.raises(TokenError, match="no cva token"):
        verify_token(_header(), "pgdata", mac_key)


def test_forged_token_refused() -> None:
    _, mac_key = derive_keys(Secret(SECRET), "pgdata")
    forged = {
        "type": "cva",
        "keyslots": [],
        "state": "initializing",
        "volume": "pgdata",
        "mac": "0" * 64,
    }
    hdr = _with_token(forged)
    assert allow_list_reasons(hdr, integrity=False) == []  # structurally fine ...
    with pytest.raises(TokenError, match="MAC does not match") as info:  # ... but not ours
        verify_token(hdr, "pgdata", mac_key)
    text = str(info.value) + repr(info.value)
    assert bytes(mac_key.data).hex() not in text
    assert token_mac(hdr, "initializing", "pgdata", mac_key) not in text  # no oracle either


def test_token_made_with_another_key_refused() -> None:
    _, mac_key = derive_keys(Secret(SECRET), "pgdata")
    _, other_key = derive_keys(Secret(b"\x01" * 32), "pgdata")
    hdr = _with_token(make_token(_header(), "ready", "pgdata", other_key))
    with pytest.raises(TokenError, match="MAC"):
        verify_token(hdr, "pgdata", mac_key)


def test_state_flip_refused() -> None:
    """The host turns `ready` into `initializing` (hoping cva reformats): MAC breaks."""
    _, mac_key = derive_keys(Secret(SECRET), "pgdata")
    token = make_token(_header(), "ready", "pgdata", mac_key)
    token["state"] = "initializing"
    with pytest.raises(TokenError, match="MAC"):
        verify_token(_with_token(token), "pgdata", mac_key)


def test_token_moved_to_another_volume_refused() -> None:
    _, mac_a = derive_keys(Secret(SECRET), "a")
    hdr = _with_token(make_token(_header(), "ready", "b", mac_a))
    with pytest.raises(TokenError, match="belongs to volume 'b'"):
        verify_token(hdr, "a", mac_a)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["keyslots"]["0"]["kdf"].update(salt="A" * 43 + "="),
        lambda m: m["segments"]["0"].update(encryption="cipher_null-ecb"),
        lambda m: m["digests"]["0"].update(digest="B" * 43 + "="),
        lambda m: m["config"].update(flags=["no-read-workqueue"]),
    ],
)
def test_metadata_change_breaks_mac(change: Any) -> None:
    _, mac_key = derive_keys(Secret(SECRET), "pgdata")
    token = make_token(_header(), "ready", "pgdata", mac_key)
    with pytest.raises(TokenError, match="MAC"):
        verify_token(_with_token(token, mutated(change)), "pgdata", mac_key)


def test_uuid_change_breaks_mac() -> None:
    _, mac_key = derive_keys(Secret(SECRET), "pgdata")
    token = make_token(_header(), "ready", "pgdata", mac_key)
    meta = {**good_metadata(), "tokens": {"0": token}}
    other = "11111111-2222-4333-8444-555555555555"
    hdr = parse_luks2(luks2_area(meta, primary={"uuid": other}, secondary={"uuid": other}))
    with pytest.raises(TokenError, match="MAC"):
        verify_token(hdr, "pgdata", mac_key)


def test_malformed_token_refused() -> None:
    _, mac_key = derive_keys(Secret(SECRET), "pgdata")
    with pytest.raises(TokenError, match="malformed"):
        verify_token(_with_token({"type": "cva", "keyslots": []}), "pgdata", mac_key)


def test_bad_state_not_made() -> None:
    _, mac_key = derive_keys(Secret(SECRET), "pgdata")
    with pytest.raises(TokenError, match="state"):
        make_token(_header(), "open", "pgdata", mac_key)


def test_mac_is_length_prefixed() -> None:
    """State/name boundaries cannot be shifted: ("ready", "x") vs ("read", "yx") differ."""
    _, mac_key = derive_keys(Secret(SECRET), "pgdata")
    hdr = _header()
    assert token_mac(hdr, "ready", "x", mac_key) != token_mac(hdr, "read", "yx", mac_key)


@settings(max_examples=100)
@given(st.dictionaries(st.text(max_size=8), st.text(max_size=8) | st.integers(), max_size=6))
def test_verify_any_token_is_state_or_token_error(token: dict[str, Any]) -> None:
    _, mac_key = derive_keys(Secret(SECRET), "pgdata")
    hdr = _with_token({**token, "type": "cva"})
    try:
        verify_token(hdr, "pgdata", mac_key)
    except TokenError as exc:
        assert "\n" not in exc.message
    else:
        raise AssertionError("a random token verified")
