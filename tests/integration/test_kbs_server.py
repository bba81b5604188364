"""The loopback KBS itself behaves as Trustee does (so client tests against it mean something)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.kbs import wire
from agent.kbs.jwe import decrypt_resource, generate_tee_key
from tests.kbs.server import ERROR_PREFIX, LoopbackKbs, resource_key
from tests.kbs.tpm_quote import _Reader, verify_tpm_evidence

KEY = "kbs:///default/pgdata/luks"


@pytest.fixture
def kbs(loopback_kbs: LoopbackKbs) -> LoopbackKbs:
    loopback_kbs.add_resource(KEY, b"k" * 32)
    return loopback_kbs


def _error(r: httpx.Response) -> tuple[int, str, str]:
    body = r.json()
    assert body["type"].startswith(ERROR_PREFIX)
    return r.status_code, body["type"].removeprefix(ERROR_PREFIX), body["detail"]


def _auth(c: httpx.Client, version: str = "0.4.0") -> tuple[str, str]:
    r = c.post(
        "/kbs/v0/auth", content=wire.request_body("sample").replace(b"0.4.0", version.encode())
    )
    assert r.status_code == 200, r.text
    sid = wire.session_cookie(r.headers.get_list("set-cookie"))
    assert sid is not None and len(sid) == 32
    nonce = r.json()["nonce"]
    assert len(base64.b64decode(nonce)) == 32 and r.json()["extra-params"] == ""
    return sid, nonce


def _attest(
    c: httpx.Client, sid: str, nonce: str, jwk: dict[str, str], **kw: Any
) -> httpx.Response:
    digest = wire.runtime_data_digest(kw.pop("hashed_jwk", jwk), kw.pop("hashed_nonce", nonce))
    evidence = {"svn": "1", "report_data": base64.b64encode(digest).decode()}
    body = json.loads(wire.attestation_body(nonce, jwk, evidence, kw.pop("initdata", None)))
    body.update(kw)
    c.cookies.clear()  # only the session we name
    return c.post("/kbs/v0/attest", json=body, headers={"cookie": f"kbs-session-id={sid}"})


def test_full_exchange_by_hand(kbs: LoopbackKbs) -> None:
    key = generate_tee_key()
    with httpx.Client(base_url=kbs.url) as c:
        sid, nonce = _auth(c)
        r = _attest(c, sid, nonce, key.jwk)
        assert r.status_code == 200, r.text
        assert "kbs-session-id" in r.headers["set-cookie"]
        token = wire.parse_attest_response(r.content)
        assert token.exp is not None
        # the cookie alone is enough, and so is the bearer token alone
        c.cookies.clear()
        r1 = c.get(
            "/kbs/v0/resource/default/pgdata/luks", headers={"cookie": f"kbs-session-id={sid}"}
        )
        r2 = c.get(
            "/kbs/v0/resource/default/pgdata/luks", headers={"authorization": f"Bearer {token.raw}"}
        )
        for r in (r1, r2):
            assert r.status_code == 200
            assert set(r.json()) == {"protected", "encrypted_key", "iv", "ciphertext", "tag"}
            with decrypt_resource(r.json(), key) as s:
                assert s.equals(b"k" * 32)


def test_version_check_is_exact(kbs: LoopbackKbs) -> None:
    with httpx.Client(base_url=kbs.url) as c:
        for version in ("0.3.0", "0.4.1", "0.4"):
            r = c.post(
                "/kbs/v0/auth",
                content=wire.request_body("sample").replace(b"0.4.0", version.encode()),
            )
            assert _error(r) == (
                401,
                "AttestationError",
                "Attestation error: RCAR handshake Auth failed: KBS Client Protocol Version "
                f"Mismatch: expect =0.4.0 while the request is {version}",
            )


def test_binding_covers_the_reserialized_jwk(kbs: LoopbackKbs) -> None:
    """SPEC §a.5 pitfall: extra JWK members are dropped by the KBS before it hashes."""
    key = generate_tee_key()
    with httpx.Client(base_url=kbs.url) as c:
        sid, nonce = _auth(c)
        extra = {**key.jwk, "use": "enc"}
        r = _attest(c, sid, nonce, extra, hashed_jwk=extra)  # client hashed what it sent
        assert _error(r)[:2] == (401, "AttestationError") and "report_data" in _error(r)[2]
        sid, nonce = _auth(c)
        assert _attest(c, sid, nonce, extra, hashed_jwk=key.jwk).status_code == 200


def test_nonce_and_session_are_checked(kbs: LoopbackKbs) -> None:
    key = generate_tee_key()
    with httpx.Client(base_url=kbs.url) as c:
        sid, nonce = _auth(c)
        other = base64.b64encode(b"\1" * 32).decode()
        body = _attest(c, sid, other, key.jwk)
        assert _error(body)[2].endswith("nonce mismatch")
        r = _attest(c, "0" * 32, nonce, key.jwk)
        assert _error(r)[2].endswith("session not found")
        c.cookies.clear()
        r = c.get("/kbs/v0/resource/default/pgdata/luks")
        assert _error(r) == (401, "TokenNotFound", "Attestation Token not found")
        r = c.get("/kbs/v0/resource/default/pgdata/luks", headers={"authorization": "Bearer a.b.c"})
        assert _error(r) == (401, "TokenVerifierError", "Token Verifier error")


def test_paths_plugins_and_missing(kbs: LoopbackKbs) -> None:
    key = generate_tee_key()
    with httpx.Client(base_url=kbs.url) as c:
        sid, nonce = _auth(c)
        assert _attest(c, sid, nonce, key.jwk).status_code == 200
        c.cookies.set("kbs-session-id", sid)
        assert _error(c.get("/kbs/v0/resource/a/b"))[:2] == (404, "InvalidRequestPath")
        assert _error(c.get("/kbs/v0/nope/a/b/c"))[:2] == (404, "PluginNotFound")
        assert _error(c.get("/kbs/v0/resource/a/b/c")) == (
            401,
            "PluginInternalError",
            "Plugin internal error",
        )
        kbs.deny(KEY)
        assert _error(c.get("/kbs/v0/resource/default/pgdata/luks")) == (
            401,
            "PolicyDeny",
            "Access denied by policy",
        )


def test_initdata_checks(kbs: LoopbackKbs) -> None:
    key = generate_tee_key()
    text = 'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n'
    with httpx.Client(base_url=kbs.url) as c:
        sid, nonce = _auth(c)
        r = _attest(c, sid, nonce, key.jwk, **{"init-data": {"format": "json", "body": "{}"}})
        assert "Unsupported initdata format" in _error(r)[2]
        sid, nonce = _auth(c)
        kbs.expected_initdata_digest = hashlib.sha256(text.encode()).digest()
        assert _attest(c, sid, nonce, key.jwk, initdata=text).status_code == 200
        sid, nonce = _auth(c)
        r = _attest(c, sid, nonce, key.jwk, initdata=text + "\n")  # one byte more: other digest
        assert "reference value" in _error(r)[2]


def test_resource_keys() -> None:
    assert resource_key("kbs:///a/b/c") == "resource/a/b/c"
    assert resource_key("kbs://host:8080/a/b/c") == "resource/a/b/c"
    assert resource_key("kbs+pkcs11:///a/b/c") == "pkcs11/a/b/c"
    with pytest.raises(ValueError):
        resource_key("kbs:///a/b")


def test_tpm_verifier_accepts_trustees_vector(vectors: Path) -> None:
    evidence = json.loads((vectors / "tpm" / "trustee_tpm_evidence.json").read_text())
    m = _Reader(base64.b64decode(evidence["tpm_quote"]["message"]))
    m.u32(), m.u16(), m.tpm2b()
    extra = m.tpm2b()
    assert verify_tpm_evidence(evidence, extra, None) is None
    assert "extraData" in (verify_tpm_evidence(evidence, b"x" * 32, None) or "")
    tampered = json.loads(json.dumps(evidence))
    tampered["tpm_quote"]["pcrs"][3] = "ff" * 32
    assert "PCR digest" in (verify_tpm_evidence(tampered, extra, None) or "")
    sig = bytearray(base64.b64decode(evidence["tpm_quote"]["signature"]))
    sig[-1] ^= 1
    tampered = json.loads(json.dumps(evidence))
    tampered["tpm_quote"]["signature"] = base64.b64encode(bytes(sig)).decode()
    assert "signature" in (verify_tpm_evidence(tampered, extra, None) or "")
    assert "PCR8" in (verify_tpm_evidence(evidence, extra, b"\0" * 32) or "")
    assert verify_tpm_evidence({"tpm_quote": 5}, extra, None) is not None
