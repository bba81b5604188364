"""Issue 21 #5f: derived keys never exist as immutable bytes where `cryptography` allows
otherwise. HKDF outputs (luks.token) and the JWE's KEK and CEK (agent.kbs.jwe) are derived
into bytearrays (`derive_into`, `update_into`) that are wiped once used; the residue the library
forces (ECDH's Z, the RSA-unwrapped CEK) is what the README's "Key material in memory" lists."""

from __future__ import annotations

import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import ciphers
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from hypothesis import given, settings
from hypothesis import strategies as st

import agent.kbs.jwe as jwe_mod
from agent.kbs.errors import JweError
from agent.kbs.jwe import KEY_ALGORITHMS, aes_key_unwrap_into, decrypt_resource, generate_tee_key
from luks.secret import Secret
from luks.token import derive_keys
from tests.kbs.server import _wrap


def _no_bytes(*_a: object, **_k: object) -> bytes:
    raise AssertionError("a derived key was asked for as immutable bytes")


def test_hkdf_outputs_are_derived_into_the_secrets_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = derive_keys(Secret(b"k" * 32), "pg")
    monkeypatch.setattr(HKDF, "derive", _no_bytes)
    passphrase, mac_key = derive_keys(Secret(b"k" * 32), "pg")
    assert passphrase.equals(expected[0]) and mac_key.equals(expected[1])
    assert isinstance(passphrase.data, bytearray) and len(passphrase) == 32


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(2, 8))
def test_key_unwrap_matches_rfc3394(kek: bytes, blocks: int) -> None:
    key = os.urandom(8 * blocks)
    wrapped = aes_key_wrap(kek, key)  # cryptography's independent implementation
    out = bytearray(len(key))
    aes_key_unwrap_into(bytearray(kek), wrapped, out)
    assert out == key


def test_key_unwrap_rfc3394_vector() -> None:
    """RFC 3394 section 4.6: 256 bits of key data with a 256-bit KEK."""
    kek = bytes.fromhex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
    wrapped = bytes.fromhex(
        "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
    )
    out = bytearray(32)
    aes_key_unwrap_into(bytearray(kek), wrapped, out)
    assert out.hex().upper() == "00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F"


@pytest.mark.parametrize("damage", ["flip", "short", "odd"])
def test_key_unwrap_refuses_and_leaves_nothing(damage: str) -> None:
    kek, key = os.urandom(32), os.urandom(32)
    wrapped = bytearray(aes_key_wrap(kek, key))
    out = bytearray(32)
    if damage == "flip":
        wrapped[20] ^= 1
    elif damage == "short":
        del wrapped[-8:]
    else:
        del wrapped[-1]
    with pytest.raises(JweError):
        aes_key_unwrap_into(bytearray(kek), bytes(wrapped), out)
    assert out == bytes(32)


@pytest.mark.parametrize("algorithm", KEY_ALGORITHMS)
def test_kek_and_cek_are_wiped_after_decryption(
    algorithm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = generate_tee_key(algorithm)  # type: ignore[arg-type]
    jwe = _wrap(b"r" * 48, key.jwk)
    keks: list[bytearray] = []
    aes_keys: list[Any] = []
    real_into = ConcatKDFHash.derive_into
    real_aes = ciphers.algorithms.AES

    def spy_into(self: ConcatKDFHash, material: bytes, buffer: bytearray) -> int:
        keks.append(buffer)
        return int(real_into(self, material, buffer))

    def spy_aes(key_bytes: Any) -> Any:
        aes_keys.append(key_bytes)
        return real_aes(key_bytes)

    monkeypatch.setattr(ConcatKDFHash, "derive", _no_bytes)
    monkeypatch.setattr(ConcatKDFHash, "derive_into", spy_into)
    monkeypatch.setattr(jwe_mod.algorithms, "AES", spy_aes)
    with decrypt_resource(jwe, key) as secret:
        assert secret.equals(b"r" * 48)
    assert all(isinstance(k, bytearray) for k in aes_keys)  # the KEK and the CEK
    assert aes_keys and all(not any(k) for k in aes_keys)  # ... wiped
    assert all(not any(k) for k in keks) and (keks or algorithm.startswith("RSA"))


def test_a_failed_decryption_wipes_the_cek(monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_tee_key("ECDH-ES+A256KW-P256")
    jwe = _wrap(b"r" * 32, key.jwk)
    jwe["tag"] = jwe["tag"][:-2] + ("A" if jwe["tag"][-2] != "A" else "B") + jwe["tag"][-1]
    aes_keys: list[Any] = []
    real_aes = ciphers.algorithms.AES

    def spy_aes(key_bytes: Any) -> Any:
        aes_keys.append(key_bytes)
        return real_aes(key_bytes)

    monkeypatch.setattr(jwe_mod.algorithms, "AES", spy_aes)
    with pytest.raises(JweError):
        decrypt_resource(jwe, key)
    assert len(aes_keys) == 2 and all(not any(k) for k in aes_keys)
