"""The TEE key pair of one KBS session and the decryption of Trustee's resource JWE.

Trustee wraps every resource for the `tee-pubkey` the client attested (SPEC §a.6/§a.7): a
flattened JWE with `enc = A256GCM`, AAD = the ASCII `protected` string, and `alg` =
ECDH-ES+A256KW (P-256/P-521), RSA-OAEP-256 or RSA1_5 — whichever matches the key we sent.

This module does the JOSE by hand on `cryptography` rather than through joserfc, because the
client must refuse more than a general JOSE library does: any `alg` other than the one of *our*
key (no algorithm confusion), any `enc` but A256GCM, `zip`/`crit`/`apu`/`apv`/`aad`, an `epk` on
another curve or off the curve, a wrong-size IV, tag, wrapped key or CEK, and any tag failure —
and it decrypts straight into a wipeable buffer (`update_into`), so the plaintext never exists as
an immutable `bytes` object. The test KBS encrypts with joserfc, an independent implementation.

Key material on the way (issue 21 #5f): the KEK (Concat KDF `derive_into`) and the CEK (AES key
unwrap done here, RFC 3394 over an ECB decryptor's `update_into`) live only in bytearrays wiped
before this returns, whatever happens. What `cryptography` hands out only as immutable `bytes`,
and so stays in the heap until reused: the ECDH shared secret Z (`exchange` has no `_into`
form; the reference is dropped right after the KDF) and, for the RSA algorithms, the unwrapped
CEK (`decrypt`). OpenSSL's own contexts (key schedules) are cleansed when they are freed.
"""

from __future__ import annotations

import hmac
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash

from agent.kbs.errors import JweError
from agent.kbs.wire import b64url, b64url_decode
from luks.secret import Secret, wipe

KeyAlgorithm = Literal["ECDH-ES+A256KW-P256", "ECDH-ES+A256KW-P521", "RSA-OAEP-256", "RSA1_5"]
KEY_ALGORITHMS: tuple[KeyAlgorithm, ...] = (
    "ECDH-ES+A256KW-P256",
    "ECDH-ES+A256KW-P521",
    "RSA-OAEP-256",
    "RSA1_5",
)
DEFAULT_KEY_ALGORITHM: KeyAlgorithm = "ECDH-ES+A256KW-P256"
MAX_JWE_FIELD = 1024 * 1024
_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-521": (ec.SECP521R1(), 66),
}
_ALLOWED_HEADER = {"alg", "enc", "epk", "kid", "typ", "cty"}


@dataclass(frozen=True)
class TeeKey:
    """An ephemeral key pair; `jwk` is exactly the members Trustee re-serializes (§a.6)."""

    algorithm: KeyAlgorithm
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = field(repr=False)
    jwk: dict[str, str]

    @property
    def jwe_alg(self) -> str:
        return "ECDH-ES+A256KW" if self.algorithm.startswith("ECDH") else self.algorithm


def _ec_jwk(pub: ec.EllipticCurvePublicKey, crv: str) -> dict[str, str]:
    size = _CURVES[crv][1]
    nums = pub.public_numbers()
    return {
        "kty": "EC",
        "crv": crv,
        "alg": "ECDH-ES+A256KW",
        "x": b64url(nums.x.to_bytes(size, "big")),
        "y": b64url(nums.y.to_bytes(size, "big")),
    }


def tee_key_from_private(
    algorithm: KeyAlgorithm, private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> TeeKey:
    if isinstance(private, ec.EllipticCurvePrivateKey):
        crv = "P-256" if algorithm.endswith("P256") else "P-521"
        if private.curve.name != _CURVES[crv][0].name:
            raise ValueError("private key curve does not match the key algorithm")
        return TeeKey(algorithm, private, _ec_jwk(private.public_key(), crv))
    nums = private.public_key().public_numbers()
    n = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
    e = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
    return TeeKey(
        algorithm, private, {"kty": "RSA", "alg": algorithm, "n": b64url(n), "e": b64url(e)}
    )


def generate_tee_key(algorithm: KeyAlgorithm = DEFAULT_KEY_ALGORITHM) -> TeeKey:
    """A fresh key for one KBS session (RSA keys are 2048-bit, as guest-components)."""
    if algorithm == "ECDH-ES+A256KW-P256":
        return tee_key_from_private(algorithm, ec.generate_private_key(ec.SECP256R1()))
    if algorithm == "ECDH-ES+A256KW-P521":
        return tee_key_from_private(algorithm, ec.generate_private_key(ec.SECP521R1()))
    if algorithm in ("RSA-OAEP-256", "RSA1_5"):
        return tee_key_from_private(algorithm, rsa.generate_private_key(65537, 2048))
    raise ValueError(f"unknown TEE key algorithm {algorithm!r}")


def _concat_kdf_otherinfo(alg: str) -> bytes:
    name = alg.encode()
    return struct.pack(">I", len(name)) + name + struct.pack(">II", 0, 0) + struct.pack(">I", 256)


_KW_IV = bytes.fromhex("a6a6a6a6a6a6a6a6")  # RFC 3394 2.2.3.1


def aes_key_unwrap_into(kek: bytearray, wrapped: bytes, out: bytearray) -> None:
    """RFC 3394 AES key unwrap of `wrapped` (8 * (n + 1) bytes) into `out` (8 * n bytes), with
    every intermediate value in `out` or in local bytearrays wiped before returning. Raises
    JweError when the integrity check fails."""
    n = len(wrapped) // 8 - 1
    if len(wrapped) % 8 or n < 2 or len(out) != 8 * n:
        raise JweError(f"resource JWE wrapped key is {len(wrapped)} bytes; not a wrapped key")
    decryptor = Cipher(algorithms.AES(kek), modes.ECB()).decryptor()  # noqa: S305 - RFC 3394
    a = bytearray(wrapped[:8])
    block = bytearray(16)
    plain = bytearray(32)  # update_into wants room for len + block size - 1
    av, bv, pv, ov = memoryview(a), memoryview(block), memoryview(plain), memoryview(out)
    try:
        ov[:] = wrapped[8:]
        for j in range(5, -1, -1):
            for i in range(n, 0, -1):
                t = (n * j + i).to_bytes(8, "big")
                for k in range(8):
                    bv[k] = av[k] ^ t[k]
                bv[8:] = ov[8 * (i - 1) : 8 * i]  # views: no temporary copy of key bytes
                if decryptor.update_into(block, plain) != 16:
                    raise JweError("resource JWE key unwrap: AES gave no block")
                av[:] = pv[:8]
                ov[8 * (i - 1) : 8 * i] = pv[8:16]
        decryptor.finalize()
        if not hmac.compare_digest(a, _KW_IV):
            wipe(out)
            raise JweError("resource JWE key unwrap failed (not wrapped for our key)")
    finally:
        for view in (av, bv, pv, ov):
            view.release()
        wipe(a)
        wipe(block)
        wipe(plain)


def _ec_cek(key: TeeKey, header: dict[str, Any], wrapped: bytes, cek: bytearray) -> None:
    assert isinstance(key.private, ec.EllipticCurvePrivateKey)
    crv = key.jwk["crv"]
    curve, size = _CURVES[crv]
    epk = header.get("epk")
    if not isinstance(epk, dict) or epk.get("kty") != "EC" or epk.get("crv") != crv:
        raise JweError(f"resource JWE epk is not an EC key on {crv}; refusing it")
    x, y = b64url_decode(epk.get("x"), "epk.x"), b64url_decode(epk.get("y"), "epk.y")
    if len(x) != size or len(y) != size:
        raise JweError(f"resource JWE epk coordinates are not {size} bytes; refusing it")
    try:
        peer = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
        ).public_key()
    except ValueError:
        raise JweError(f"resource JWE epk is not a point on {crv}; refusing it") from None
    if len(wrapped) != 40:
        raise JweError(f"resource JWE wrapped key is {len(wrapped)} bytes, not 40")
    kek = bytearray(32)
    try:
        z = key.private.exchange(ec.ECDH(), peer)  # immutable bytes: cryptography's only form
        ConcatKDFHash(
            hashes.SHA256(), 32, otherinfo=_concat_kdf_otherinfo("ECDH-ES+A256KW")
        ).derive_into(z, kek)
        del z
        aes_key_unwrap_into(kek, wrapped, cek)
    finally:
        wipe(kek)


def _rsa_cek(key: TeeKey, wrapped: bytes, cek: bytearray) -> None:
    assert isinstance(key.private, rsa.RSAPrivateKey)
    if len(wrapped) != key.private.key_size // 8:
        raise JweError("resource JWE wrapped key does not match our RSA modulus size")
    pad: padding.AsymmetricPadding
    if key.algorithm == "RSA-OAEP-256":
        pad = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    else:
        pad = padding.PKCS1v15()
    try:
        unwrapped = key.private.decrypt(wrapped, pad)  # immutable bytes: the library's only form
    except ValueError:
        raise JweError(f"resource JWE {key.algorithm} key decryption failed") from None
    if len(unwrapped) != len(cek):
        raise JweError(f"resource JWE content key is {len(unwrapped)} bytes, not {len(cek)}")
    cek[:] = unwrapped


def decrypt_resource(jwe: dict[str, Any], key: TeeKey) -> Secret:
    """Trustee's flattened JWE -> the resource bytes in a Secret (or a clean JweError)."""
    for name in ("aad", "header", "unprotected", "recipients"):
        if name in jwe:
            raise JweError(f"resource JWE carries {name!r}, which Trustee never sends; refusing it")
    protected = jwe.get("protected")
    if not isinstance(protected, str) or len(protected) > 16 * 1024:
        raise JweError("resource JWE has no usable 'protected' header")
    try:
        header = json.loads(b64url_decode(protected, "protected").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JweError("resource JWE protected header is not JSON") from None
    if not isinstance(header, dict):
        raise JweError("resource JWE protected header is not a JSON object")
    unknown = sorted(set(header) - _ALLOWED_HEADER)
    if unknown:
        raise JweError(f"resource JWE header has unsupported members {unknown[:4]}; refusing it")
    alg, enc = header.get("alg"), header.get("enc")
    if alg != key.jwe_alg:
        shown = str(alg)[:32]
        raise JweError(f"resource JWE alg {shown!r} is not {key.jwe_alg!r} (our key); refusing it")
    if enc != "A256GCM":
        raise JweError(f"resource JWE enc {str(enc)[:32]!r} is not 'A256GCM'; refusing it")
    fields: dict[str, bytes] = {}
    for name in ("encrypted_key", "iv", "ciphertext", "tag"):
        value = jwe.get(name)
        if not isinstance(value, str) or len(value) > MAX_JWE_FIELD:
            raise JweError(f"resource JWE field {name!r} is missing, not a string or too large")
        fields[name] = b64url_decode(value, f"JWE {name}")
    if len(fields["iv"]) != 12:
        raise JweError(f"resource JWE iv is {len(fields['iv'])} bytes, not 12")
    if len(fields["tag"]) != 16:
        raise JweError(f"resource JWE tag is {len(fields['tag'])} bytes, not 16 (truncated?)")
    cek = bytearray(32)  # A256GCM's key, wiped below whatever happens
    try:
        if alg == "ECDH-ES+A256KW":
            _ec_cek(key, header, fields["encrypted_key"], cek)
        else:
            _rsa_cek(key, fields["encrypted_key"], cek)
        return _gcm_decrypt(cek, fields, protected)
    finally:
        wipe(cek)


def _gcm_decrypt(cek: bytearray, fields: dict[str, bytes], protected: str) -> Secret:
    decryptor = Cipher(algorithms.AES(cek), modes.GCM(fields["iv"], fields["tag"])).decryptor()
    decryptor.authenticate_additional_data(protected.encode("ascii"))
    out = bytearray(len(fields["ciphertext"]) + 15)
    try:
        n = decryptor.update_into(fields["ciphertext"], out)
        decryptor.finalize()
    except InvalidTag:
        wipe(out)
        raise JweError("resource JWE integrity check failed (tag mismatch); refusing it") from None
    wipe(memoryview(out)[n:])
    del out[n:]
    return Secret.take(out)
