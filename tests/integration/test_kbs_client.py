"""agent.kbs.client.KbsClient against the loopback Trustee KBS: sessions, faults, TLS, hostile
answers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from agent.kbs.client import (
    AttestationFailed,
    JweError,
    KbsClient,
    KbsError,
    KbsProtocolError,
    KbsTlsError,
    KbsUnavailable,
    PolicyDenied,
    ProtocolMismatch,
    ResourceNotFound,
)
from agent.kbs.jwe import KEY_ALGORITHMS
from agent.kbs.wire import b64url
from tests.kbs.fixtures import kbs_uri, sample_attester
from tests.kbs.server import Fault, LoopbackKbs
from tests.tls import make_test_tls

KEY = "kbs:///default/pgdata/luks"
SECRET = b"S3CR3T-" + bytes(range(48, 73))  # 32 bytes, printable, greppable


def client(kbs: LoopbackKbs, **kw: Any) -> KbsClient:
    kw.setdefault("deadline", 10.0)
    kw.setdefault("backoff_base", 0.01)
    return KbsClient(kbs.url, attester=kw.pop("attester", sample_attester()), **kw)


async def fetch(kbs: LoopbackKbs, uri: str = KEY, **kw: Any) -> bytes:
    async with client(kbs, **kw) as c:
        with await c.get_resource(kbs_uri(uri)) as s:
            return bytes(s.data)


def paths(kbs: LoopbackKbs) -> list[tuple[str, int]]:
    return [(r.path.removeprefix("/kbs/v0/"), r.status) for r in kbs.requests]


@pytest.fixture
def kbs(loopback_kbs: LoopbackKbs) -> LoopbackKbs:
    loopback_kbs.add_resource(KEY, SECRET)
    return loopback_kbs


# -- happy paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", KEY_ALGORITHMS)
async def test_round_trip_every_key_type_sample(kbs: LoopbackKbs, alg: str) -> None:
    assert await fetch(kbs, key_algorithm=alg) == SECRET
    assert paths(kbs) == [("auth", 200), ("attest", 200), ("resource/default/pgdata/luks", 200)]
    sent = kbs.last_attestation
    assert sent is not None and sent["init-data"] is None
    assert sent["tee-evidence"]["additional_evidence"] == ""


@pytest.mark.parametrize("n", [1, 8])
async def test_n_resources_cost_two_plus_n_requests_on_one_connection(
    loopback_kbs: LoopbackKbs, n: int
) -> None:
    for i in range(n):
        loopback_kbs.add_resource(f"kbs:///default/vol/k{i}", bytes([i]) * 32)
    async with client(loopback_kbs) as c:
        for i in range(n):
            with await c.get_resource(kbs_uri(f"kbs:///default/vol/k{i}")) as s:
                assert s.equals(bytes([i]) * 32)
    assert len(loopback_kbs.requests) == 2 + n
    assert len({r.connection for r in loopback_kbs.requests}) == 1  # kept alive


async def test_single_flight_under_16_concurrent_callers(loopback_kbs: LoopbackKbs) -> None:
    for i in range(16):
        loopback_kbs.add_resource(f"kbs:///default/vol/k{i}", bytes([i]) * 32)
    loopback_kbs.inject(Fault("attest", "slow", delay=0.2))  # keep the handshake in flight
    async with client(loopback_kbs) as c:
        secrets_ = await asyncio.gather(
            *(c.get_resource(kbs_uri(f"kbs:///default/vol/k{i}")) for i in range(16))
        )
    assert [s.equals(bytes([i]) * 32) for i, s in enumerate(secrets_)] == [True] * 16
    assert loopback_kbs.count("auth") == 1 and loopback_kbs.count("attest") == 1
    assert loopback_kbs.count("resource") == 16


async def test_plugin_uri(kbs: LoopbackKbs) -> None:
    kbs.add_resource("kbs+pkcs11:///repo/key/one", b"p" * 32)
    assert await fetch(kbs, "kbs+pkcs11:///repo/key/one") == b"p" * 32
    assert kbs.requests[-1].path == "/kbs/v0/pkcs11/repo/key/one"


async def test_initdata_is_sent_verbatim_and_checked(kbs: LoopbackKbs) -> None:
    text = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"cva.toml\" = '''x'''\n"

    class Init:
        def text(self) -> str:
            return text

    kbs.expected_initdata_digest = hashlib.sha384(text.encode()).digest()
    assert await fetch(kbs, initdata=Init()) == SECRET
    assert kbs.last_attestation is not None
    assert kbs.last_attestation["init-data"] == {"format": "toml", "body": text}
    kbs.expected_initdata_digest = hashlib.sha384(b"another document").digest()
    with pytest.raises(AttestationFailed, match="init-data digest"):
        await fetch(kbs, initdata=Init())


# -- token lifetime and re-attestation ----------------------------------------------------------


async def test_reattests_after_server_side_expiry(kbs: LoopbackKbs) -> None:
    async with client(kbs) as c:
        (await c.get_resource(kbs_uri(KEY))).wipe()
        kbs.expire_sessions()
        with await c.get_resource(kbs_uri(KEY)) as s:
            assert s.equals(SECRET)
    assert paths(kbs) == [
        ("auth", 200),
        ("attest", 200),
        ("resource/default/pgdata/luks", 200),
        ("resource/default/pgdata/luks", 401),
        ("auth", 200),
        ("attest", 200),
        ("resource/default/pgdata/luks", 200),
    ]


async def test_second_401_is_terminal(kbs: LoopbackKbs) -> None:
    body = json.dumps(
        {
            "type": "https://github.com/confidential-containers/kbs/errors/TokenVerifierError",
            "detail": "Token Verifier error",
        }
    ).encode()
    kbs.inject(Fault("resource", "status", times=5, status=401, body=body))
    with pytest.raises(AttestationFailed, match="even after re-attesting"):
        await fetch(kbs)
    assert kbs.count("auth") == 2 and kbs.count("resource") == 2


async def test_reattests_when_the_token_expires_by_the_clock(kbs: LoopbackKbs) -> None:
    base = time.time()
    now = [base]
    kbs.token_lifetime = 600
    async with client(kbs, clock=lambda: now[0], token_skew=10) as c:
        (await c.get_resource(kbs_uri(KEY))).wipe()
        now[0] = base + 300
        (await c.get_resource(kbs_uri(KEY))).wipe()
        assert kbs.count("auth") == 1
        now[0] = base + 595  # inside the skew margin before exp: renew proactively
        kbs.token_lifetime = 10_000
        (await c.get_resource(kbs_uri(KEY))).wipe()
    assert kbs.count("auth") == 2 and kbs.count("resource") == 3
    assert all(status == 200 for _, status in paths(kbs))


async def test_session_state_for_cva_status(kbs: LoopbackKbs) -> None:
    base = time.time()
    now = [base]
    kbs.token_lifetime = 600
    async with client(kbs, clock=lambda: now[0], token_skew=10) as c:
        assert c.session_state() == ("none", None)
        (await c.get_resource(kbs_uri(KEY))).wipe()
        state, expires = c.session_state()
        assert state == "attested" and expires is not None and base < expires <= base + 700
        now[0] = base + 1000
        assert c.session_state() == ("expired", expires)


async def test_token_already_expired_is_refused(kbs: LoopbackKbs) -> None:
    kbs.token_lifetime = 5  # shorter than the client's skew margin
    with pytest.raises(AttestationFailed, match="already expired"):
        await fetch(kbs, token_skew=10)


# -- transient faults ---------------------------------------------------------------------------


async def test_retries_through_503s(kbs: LoopbackKbs) -> None:
    kbs.inject(Fault("auth", "status", times=2), Fault("resource", "status", times=2, status=502))
    assert await fetch(kbs) == SECRET
    assert [s for _, s in paths(kbs)] == [503, 503, 200, 200, 502, 502, 200]


async def test_retries_through_resets(kbs: LoopbackKbs) -> None:
    kbs.inject(Fault("attest", "reset"), Fault("resource", "reset", times=2))
    assert await fetch(kbs) == SECRET
    assert [s for _, s in paths(kbs)] == [200, 0, 200, 200, 0, 0, 200]


async def test_retries_after_a_slow_answer(kbs: LoopbackKbs) -> None:
    kbs.inject(Fault("resource", "slow", delay=1.0))
    assert await fetch(kbs, read_timeout=0.3) == SECRET
    await asyncio.sleep(1.0)  # let the slow handler finish and log its (unread) answer
    assert kbs.count("resource") == 2


async def test_deadline_names_the_last_cause(kbs: LoopbackKbs) -> None:
    kbs.inject(Fault("resource", "status", times=1000, status=503))
    with pytest.raises(KbsUnavailable) as info:
        await fetch(kbs, deadline=1.0, backoff_base=0.05)
    msg = info.value.message
    assert "fetching kbs:///default/pgdata/luks" in msg and "HTTP 503" in msg, msg


async def test_unreachable_kbs(unused_tcp_port: int) -> None:
    c = KbsClient(
        f"http://127.0.0.1:{unused_tcp_port}",
        attester=sample_attester(),
        deadline=0.5,
        backoff_base=0.02,
    )
    async with c:
        with pytest.raises(KbsUnavailable, match="ConnectError"):
            await c.get_resource(kbs_uri(KEY))


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- terminal faults ----------------------------------------------------------------------------


async def test_version_mismatch(kbs: LoopbackKbs) -> None:
    kbs.expected_version = "0.3.0"
    with pytest.raises(ProtocolMismatch, match=r"^protocol version mismatch: KBS expects =0\.3\.0"):
        await fetch(kbs)
    assert len(kbs.requests) == 1


async def test_policy_deny_is_terminal_without_reattesting(kbs: LoopbackKbs) -> None:
    kbs.deny(KEY)
    with pytest.raises(PolicyDenied) as info:
        await fetch(kbs)
    assert info.value.message.startswith(
        "KBS policy denied kbs:///default/pgdata/luks (401 PolicyDeny): Access denied by policy"
    )
    assert len(kbs.requests) == 3


async def test_per_resource_policy_by_tee(kbs: LoopbackKbs) -> None:
    kbs.allow_only(KEY, {"tpm"})
    with pytest.raises(PolicyDenied):
        await fetch(kbs)
    kbs.allow_only(KEY, {"sample"})
    assert await fetch(kbs) == SECRET


async def test_missing_resource(kbs: LoopbackKbs) -> None:
    with pytest.raises(ResourceNotFound, match="kbs:///default/pgdata/nope"):
        await fetch(kbs, "kbs:///default/pgdata/nope")
    assert len(kbs.requests) == 3


async def test_unknown_plugin(kbs: LoopbackKbs) -> None:
    with pytest.raises(ResourceNotFound, match="404 PluginNotFound"):
        await fetch(kbs, "kbs+nope:///a/b/c")


async def test_attestation_failure(kbs: LoopbackKbs) -> None:
    class LyingAttester:
        tee = "sample"

        def evidence(self, report_data: bytes) -> dict[str, Any]:
            return {"svn": "1", "report_data": base64.b64encode(b"\0" * 48).decode()}

        def initdata_binding(self) -> bytes | None:
            return None

    with pytest.raises(AttestationFailed, match=r"/attest \(401 AttestationError\)"):
        await fetch(kbs, attester=LyingAttester())


async def test_unsupported_tee(kbs: LoopbackKbs) -> None:
    class TdxAttester:
        tee = "tdx"

        def evidence(self, report_data: bytes) -> dict[str, Any]:
            return {"quote": "", "cc_eventlog": None}

        def initdata_binding(self) -> bytes | None:
            return None

    with pytest.raises(AttestationFailed, match=r"/auth"):
        await fetch(kbs, attester=TdxAttester())


async def test_corrupted_jwe(kbs: LoopbackKbs) -> None:
    kbs.inject(Fault.corrupt_jwe())
    with pytest.raises(JweError, match="tag mismatch"):
        await fetch(kbs)


# -- hostile answers ----------------------------------------------------------------------------


def _header_swap(**changes: Any) -> Any:
    def mutate(jwe: dict[str, Any]) -> dict[str, Any]:
        h = json.loads(base64.urlsafe_b64decode(jwe["protected"] + "=="))
        for k, v in changes.items():
            h[k] = v(h) if callable(v) else v
        return {**jwe, "protected": b64url(json.dumps(h).encode())}

    return mutate


def _off_curve(h: dict[str, Any]) -> dict[str, Any]:
    y = bytearray(base64.urlsafe_b64decode(h["epk"]["y"] + "=="))
    y[5] ^= 0xFF
    return {**h["epk"], "y": b64url(bytes(y))}


HOSTILE: dict[str, tuple[Fault, type[KbsError], str]] = {
    "auth non-JSON": (
        Fault("auth", "body", body=b"<html>hello</html>"),
        KbsProtocolError,
        "not JSON",
    ),
    "auth wrong types": (Fault("auth", "body", body=b'{"nonce": 5}'), KbsProtocolError, "nonce"),
    "auth wrong-size nonce": (
        Fault(
            "auth",
            "body",
            body=json.dumps(
                {"nonce": base64.b64encode(b"n" * 16).decode(), "extra-params": ""}
            ).encode(),
        ),
        KbsProtocolError,
        "16 bytes",
    ),
    "auth no cookie": (
        Fault(
            "auth",
            "body",
            body=json.dumps(
                {"nonce": base64.b64encode(b"n" * 32).decode(), "extra-params": ""}
            ).encode(),
        ),
        KbsProtocolError,
        "cookie",
    ),
    "attest token a number": (
        Fault("attest", "body", body=b'{"token": 7}'),
        KbsProtocolError,
        "JWT",
    ),
    "huge resource body": (
        Fault("resource", "body", body=b"x" * (2 * 1024 * 1024)),
        KbsProtocolError,
        "cap",
    ),
    "huge error body": (
        Fault("auth", "status", status=401, body=b"{" * (3 * 1024 * 1024)),
        KbsProtocolError,
        "cap",
    ),
    "resource a list": (
        Fault("resource", "body", body=b"[1,2]"),
        KbsProtocolError,
        "not an object",
    ),
    "jwe another alg": (
        Fault("resource", "jwe", mutate=_header_swap(alg="A256KW")),
        JweError,
        "alg",
    ),
    "jwe another enc": (
        Fault("resource", "jwe", mutate=_header_swap(enc="A128GCM")),
        JweError,
        "enc",
    ),
    "jwe epk off curve": (
        Fault("resource", "jwe", mutate=_header_swap(epk=_off_curve)),
        JweError,
        "not a point",
    ),
    "jwe truncated tag": (
        Fault("resource", "jwe", mutate=lambda j: {**j, "tag": j["tag"][:16]}),
        JweError,
        "tag",
    ),
    "redirect": (Fault("resource", "status", status=302, body=b""), KbsProtocolError, "302"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_answers_are_clean_errors(kbs: LoopbackKbs, name: str) -> None:
    fault, error, words = HOSTILE[name]
    kbs.inject(fault)
    with pytest.raises(error, match=words) as info:
        await fetch(kbs)
    assert "\n" not in info.value.message
    assert SECRET.decode()[:8] not in info.value.message


# -- transport security -------------------------------------------------------------------------


def _ca_and_leaf(tmp: Path, name: str) -> tuple[str, Path, Path]:
    """A self-signed CA and a 127.0.0.1 server certificate it signed (PEM paths)."""
    tls = make_test_tls(tmp, "127.0.0.1", name=name)
    return tls.ca_pem, tls.cert, tls.key


@pytest.fixture
def tls_kbs(tmp_path: Path) -> Any:
    ca_pem, cert, key = _ca_and_leaf(tmp_path, "kbs")
    other_ca, _, _ = _ca_and_leaf(tmp_path, "other")
    with LoopbackKbs({KEY: SECRET}, tls=(str(cert), str(key))) as kbs:
        yield kbs, ca_pem, other_ca


async def test_https_with_pinned_ca(tls_kbs: Any) -> None:
    kbs, ca_pem, _ = tls_kbs
    assert kbs.url.startswith("https://")
    assert await fetch(kbs, cacert_pem=ca_pem) == SECRET
    assert len(kbs.requests) == 3


async def test_https_refuses_a_wrong_ca(tls_kbs: Any) -> None:
    kbs, _, other_ca = tls_kbs
    with pytest.raises(KbsTlsError, match="certificate"):
        await fetch(kbs, cacert_pem=other_ca)
    assert kbs.requests == []


async def test_https_without_pin_uses_system_store_and_refuses(tls_kbs: Any) -> None:
    kbs, _, _ = tls_kbs
    with pytest.raises(KbsTlsError):
        await fetch(kbs)


def test_bad_pem_is_a_clean_error() -> None:
    with pytest.raises(KbsError, match="PEM"):
        KbsClient("https://127.0.0.1:1", attester=sample_attester(), cacert_pem="garbage")


@pytest.mark.parametrize(
    ("url", "allow", "ok"),
    [
        ("http://kbs.example:8080", False, False),
        ("http://10.0.0.1:8080", False, False),
        ("http://kbs.example:8080", True, True),
        ("http://127.0.0.1:8080", False, True),
        ("http://[::1]:8080", False, True),
        ("http://localhost:8080", False, True),
        ("https://kbs.example:8080", False, True),
        ("ftp://kbs.example", False, False),
        ("https://user:pw@kbs.example", False, False),
        ("https://kbs.example/?q=1", False, False),
        ("not a url", False, False),
    ],
)
def test_url_policy(url: str, allow: bool, ok: bool) -> None:
    if ok:
        KbsClient(url, attester=sample_attester(), allow_http=allow)
    else:
        with pytest.raises(KbsError):
            KbsClient(url, attester=sample_attester(), allow_http=allow)


async def test_resource_never_in_logs(
    kbs: LoopbackKbs, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    kbs.inject(Fault("resource", "status", status=503))
    async with client(kbs) as c:
        s = await c.get_resource(kbs_uri(KEY))
        assert s.equals(SECRET)
        assert SECRET.hex() not in repr(s) and "S3CR3T" not in repr(s)
        s.wipe()
    out, err = capsys.readouterr()
    logged = out + err + caplog.text
    assert "kbs resource fetched" in logged  # the log is captured at all
    for form in (SECRET.decode(), SECRET.hex(), base64.b64encode(SECRET).decode(), "S3CR3T"):
        assert form not in logged


async def test_from_config(kbs: LoopbackKbs) -> None:
    class Config:
        url = kbs.url
        cert = None
        insecure_http = False

    async with KbsClient.from_config(Config(), attester=sample_attester(), deadline=5) as c:
        with await c.get_resource(kbs_uri(KEY)) as s:
            assert s.equals(SECRET)
    Config.url = "http://kbs.example:8080"
    with pytest.raises(KbsError, match="plain http"):
        KbsClient.from_config(Config(), attester=sample_attester())
    Config.insecure_http = True
    KbsClient.from_config(Config(), attester=sample_attester())


async def test_slow_kbs_until_the_deadline_names_the_timeout(kbs: LoopbackKbs) -> None:
    kbs.inject(Fault("auth", "slow", times=100, delay=0.5))
    with pytest.raises(KbsUnavailable, match=r"attesting .* last cause: ReadTimeout"):
        await fetch(kbs, deadline=2.0, read_timeout=0.2)
