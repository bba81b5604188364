"""Pure protocol functions of agent.kbs.wire against SPEC §a (byte-exact) and hostile input."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from agent.contract import KbsResourceUri
from agent.kbs import wire
from agent.kbs.errors import (
    AttestationFailed,
    KbsError,
    KbsProtocolError,
    PolicyDenied,
    ProtocolMismatch,
    ResourceNotFound,
)
from agent.kbs.jwe import tee_key_from_private
from tests.kbs.fixtures import kbs_uri

NONCE = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
DIGEST = (
    "1147b1af549c26b6863daf32fc064834beaa470ddb06fd5c57c44363"
    "cb2e86f11c4d80906326c2154d2b96d47de1ac62"
)


def example_key() -> dict[str, str]:
    private = ec.derive_private_key(int("11" * 32, 16), ec.SECP256R1())
    return tee_key_from_private("ECDH-ES+A256KW-P256", private).jwk


def test_jcs_vector(vectors: Path) -> None:
    v = json.loads((vectors / "kbs" / "trustee_runtime_data_jcs_sha384_vector.json").read_text())
    assert wire.jcs(v["runtime_data"]).decode() == v["canonical_json"]
    import hashlib

    assert hashlib.sha384(wire.jcs(v["runtime_data"])).hexdigest() == v["expected_digest_hex"]


def test_worked_example_request_body() -> None:
    assert wire.request_body("sample") == (
        b'{"version":"0.4.0","tee":"sample","extra-params":'
        b'{"supported-hash-algorithms":["sha256","sha384","sha512","sm3"]}}'
    )


def test_worked_example_runtime_data_and_digest() -> None:
    jwk = example_key()
    assert jwk == {
        "kty": "EC",
        "crv": "P-256",
        "alg": "ECDH-ES+A256KW",
        "x": "AhfmF_C2RDkoJ4-WmZ5pojpPLBUr321s32bluAKC1O0",
        "y": "GUp968uXcS0t2jyoWqh2Wlb0X8dYWZZS8ol8ZTBuV5Q",
    }
    assert wire.jcs(wire.runtime_data_object(jwk, NONCE)) == (
        b'{"additional-evidence":"","nonce":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",'
        b'"tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC",'
        b'"x":"AhfmF_C2RDkoJ4-WmZ5pojpPLBUr321s32bluAKC1O0",'
        b'"y":"GUp968uXcS0t2jyoWqh2Wlb0X8dYWZZS8ol8ZTBuV5Q"}}'
    )
    digest = wire.runtime_data_digest(jwk, NONCE)
    assert digest.hex() == DIGEST
    assert wire.report_data_for("tdx", digest) == digest + b"\0" * 16
    assert wire.report_data_for("snp", digest) == digest + b"\0" * 16
    assert wire.report_data_for("sample", digest) == digest
    assert wire.report_data_for("tpm", digest) == digest[:32]


def test_worked_example_attestation_body() -> None:
    jwk = example_key()
    digest = bytes.fromhex(DIGEST)
    evidence = {"svn": "1", "report_data": base64.b64encode(digest).decode()}
    body = json.loads(wire.attestation_body(NONCE, jwk, evidence, None))
    assert body == {
        "init-data": None,
        "runtime-data": {"nonce": NONCE, "tee-pubkey": jwk},
        "tee-evidence": {
            "primary_evidence": {
                "svn": "1",
                "report_data": "EUexr1ScJraGPa8y/AZINL6qRw3bBv1cV8RDY8suhvEcTYCQYybCFU0rltR94axi",
            },
            "additional_evidence": "",
        },
    }
    with_init = json.loads(wire.attestation_body(NONCE, jwk, evidence, "version = '0.1.0'\n"))
    assert with_init["init-data"] == {"format": "toml", "body": "version = '0.1.0'\n"}


def test_challenge_parsing() -> None:
    c = wire.parse_challenge(json.dumps({"nonce": NONCE, "extra-params": ""}).encode())
    assert c == wire.Challenge(NONCE, "sha384")
    c = wire.parse_challenge(
        json.dumps({"nonce": NONCE, "extra-params": {"selected-hash-algorithm": "SHA512"}}).encode()
    )
    assert c.hash_algorithm == "sha512"


@pytest.mark.parametrize(
    "body",
    [
        b"<html>not json</html>",
        b"[]",
        b'{"nonce": 42, "extra-params": ""}',
        b'{"extra-params": ""}',
        b'{"nonce": "42", "extra-params": ""}',  # kbs-types' toy nonce: wrong size
        json.dumps({"nonce": base64.b64encode(b"x" * 31).decode()}).encode(),
        json.dumps({"nonce": base64.b64encode(b"x" * 64).decode()}).encode(),
        json.dumps({"nonce": NONCE, "extra-params": 7}).encode(),
        json.dumps({"nonce": NONCE, "extra-params": {"selected-hash-algorithm": "md5"}}).encode(),
        json.dumps({"nonce": NONCE, "extra-params": {"selected-hash-algorithm": "sm3"}}).encode(),
        b"[" * 100000,
        b"\xff\xfe",
        b"{" + b" " * (wire.MAX_JSON_BYTES + 1) + b"}",
    ],
)
def test_hostile_challenges_are_clean_errors(body: bytes) -> None:
    with pytest.raises(KbsProtocolError):
        wire.parse_challenge(body)


def _jwt(claims: object) -> str:
    return "eyJhbGciOiJFUzI1NiJ9." + wire.b64url(json.dumps(claims).encode()) + ".c2ln"


def test_token_window() -> None:
    t = wire.parse_attest_response(json.dumps({"token": _jwt({"exp": 1000, "nbf": 400})}).encode())
    assert (t.exp, t.nbf) == (1000.0, 400.0)
    assert t.usable(500, 10, 300, 500)
    assert not t.usable(995, 10, 300, 500)  # renew skew before exp
    assert t.usable(395, 10, 300, 395)  # nbf slightly ahead: within skew
    assert not t.usable(300, 10, 300, 300)
    no_exp = wire.parse_token(_jwt({}))
    assert no_exp.usable(100, 10, 300, 0) and not no_exp.usable(295, 10, 300, 0)
    assert "eyJ" not in repr(t)


@pytest.mark.parametrize(
    "token",
    [
        None,
        5,
        "",
        "a.b",
        "a.b.c.d",
        "x" * (wire.MAX_TOKEN_CHARS + 1),
        _jwt([1]),
        _jwt({"exp": "soon"}),
        _jwt({"exp": True}),
        "a.!!!.c",
    ],
)
def test_hostile_tokens(token: object) -> None:
    with pytest.raises(KbsProtocolError):
        wire.parse_token(token)


def test_session_cookie() -> None:
    sid = "0123456789abcdef0123456789abcdef"
    assert (
        wire.session_cookie([f"kbs-session-id={sid}; Expires=Sun, 29 Nov 2026 02:00:00 GMT"]) == sid
    )
    assert wire.session_cookie(["other=1", f"kbs-session-id={sid}"]) == sid
    assert wire.session_cookie(["other=1"]) is None
    with pytest.raises(KbsProtocolError):
        wire.session_cookie(["kbs-session-id=a b\r\nX: y"])


def test_error_bodies_and_classification() -> None:
    def body(variant: str, detail: str) -> bytes:
        return json.dumps({"type": wire.ERROR_TYPE_PREFIX + variant, "detail": detail}).encode()

    deny = wire.parse_error_body(401, body("PolicyDeny", "Access denied by policy"))
    assert deny.variant == "PolicyDeny" and not wire.should_reattest(deny)
    e = wire.failure("resource", deny, "kbs:///default/pgdata/luks")
    assert isinstance(e, PolicyDenied)
    assert e.message.startswith(
        "KBS policy denied kbs:///default/pgdata/luks (401 PolicyDeny): Access denied by policy"
    )
    # newer Trustee answers 403 for the same variant
    assert isinstance(
        wire.failure("resource", wire.parse_error_body(403, body("PolicyDeny", "")), "u"),
        PolicyDenied,
    )
    mismatch = wire.parse_error_body(
        401,
        body(
            "AttestationError",
            "Attestation error: RCAR handshake Auth failed: KBS Client Protocol Version Mismatch: "
            "expect =0.3.0 while the request is 0.4.0",
        ),
    )
    e = wire.failure("auth", mismatch, "/auth")
    assert isinstance(e, ProtocolMismatch)
    assert e.message.startswith("protocol version mismatch: KBS expects =0.3.0")
    missing = wire.parse_error_body(401, body("PluginInternalError", "Plugin internal error"))
    assert isinstance(wire.failure("resource", missing, "u"), ResourceNotFound)
    assert isinstance(
        wire.failure("resource", wire.parse_error_body(404, b""), "u"), ResourceNotFound
    )
    token = wire.parse_error_body(401, body("TokenVerifierError", "Token Verifier error"))
    assert wire.should_reattest(token)
    assert isinstance(wire.failure("resource", token, "u"), AttestationFailed)
    assert isinstance(wire.failure("attest", token, "/attest"), AttestationFailed)
    junk = wire.parse_error_body(401, b"\x00<html>")
    assert junk == wire.ErrorBody(401, "", "") and wire.should_reattest(junk)
    ctl = wire.parse_error_body(401, body("X\nY", "line1\nline2\x1b[31m"))
    assert "\n" not in ctl.detail and "\x1b" not in ctl.detail


def test_resource_paths() -> None:
    assert (
        wire.resource_path(kbs_uri("kbs:///default/pgdata/luks"))
        == "/kbs/v0/resource/default/pgdata/luks"
    )
    u = kbs_uri("kbs+pkcs11:///repo/key/one")
    assert wire.resource_path(u) == "/kbs/v0/pkcs11/repo/key/one"
    assert wire.uri_text(u) == "kbs+pkcs11:///repo/key/one"


@pytest.mark.parametrize("seg", ["..", ".", "a/b", "", "a b", "%2e%2e", "-ok.", "ü"])
def test_resource_path_segments(seg: str) -> None:
    u = KbsResourceUri("repo", seg, "tag")  # built directly: bypasses the contract's parser
    if seg == "-ok.":
        assert wire.resource_path(u).endswith("/-ok./tag")
        return
    with pytest.raises(KbsError):
        wire.resource_path(u)


@given(st.binary(max_size=512))
def test_any_bytes_parse_to_value_or_clean_error(data: bytes) -> None:
    for parse in (wire.parse_challenge, wire.parse_attest_response):
        with contextlib.suppress(KbsError):
            parse(data)
    assert isinstance(wire.parse_error_body(401, data), wire.ErrorBody)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=50),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
        max_leaves=20,
    )
)
def test_any_json_parses_to_value_or_clean_error(value: object) -> None:
    for shape in (value, {"nonce": value, "extra-params": value}, {"token": value}):
        data = json.dumps(shape).encode()
        for parse in (wire.parse_challenge, wire.parse_attest_response):
            with contextlib.suppress(KbsError):
                parse(data)


@given(st.lists(st.text(max_size=80), max_size=4))
def test_any_set_cookie_headers_give_value_none_or_clean_error(headers: list[str]) -> None:
    try:
        value = wire.session_cookie(headers)
    except KbsProtocolError:
        return
    assert value is None or (value.isascii() and " " not in value and len(value) <= 128)
