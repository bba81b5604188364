"""A loopback Trustee KBS: the server side of RCAR protocol 0.4.0, as Trustee does it (SPEC §a).

A test peer, not a product. It implements what a real Trustee (KBS + builtin CoCo AS) checks:
the exact protocol version, the `kbs-session-id` cookie, a fresh 32-byte nonce per session, the
JCS/SHA-384 runtime-data binding over the *re-serialized* tee-pubkey (extra JWK members dropped,
as Trustee's serde does), `sample` and `tpm` evidence (TPM quote signature, PCR digest, extraData,
PCR8 vs init-data), the init-data digest, a signed token whose `tee-pubkey` claim is what the
resource is wrapped for, a JWE for every key type (encrypted with joserfc, independently of the
client's decoder), Trustee's error bodies and status codes (404 only for a bad path / unknown
plugin, 401 for everything else), a per-resource policy, and fault injection.

    with LoopbackKbs({"kbs:///default/key/one": b"..."}) as kbs:
        kbs.url; kbs.requests; kbs.inject(Fault("resource", "status", status=503))

    python -m tests.kbs.server --port 0 --resource kbs:///r/t/g=HEX ...   # prints its URL
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import re
import secrets
import socket
import ssl
import struct
import sys
import threading
import time
import tomllib
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joserfc import jwe, jwt
from joserfc.jwk import ECKey, RSAKey

from tests.kbs.tpm_quote import verify_tpm_evidence

VERSION = "0.4.0"
ERROR_PREFIX = "https://github.com/confidential-containers/kbs/errors/"
SEGMENT = re.compile(r"[a-zA-Z0-9_\-]+[a-zA-Z0-9_\-.]*")
URI = re.compile(r"kbs(?:\+([a-z0-9_\-]+))?://[^/]*/([^/?]+)/([^/?]+)/([^/?]+)")
TOKEN_PUBKEY_PATH = ("submods", "cpu0", "ear.veraison.annotated-evidence", "runtime_data_claims")
MAX_BODY = 1024 * 1024
JSON = dict[str, Any]


def resource_key(uri: str) -> str:
    """`kbs:///r/t/g` -> `resource/r/t/g`; `kbs+plugin:///r/t/g` -> `plugin/r/t/g`."""
    m = URI.fullmatch(uri)
    if not m:
        raise ValueError(f"not a kbs:// resource URI: {uri!r}")
    return "/".join((m.group(1) or "resource", *m.group(2, 3, 4)))


@dataclass
class Fault:
    """One injected misbehaviour for the next `times` requests to `endpoint`.

    endpoint: "auth" | "attest" | "resource" (any plugin) | "*".
    kind: "status" (answer `status` + `body`), "body" (answer 200 + raw `body`), "reset"
    (TCP RST, no answer), "slow" (sleep `delay`, then answer normally), "jwe" (answer normally
    but pass the JWE dict through `mutate` first).
    """

    endpoint: str
    kind: str
    times: int = 1
    status: int = 503
    body: bytes = b"Service Unavailable"
    delay: float = 0.0
    mutate: Callable[[JSON], JSON] | None = None

    @classmethod
    def corrupt_jwe(cls, times: int = 1) -> Fault:
        """Flip one ciphertext bit of the next resource answer(s): the GCM tag must fail."""

        def flip(jwe_obj: JSON) -> JSON:
            raw = bytearray(base64.urlsafe_b64decode(jwe_obj["ciphertext"] + "=="))
            raw[0] ^= 1
            text = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
            return {**jwe_obj, "ciphertext": text}

        return cls("resource", "jwe", times=times, mutate=flip)


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    status: int  # 0 = connection reset by fault
    connection: int


@dataclass
class _Session:
    nonce: str
    tee: str
    expires: float
    token: str | None = None


class KbsProblem(Exception):
    """A Trustee error answer: status, variant, detail."""

    def __init__(self, status: int, variant: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.variant, self.detail = status, variant, detail


def _attest_error(stage: str, why: str) -> KbsProblem:
    return KbsProblem(
        401, "AttestationError", f"Attestation error: RCAR handshake {stage} failed: {why}"
    )


@dataclass
class LoopbackKbs:
    """The test KBS. `resources` maps kbs:// URIs to bytes; `policy` maps URIs to allowed TEEs."""

    resources: Mapping[str, bytes] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    tls: tuple[str, str] | None = None  # (cert PEM path, key PEM path)
    expected_version: str = VERSION
    token_lifetime: float = 300.0
    session_lifetime: float = 300.0
    expected_initdata_digest: bytes | None = None
    tees: frozenset[str] = frozenset({"sample", "tpm"})
    requests: list[RequestRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._store: dict[str, bytes] = {
            resource_key(u): bytes(v) for u, v in self.resources.items()
        }
        self._policy: dict[str, frozenset[str]] = {}
        self._sessions: dict[str, _Session] = {}
        self._revoked: set[str] = set()
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._signing_key = ECKey.generate_key("P-256")
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.last_attestation: JSON | None = None

    # -- control ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the KBS first"
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self._server.server_address[1]}"

    def start(self) -> LoopbackKbs:
        server = _Server((self.host, self.port), _Handler)
        server.daemon_threads = True
        server.kbs = self  # type: ignore[attr-defined]
        if self.tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*self.tls)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LoopbackKbs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_resource(self, uri: str, data: bytes) -> None:
        with self._lock:
            self._store[resource_key(uri)] = bytes(data)

    def allow_only(self, uri: str, tees: set[str] | frozenset[str]) -> None:
        """Per-resource policy: only these TEEs may read `uri` (empty = deny everyone)."""
        with self._lock:
            self._policy[resource_key(uri)] = frozenset(tees)

    def deny(self, uri: str) -> None:
        self.allow_only(uri, frozenset())

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def expire_sessions(self) -> None:
        """Server-side expiry of every session and token issued so far (Trustee's timeout)."""
        with self._lock:
            for _sid, s in self._sessions.items():
                s.expires = 0.0
                if s.token:
                    self._revoked.add(s.token)
            self._sessions = {k: v for k, v in self._sessions.items() if v.expires > 0}

    def count(self, endpoint: str) -> int:
        return sum(1 for r in self.requests if _endpoint(r.path) == endpoint)

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def _take_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.endpoint in (endpoint, "*") and f.times > 0:
                    f.times -= 1
                    if f.times == 0:
                        self._faults.remove(f)
                    return f
        return None

    # -- protocol -----------------------------------------------------------------------------

    def handle_auth(self, body: bytes) -> tuple[JSON, str]:
        req = _json(body)
        version = req.get("version")
        if version != self.expected_version:
            raise _attest_error(
                "Auth",
                f"KBS Client Protocol Version Mismatch: expect ={self.expected_version} "
                f"while the request is {version}",
            )
        tee = req.get("tee")
        if not isinstance(tee, str) or tee not in self.tees:
            raise _attest_error("Auth", f"unsupported TEE {tee!r}")
        sid = uuid.uuid4().hex
        nonce = base64.b64encode(secrets.token_bytes(32)).decode()
        with self._lock:
            self._sessions[sid] = _Session(nonce, tee, time.time() + self.session_lifetime)
        return {"nonce": nonce, "extra-params": ""}, sid

    def _session(self, sid: str | None) -> _Session | None:
        with self._lock:
            s = self._sessions.get(sid or "")
            if s is not None and s.expires <= time.time():
                del self._sessions[sid or ""]
                return None
            return s

    def handle_attest(self, sid: str | None, body: bytes) -> JSON:
        session = self._session(sid)
        if session is None:
            raise _attest_error("Attest", "session not found")
        att = _json(body)
        self.last_attestation = att
        rd, ev = att.get("runtime-data"), att.get("tee-evidence")
        if not isinstance(rd, dict) or not isinstance(ev, dict):
            raise KbsProblem(401, "SerdeError", "Serialize/Deserialize failed")
        if rd.get("nonce") != session.nonce:
            raise _attest_error("Attest", "nonce mismatch")
        pubkey = _reserialize_tee_pubkey(rd.get("tee-pubkey"))
        additional = ev.get("additional_evidence", "")
        if not isinstance(additional, str):
            raise KbsProblem(401, "SerdeError", "Serialize/Deserialize failed")
        canon = {"tee-pubkey": pubkey, "nonce": session.nonce, "additional-evidence": additional}
        digest = hashlib.sha384(
            json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
        ).digest()
        initdata_digest = self._check_initdata(att.get("init-data"))
        why = self._verify_evidence(
            session.tee, ev.get("primary_evidence"), digest, initdata_digest
        )
        if why:
            raise _attest_error("Attest", f"Verifier evaluate failed: {why}")
        now = int(time.time())
        annotated = {
            session.tee: {"verified": True},
            "runtime_data_claims": {"tee-pubkey": pubkey, "nonce": session.nonce},
            "init_data": initdata_digest.hex() if initdata_digest else None,
        }
        claims = {
            "iat": now,
            "nbf": now,
            "exp": now + int(self.token_lifetime),
            "tee": session.tee,
            "submods": {"cpu0": {"ear.veraison.annotated-evidence": annotated}},
        }
        token = jwt.encode({"alg": "ES256"}, claims, self._signing_key)
        with self._lock:
            session.token = token
        return {"token": token}

    def _check_initdata(self, init: Any) -> bytes | None:
        if init is None:
            return None
        if not isinstance(init, dict) or init.get("format") != "toml":
            raise _attest_error("Attest", "Unsupported initdata format")
        text = init.get("body")
        try:
            doc = tomllib.loads(text if isinstance(text, str) else "")
            algorithm = doc["algorithm"]
            if algorithm not in ("sha256", "sha384", "sha512"):
                raise ValueError(algorithm)
        except (tomllib.TOMLDecodeError, KeyError, ValueError):
            raise _attest_error("Attest", "parse initdata failed") from None
        digest = hashlib.new(algorithm, text.encode()).digest()  # the raw text, as sent
        if self.expected_initdata_digest is not None and digest != self.expected_initdata_digest:
            raise _attest_error("Attest", "init-data digest is not the registered reference value")
        return digest

    def _verify_evidence(
        self, tee: str, evidence: Any, digest: bytes, initdata_digest: bytes | None
    ) -> str | None:
        if tee == "sample":
            if not isinstance(evidence, dict) or not isinstance(evidence.get("svn"), str):
                return "sample evidence malformed"
            try:
                report_data = base64.b64decode(evidence.get("report_data", ""), validate=True)
            except (binascii.Error, TypeError, ValueError):
                return "sample report_data is not base64"
            return None if report_data == digest else "sample report_data != runtime-data digest"
        if tee == "tpm":
            return verify_tpm_evidence(evidence, digest[:32], initdata_digest)
        return f"no verifier for {tee}"

    def handle_resource(self, key: str, sid: str | None, bearer: str | None) -> JSON:
        plugin, *segments = key.split("/")
        if len(segments) != 3 or not all(SEGMENT.fullmatch(s) for s in segments):
            raise KbsProblem(404, "InvalidRequestPath", f"Request path {key} is invalid")
        claims = self._claims(sid, bearer)
        with self._lock:
            allowed = self._policy.get(key)
            data = self._store.get(key)
            plugins = {k.split("/")[0] for k in self._store} | {"resource"}
        if plugin not in plugins:
            raise KbsProblem(404, "PluginNotFound", f"Plugin {plugin} not found")
        if allowed is not None and claims.get("tee") not in allowed:
            raise KbsProblem(401, "PolicyDeny", "Access denied by policy")
        if data is None:
            raise KbsProblem(401, "PluginInternalError", "Plugin internal error")
        node: Any = claims
        for part in TOKEN_PUBKEY_PATH:
            node = node[part]
        return _wrap(data, node["tee-pubkey"])

    def _claims(self, sid: str | None, bearer: str | None) -> JSON:
        session = self._session(sid)
        token = session.token if session is not None and session.token else bearer
        if token is None:
            raise KbsProblem(401, "TokenNotFound", "Attestation Token not found")
        try:
            claims = dict(jwt.decode(token, self._signing_key, algorithms=["ES256"]).claims)
        except Exception:
            raise KbsProblem(401, "TokenVerifierError", "Token Verifier error") from None
        if token in self._revoked or claims.get("exp", 0) <= time.time():
            raise KbsProblem(401, "TokenVerifierError", "Token Verifier error")
        return claims


def _json(body: bytes) -> JSON:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise KbsProblem(401, "SerdeError", "Serialize/Deserialize failed") from None
    if not isinstance(value, dict):
        raise KbsProblem(401, "SerdeError", "Serialize/Deserialize failed")
    return value


def _reserialize_tee_pubkey(jwk: Any) -> JSON:
    """KT `TeePubKey` (tagged by kty): exactly these members survive, in struct order."""
    members = {"EC": ("kty", "crv", "alg", "x", "y"), "RSA": ("kty", "alg", "n", "e")}
    if not isinstance(jwk, dict) or jwk.get("kty") not in members:
        raise KbsProblem(401, "SerdeError", "Serialize/Deserialize failed")
    names = members[jwk["kty"]]
    if not all(isinstance(jwk.get(n), str) for n in names):
        raise KbsProblem(401, "SerdeError", "Serialize/Deserialize failed")
    return {n: jwk[n] for n in names}


def _wrap(data: bytes, tee_pubkey: JSON) -> JSON:
    """Trustee's resource JWE (flattened JSON, AAD = protected) for the attested key."""
    alg = tee_pubkey["alg"]
    key: ECKey | RSAKey
    if tee_pubkey["kty"] == "EC":
        if (tee_pubkey["crv"], alg) not in (
            ("P-256", "ECDH-ES+A256KW"),
            ("P-521", "ECDH-ES+A256KW"),
        ):
            raise KbsProblem(401, "JweError", "JWE failed")
        key = ECKey.import_key({k: v for k, v in tee_pubkey.items() if k != "alg"})
    else:
        if alg not in ("RSA-OAEP-256", "RSA1_5"):
            raise KbsProblem(401, "JweError", "JWE failed")
        key = RSAKey.import_key({k: v for k, v in tee_pubkey.items() if k != "alg"})
    with warnings.catch_warnings():  # joserfc flags RSA1_5 as deprecated; Trustee still serves it
        warnings.simplefilter("ignore")
        compact = jwe.encrypt_compact(
            {"alg": alg, "enc": "A256GCM"}, data, key, algorithms=[alg, "A256GCM"]
        )
    protected, encrypted_key, iv, ciphertext, tag = compact.split(".")
    return {
        "protected": protected,
        "encrypted_key": encrypted_key,
        "iv": iv,
        "ciphertext": ciphertext,
        "tag": tag,
    }


def _endpoint(path: str) -> str:
    rest = path.split("?", maxsplit=1)[0].removeprefix("/kbs/v0/")
    head = rest.split("/")[0]
    return head if head in ("auth", "attest") else "resource"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a client opening its connection pool at once
    # (16 connections) overflowed it and waited a SYN retransmit (~1 s). Trustee's server
    # (actix) listens with a backlog of 2048.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Peers that hang up (resets, TLS refusals, timeouts) are normal here: stay quiet."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "loopback-kbs"

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without NODELAY, Nagle + delayed ACK
        # would add ~40 ms to every keep-alive answer
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: the request log is `kbs.requests`

    @property
    def kbs(self) -> LoopbackKbs:
        return self.server.kbs  # type: ignore[attr-defined,no-any-return]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY:
            self._answer(method, 413, b"payload too large", close=True)
            return
        body = self.rfile.read(length)
        endpoint = _endpoint(self.path)
        fault = self.kbs._take_fault(endpoint)
        if fault is not None:
            if fault.kind == "reset":
                self._record(method, 0)
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()
                return
            if fault.kind == "status":
                self._answer(method, fault.status, fault.body)
                return
            if fault.kind == "body":
                self._answer(method, 200, fault.body)
                return
            if fault.kind == "slow":
                time.sleep(fault.delay)
        cookies: dict[str, str] = {}
        for part in (self.headers.get("cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            cookies[name] = value
        sid = cookies.get("kbs-session-id")
        auth = self.headers.get("authorization") or ""
        bearer = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        set_cookie = None
        try:
            path = self.path.split("?")[0]
            if not path.startswith("/kbs/v0/"):
                raise KbsProblem(404, "InvalidRequestPath", f"Request path {path} is invalid")
            if endpoint == "auth" and method == "POST":
                answer, new_sid = self.kbs.handle_auth(body)
                set_cookie = new_sid
            elif endpoint == "attest" and method == "POST":
                answer = self.kbs.handle_attest(sid, body)
                set_cookie = sid
            elif endpoint == "resource" and method == "GET":
                answer = self.kbs.handle_resource(path.removeprefix("/kbs/v0/"), sid, bearer)
                if fault is not None and fault.kind == "jwe" and fault.mutate is not None:
                    answer = fault.mutate(answer)
            else:
                raise KbsProblem(404, "InvalidRequestPath", f"Request path {path} is invalid")
        except KbsProblem as p:
            info = {"type": ERROR_PREFIX + p.variant, "detail": p.detail}
            self._answer(method, p.status, json.dumps(info).encode())
            return
        extra = {}
        if set_cookie:
            expires = formatdate(time.time() + self.kbs.session_lifetime, usegmt=True)
            extra["Set-Cookie"] = f"kbs-session-id={set_cookie}; Expires={expires}"
        self._answer(method, 200, json.dumps(answer).encode(), extra)

    def _record(self, method: str, status: int) -> None:
        with self.kbs._lock:
            self.kbs.requests.append(RequestRecord(method, self.path, status, id(self.connection)))

    def _answer(
        self,
        method: str,
        status: int,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        close: bool = False,
    ) -> None:
        self._record(method, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.kbs.server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--resource", action="append", default=[], metavar="URI=HEX")
    parser.add_argument("--deny", action="append", default=[], metavar="URI")
    parser.add_argument("--cert", help="serve https with this PEM certificate (needs --key)")
    parser.add_argument("--key", help="PEM private key for --cert")
    args = parser.parse_args(argv)
    resources: dict[str, bytes] = {}
    for item in args.resource:
        uri, sep, hexdata = item.partition("=")
        if not sep:
            parser.error(f"--resource wants URI=HEX, got {item!r}")
        try:
            resource_key(uri)
            resources[uri] = bytes.fromhex(hexdata)
        except ValueError as exc:
            parser.error(str(exc))
    tls = (args.cert, args.key) if args.cert and args.key else None
    kbs = LoopbackKbs(resources, host=args.host, port=args.port, tls=tls)
    for uri in args.deny:
        kbs.deny(uri)
    kbs.start()
    print(kbs.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        kbs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
