"""JWE decryption (agent.kbs.jwe): SPEC §a.12 exactly, every key type, hostile JWEs."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.kbs.errors import JweError, KbsError
from agent.kbs.jwe import (
    KEY_ALGORITHMS,
    TeeKey,
    decrypt_resource,
    generate_tee_key,
    tee_key_from_private,
)
from agent.kbs.wire import b64url
from tests.kbs.server import _wrap

EXAMPLE_JWE = {
    "protected": (
        "eyJhbGciOiJFQ0RILUVTK0EyNTZLVyIsImVuYyI6IkEyNTZHQ00iLCJlcGsiOnsiY3J2IjoiUC0yNTYi"
        "LCJrdHkiOiJFQyIsIngiOiIxbHFUbDN5cVBSc0lHRkxfVjZlZVJsOFdZRmR6QkxycTFRWGRPa2hZblBN"
        "IiwieSI6IlVCaGVpVk55MzJJaDZqb1RkVmZrY18zYloxWHdXOVVIdzhVel9PbkpFb1UifX0"
    ),
    "encrypted_key": "Tv226vhM20rpXNoICDhHf0YT2lYcLlnHvVvuv_Fmpi_nXNRYDlyw1A",
    "iv": "RERERERERERERERE",
    "ciphertext": "AKD2of4zuVyYu8XwlfmvFyq9I7lU6ol83XezEX2FZ-E",
    "tag": "IegOuGtHZFhwLeELtyGU6w",
}


def example_key() -> TeeKey:
    return tee_key_from_private(
        "ECDH-ES+A256KW-P256", ec.derive_private_key(int("11" * 32, 16), ec.SECP256R1())
    )


def test_worked_example_decrypts() -> None:
    with decrypt_resource(dict(EXAMPLE_JWE), example_key()) as secret:
        assert secret.equals(b"0123456789abcdef0123456789abcdef")


@pytest.fixture(scope="module", params=KEY_ALGORITHMS)
def key(request: pytest.FixtureRequest) -> TeeKey:
    return generate_tee_key(request.param)


def test_round_trip_every_key_type(key: TeeKey) -> None:
    for data in (b"k" * 32, b"", bytes(range(256)) * 8):
        with decrypt_resource(_wrap(data, key.jwk), key) as secret:
            assert secret.equals(data)


def test_fixed_length_coordinates() -> None:
    for alg, size in (("ECDH-ES+A256KW-P256", 32), ("ECDH-ES+A256KW-P521", 66)):
        for _ in range(8):
            jwk = generate_tee_key(alg).jwk  # type: ignore[arg-type]
            assert list(jwk) == ["kty", "crv", "alg", "x", "y"]
            assert len(base64.urlsafe_b64decode(jwk["x"] + "==")) == size
    assert list(generate_tee_key("RSA-OAEP-256").jwk) == ["kty", "alg", "n", "e"]


def _header(jwe: dict[str, Any]) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(jwe["protected"] + "=="))


def _with_header(jwe: dict[str, Any], header: dict[str, Any]) -> dict[str, Any]:
    return {**jwe, "protected": b64url(json.dumps(header).encode())}


def _p256_jwe() -> dict[str, Any]:
    return dict(EXAMPLE_JWE)


def _off_curve(jwe: dict[str, Any]) -> dict[str, Any]:
    h = _header(jwe)
    y = bytearray(base64.urlsafe_b64decode(h["epk"]["y"] + "=="))
    y[-1] ^= 1
    h["epk"]["y"] = b64url(bytes(y))
    return _with_header(jwe, h)


def _flip(field: str, index: int = 0) -> Any:
    def mutate(jwe: dict[str, Any]) -> dict[str, Any]:
        raw = bytearray(base64.urlsafe_b64decode(jwe[field] + "=="))
        raw[index] ^= 0x80
        return {**jwe, field: b64url(bytes(raw))}

    return mutate


HOSTILE = {
    "alg A256KW": lambda j: _with_header(j, {**_header(j), "alg": "A256KW"}),
    "alg dir": lambda j: _with_header(j, {**_header(j), "alg": "dir"}),
    "alg RSA-OAEP-256 for an EC key": lambda j: _with_header(
        j, {**_header(j), "alg": "RSA-OAEP-256"}
    ),
    "alg none": lambda j: _with_header(j, {"alg": "none", "enc": "A256GCM"}),
    "enc A128GCM": lambda j: _with_header(j, {**_header(j), "enc": "A128GCM"}),
    "enc A256CBC-HS512": lambda j: _with_header(j, {**_header(j), "enc": "A256CBC-HS512"}),
    "zip": lambda j: _with_header(j, {**_header(j), "zip": "DEF"}),
    "crit": lambda j: _with_header(j, {**_header(j), "crit": ["exp"]}),
    "apu": lambda j: _with_header(j, {**_header(j), "apu": "QQ"}),
    "epk off curve": _off_curve,
    "epk on P-521": lambda j: _with_header(
        j, {**_header(j), "epk": generate_tee_key("ECDH-ES+A256KW-P521").jwk}
    ),
    "epk missing": lambda j: _with_header(j, {"alg": "ECDH-ES+A256KW", "enc": "A256GCM"}),
    "epk short x": lambda j: _with_header(
        j, {**_header(j), "epk": {**_header(j)["epk"], "x": "AAAA"}}
    ),
    "epk not an object": lambda j: _with_header(j, {**_header(j), "epk": "x"}),
    "truncated tag": lambda j: {**j, "tag": j["tag"][:11]},
    "empty tag": lambda j: {**j, "tag": ""},
    "flipped tag": _flip("tag"),
    "flipped ciphertext": _flip("ciphertext"),
    "flipped wrapped key": _flip("encrypted_key"),
    "short wrapped key": lambda j: {**j, "encrypted_key": j["encrypted_key"][:20]},
    "iv 16 bytes": lambda j: {**j, "iv": b64url(b"\x44" * 16)},
    "protected re-encoded": lambda j: _with_header(j, _header(j)),  # AAD changes -> tag fails
    "aad member": lambda j: {**j, "aad": "fakeaad"},
    "unprotected header": lambda j: {**j, "header": {"kid": "1"}},
    "protected not b64": lambda j: {**j, "protected": "!!!"},
    "protected not json": lambda j: {**j, "protected": b64url(b"not json")},
    "protected a list": lambda j: {**j, "protected": b64url(b"[1]")},
    "protected deep": lambda j: {**j, "protected": b64url(b"[" * 5000)},
    "ciphertext a number": lambda j: {**j, "ciphertext": 5},
    "iv missing": lambda j: {k: v for k, v in j.items() if k != "iv"},
    "padding in field": lambda j: {**j, "tag": j["tag"] + "=="},
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_jwe_is_a_clean_error(name: str) -> None:
    hostile = HOSTILE[name](_p256_jwe())
    with pytest.raises(KbsError) as info:
        decrypt_resource(hostile, example_key())
    assert "0123456789abcdef" not in info.value.message


@pytest.mark.parametrize("name", ["alg swapped to the other RSA", "truncated tag", "wrong key"])
def test_hostile_rsa_jwe(name: str) -> None:
    key = generate_tee_key("RSA-OAEP-256")
    jwe = _wrap(b"s" * 32, key.jwk)
    if name == "alg swapped to the other RSA":
        jwe = _with_header(jwe, {**_header(jwe), "alg": "RSA1_5"})
    elif name == "truncated tag":
        jwe = {**jwe, "tag": jwe["tag"][:-2]}
    else:
        key = generate_tee_key("RSA-OAEP-256")
    with pytest.raises(JweError):
        decrypt_resource(jwe, key)


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(["protected", "encrypted_key", "iv", "ciphertext", "tag", "aad", "x"]),
        st.one_of(
            st.text(max_size=80), st.integers(), st.none(), st.binary(max_size=40).map(b64url)
        ),
    )
)
def test_any_jwe_object_is_value_or_clean_error(jwe: dict[str, Any]) -> None:
    with contextlib.suppress(KbsError):
        decrypt_resource(jwe, example_key())


@settings(max_examples=200)
@given(st.sampled_from(sorted(EXAMPLE_JWE)), st.integers(0, 200), st.integers(1, 255))
def test_any_single_bit_corruption_is_refused(field: str, index: int, bit: int) -> None:
    raw = bytearray(EXAMPLE_JWE[field].encode())
    raw[index % len(raw)] ^= bit
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return
    with pytest.raises(KbsError):
        decrypt_resource({**EXAMPLE_JWE, field: text}, example_key())


def test_kbs_types_examples(vectors: Path) -> None:
    v = json.loads((vectors / "kbs" / "kbs_types_unit_test_examples.json").read_text())
    aad = v["protected_header_generate_aad"]
    assert (
        b64url(json.dumps(aad["input"], separators=(",", ":")).encode())
        == aad["expected_aad_ascii"]
    )
    cases = v["cases"]
    from agent.kbs.wire import b64url_decode

    r = cases["parse_response"]
    assert b64url_decode(r["encrypted_key"], "k") == b"fakekey"
    assert b64url_decode(r["iv"], "iv") == b"randomdata"
    assert b64url_decode(r["tag"], "tag") == b"faketag"
    for name in (
        "parse_response",
        "parse_response_nested_protected_header",
        "parse_response_with_aad",
        "parse_response_with_protectedheader",
    ):
        with pytest.raises(JweError):  # fake algorithms / aad: refused, cleanly
            decrypt_resource(dict(cases[name]), example_key())
