"""The KBS client: Trustee's RCAR protocol 0.4.0 (SPEC §a), one attested session for many keys.

`KbsClient.get_resource(uri)` returns the resource bytes as a `Secret`. The first call runs the
handshake (`POST /kbs/v0/auth` -> `POST /kbs/v0/attest`) with a fresh ephemeral TEE key, and the
session (cookie + token) is then reused while the token's `exp`/`nbf` say it is valid (with a
skew margin), so N resources cost 2 + N requests on a kept-alive connection. Concurrent callers
share one in-flight handshake (single flight). A resource 401 that a fresh session may cure
(token or session trouble) re-attests once; a second 401, a policy denial or a missing resource
is terminal. Transient faults (connect errors, resets, timeouts, 5xx/429) are retried with full-
jitter exponential backoff under an overall deadline, and the final error names the last real
cause. Errors are the classes of `agent.kbs.errors` (re-exported here).

Transport: **httpx** rather than aiohttp. Measured here (DEPENDENCIES.md): httpx imports in about a
third of aiohttp's time (51 vs 150 ms; this runs at boot in a small guest), and aiohttp silently
drops the `kbs-session-id` cookie when the KBS is addressed by IP unless given an unsafe cookie
jar. httpx also gives separate connect/read/write/pool timeouts per request, a streaming body we
can cap while reading, `trust_env=False` (no proxy or CA from the host-controlled environment),
and takes a pinned-CA `SSLContext` directly. The cookie is handled by hand anyway: the session
is an explicit object, not ambient jar state.

TLS: with the contract's `cert` the context trusts **only** that PEM (no system store); without it
the system store. Plain `http://` only for a loopback KBS or with `allow_http=True` (the contract's
explicit `insecure_http = true`). Resource bytes are never logged and never in an error message.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from structlog.typing import FilteringBoundLogger

from agent.kbs import wire
from agent.kbs.errors import (
    AttestationFailed,
    JweError,
    KbsError,
    KbsProtocolError,
    KbsTlsError,
    KbsUnavailable,
    PolicyDenied,
    ProtocolMismatch,
    ResourceNotFound,
)
from agent.kbs.jwe import (
    DEFAULT_KEY_ALGORITHM,
    KeyAlgorithm,
    TeeKey,
    decrypt_resource,
    generate_tee_key,
)
from agent.kbs.wire import ResourceRef
from agent.log import get_logger
from evidence.base import Attester
from luks.secret import Secret

__all__ = [
    "AttestationFailed",
    "JweError",
    "KbsClient",
    "KbsError",
    "KbsProtocolError",
    "KbsTlsError",
    "KbsUnavailable",
    "PolicyDenied",
    "ProtocolMismatch",
    "ResourceNotFound",
]


def _log() -> FilteringBoundLogger:
    """The module's logger, fetched per use: `agent.log.get_logger` binds the configuration
    current at call time, and the CLI/daemon configure logging after importing this module."""
    return get_logger("agent.kbs.client")


MAX_RESOURCE_BYTES = 1024 * 1024  # the JWE of one resource (volume keys are 32..64 bytes)
_WAIT_GRACE = 1.0  # seconds a caller waits past its deadline for a shared handshake
DEFAULT_TOKEN_LIFETIME = 300.0  # when a token carries no exp (Trustee's default is 5 min)


class InitDataText(Protocol):
    """What the client needs of `agent.initdata.InitData`: the exact TOML text."""

    def text(self) -> str: ...


class KbsSettings(Protocol):
    """What the client needs of `agent.contract.KbsConfig`."""

    @property
    def url(self) -> str: ...
    @property
    def cert(self) -> str | None: ...
    @property
    def insecure_http(self) -> bool: ...


class _Transient(Exception):
    """A fault worth retrying; `cause` is the one-line reason shown if retries run out.

    `cause` is None when the only problem is that the deadline passed: the error then names the
    last real cause seen before, not the deadline itself.
    """

    def __init__(self, cause: str | None) -> None:
        super().__init__(cause)
        self.cause = cause


@dataclass
class _Retries:
    """Attempts of one retried operation and the last real cause of failure."""

    doing: str
    deadline_at: float
    attempt: int = 0
    last_cause: str = "the deadline passed before the KBS answered"

    def failed(self, cause: str | None) -> None:
        self.attempt += 1
        if cause is not None:
            self.last_cause = cause


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    set_cookie: tuple[str, ...]


@dataclass(frozen=True)
class _Session:
    key: TeeKey = field(repr=False)
    cookie: str
    token: wire.Token
    issued: float


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _tls_context(cacert_pem: str | None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cadata=cacert_pem) if cacert_pem else None
    except (ssl.SSLError, ValueError):
        raise KbsError("the KBS cert is not a valid PEM certificate; fix [kbs] cert") from None
    if ctx is None:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The SSL error under an httpx exception, unless it is just a closed/reset connection."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError) and not isinstance(
            seen, ssl.SSLEOFError | ssl.SSLZeroReturnError
        ):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class KbsClient:
    """An async client for one KBS; share one instance for all resources of a process."""

    def __init__(
        self,
        url: str,
        *,
        attester: Attester,
        initdata: InitDataText | None = None,
        cacert_pem: str | None = None,
        allow_http: bool = False,
        deadline: float = 60.0,
        key_algorithm: KeyAlgorithm = DEFAULT_KEY_ALGORITHM,
        connect_timeout: float = 5.0,
        read_timeout: float = 20.0,
        max_resource_bytes: int = MAX_RESOURCE_BYTES,
        token_skew: float = 10.0,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            raise KbsError("the KBS url is not a valid URL; fix [kbs] url") from None
        if parsed.scheme not in ("https", "http") or not parsed.host:
            raise KbsError("the KBS url must be https://host[:port]; fix [kbs] url")
        if parsed.userinfo or parsed.query or parsed.fragment:
            raise KbsError("the KBS url must not carry credentials, a query or a fragment")
        if parsed.scheme == "http" and not (allow_http or _is_loopback(parsed.host)):
            raise KbsError(
                f"refusing plain http to non-loopback KBS {parsed.host}; use https "
                "(or set insecure_http = true in the contract on purpose)"
            )
        if parsed.scheme == "http" and cacert_pem:
            raise KbsError("a KBS cert was given but the url is plain http; use https://")
        self._base = str(parsed).rstrip("/")
        self._attester = attester
        self._initdata = initdata
        self._deadline = deadline
        self._key_algorithm = key_algorithm
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_resource = max_resource_bytes
        self._skew = token_skew
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._clock = clock
        verify: ssl.SSLContext | bool = (
            _tls_context(cacert_pem) if parsed.scheme == "https" else False
        )
        self._http = httpx.AsyncClient(
            verify=verify,
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(connect_timeout, read=read_timeout),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
            headers={
                "user-agent": "cva-kbs-client",
                "accept": "application/json",
                "accept-encoding": "identity",
            },
            transport=transport,
        )
        self._session: _Session | None = None
        self._attesting: asyncio.Task[_Session] | None = None

    @classmethod
    def from_config(
        cls,
        config: KbsSettings,
        *,
        attester: Attester,
        initdata: InitDataText | None = None,
        **options: Any,
    ) -> KbsClient:
        """A client for the contract's `[kbs]` table (url, cert, insecure_http)."""
        return cls(
            config.url,
            attester=attester,
            initdata=initdata,
            cacert_pem=config.cert,
            allow_http=config.insecure_http,
            **options,
        )

    async def __aenter__(self) -> KbsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._session = None
        await self._http.aclose()

    # -- public -----------------------------------------------------------------------------

    async def get_resource(self, uri: ResourceRef) -> Secret:
        """The resource's bytes (decrypted JWE). Raises a `KbsError` subclass on any failure."""
        path = wire.resource_path(uri)
        what = wire.uri_text(uri)
        deadline_at = time.monotonic() + self._deadline
        session = await self._current_session(deadline_at)
        reattested = False
        retries = _Retries(f"fetching {what}", deadline_at)
        while True:
            try:
                answer = await self._send(
                    "GET", path, deadline_at, session=session, limit=self._max_resource
                )
            except _Transient as t:
                retries.failed(t.cause)
                await self._backoff(retries)
                continue
            if answer.status == 200:
                jwe = wire.parse_json_object(answer.body, "resource answer", self._max_resource)
                secret = decrypt_resource(jwe, session.key)
                _log().info("kbs resource fetched", uri=what, size=len(secret))
                return secret
            err = wire.parse_error_body(answer.status, answer.body)
            if wire.is_transient_status(answer.status):
                retries.failed(wire.failure("resource", err, what).message)
                await self._backoff(retries)
                continue
            if wire.should_reattest(err) and not reattested:
                reattested = True
                _log().info("kbs re-attesting after 401", uri=what, variant=err.variant)
                session = await self._current_session(deadline_at, stale=session)
                continue
            raise wire.failure("resource", err, what)

    # -- session (single flight) ------------------------------------------------------------

    def session_state(self) -> tuple[str, float | None]:
        """("attesting" | "attested" | "expired" | "none", the token's end as a unix time or
        None) for `cva status`; no secret in it."""
        s = self._session
        if self._attesting is not None:
            return "attesting", None
        if s is None:
            return "none", None
        end = s.token.exp if s.token.exp is not None else s.issued + DEFAULT_TOKEN_LIFETIME
        return ("attested" if self._usable(s) else "expired"), end

    def _usable(self, s: _Session) -> bool:
        return s.token.usable(self._clock(), self._skew, DEFAULT_TOKEN_LIFETIME, s.issued)

    async def _current_session(self, deadline_at: float, stale: _Session | None = None) -> _Session:
        s = self._session
        if s is not None and s is not stale and self._usable(s):
            return s
        if self._attesting is None:
            task = asyncio.get_running_loop().create_task(self._attest(deadline_at))
            self._attesting = task
            task.add_done_callback(self._attest_done)
        # a little grace: the handshake enforces the same deadline itself and then fails with
        # the more useful last cause; this only catches a handshake stuck outside the network
        waiting = asyncio.timeout(max(deadline_at - time.monotonic(), 0.0) + _WAIT_GRACE)
        try:
            async with waiting:
                return await asyncio.shield(self._attesting)
        except TimeoutError:
            if not waiting.expired():
                raise  # not our deadline: an error of the attestation itself
            raise KbsUnavailable(
                f"KBS attestation did not finish within the {self._deadline:g}s deadline"
            ) from None

    def _attest_done(self, task: asyncio.Task[_Session]) -> None:
        if self._attesting is task:
            self._attesting = None
        if not task.cancelled() and task.exception() is None:
            self._session = task.result()

    async def _attest(self, deadline_at: float) -> _Session:
        retries = _Retries("attesting", deadline_at)
        while True:
            try:
                return await self._rcar(deadline_at)
            except _Transient as t:
                retries.failed(t.cause)
                await self._backoff(retries)

    async def _rcar(self, deadline_at: float) -> _Session:
        tee = self._attester.tee
        key = await asyncio.to_thread(generate_tee_key, self._key_algorithm)
        auth = await self._send("POST", "/auth", deadline_at, body=wire.request_body(tee))
        self._raise_unless_ok("auth", auth)
        challenge = wire.parse_challenge(auth.body)
        cookie = wire.session_cookie(auth.set_cookie)
        if cookie is None:
            raise KbsProtocolError("KBS /auth answer set no kbs-session-id cookie; refusing it")
        digest = wire.runtime_data_digest(
            key.jwk, challenge.nonce, algorithm=challenge.hash_algorithm
        )
        report_data = wire.report_data_for(tee, digest)
        evidence = await asyncio.to_thread(self._attester.evidence, report_data)
        initdata_text = self._initdata.text() if self._initdata is not None else None
        body = wire.attestation_body(challenge.nonce, key.jwk, evidence, initdata_text)
        attest = await self._send("POST", "/attest", deadline_at, body=body, cookie=cookie)
        self._raise_unless_ok("attest", attest)
        token = wire.parse_attest_response(attest.body)
        cookie = wire.session_cookie(attest.set_cookie) or cookie
        now = self._clock()
        _log().info(
            "kbs attested",
            tee=tee,
            wrap_alg=self._key_algorithm,
            hash=challenge.hash_algorithm,
            valid_until=token.exp,
        )
        session = _Session(key=key, cookie=cookie, token=token, issued=now)
        if not self._usable(session):
            raise AttestationFailed(
                "KBS issued a token that is already expired or not yet valid; check the clocks"
            )
        return session

    def _raise_unless_ok(self, stage: wire.Stage, answer: _Answer) -> None:
        if answer.status == 200:
            return
        err = wire.parse_error_body(answer.status, answer.body)
        exc = wire.failure(stage, err, f"/{stage}")
        if wire.is_transient_status(answer.status):
            raise _Transient(exc.message)
        raise exc

    # -- transport ----------------------------------------------------------------------------

    async def _backoff(self, r: _Retries) -> None:
        """Sleep a full-jitter exponential delay, or give up if it would cross the deadline."""
        ceiling = min(self._backoff_cap, self._backoff_base * 2**r.attempt)
        delay = random.uniform(0, ceiling)  # noqa: S311 - jitter, not crypto
        if time.monotonic() + delay >= r.deadline_at:
            raise KbsUnavailable(
                f"KBS unavailable while {r.doing} (gave up after {r.attempt} attempts within "
                f"the {self._deadline:g}s deadline); last cause: {r.last_cause}"
            )
        _log().warning(
            "kbs transient fault, retrying", doing=r.doing, attempt=r.attempt, cause=r.last_cause
        )
        await asyncio.sleep(delay)

    async def _send(
        self,
        method: str,
        path: str,
        deadline_at: float,
        *,
        body: bytes | None = None,
        cookie: str | None = None,
        session: _Session | None = None,
        limit: int = wire.MAX_JSON_BYTES,
    ) -> _Answer:
        remaining = deadline_at - time.monotonic()
        if remaining <= 0:
            raise _Transient(None)
        headers: dict[str, str] = {}
        if body is not None:
            headers["content-type"] = "application/json"
        if session is not None:
            cookie = session.cookie
            headers["authorization"] = f"Bearer {session.token.raw}"
        if cookie is not None:
            headers["cookie"] = f"{wire.COOKIE_NAME}={cookie}"
        timeout = httpx.Timeout(
            min(self._connect_timeout, remaining), read=min(self._read_timeout, remaining)
        )
        url = self._base + (path if path.startswith(wire.PREFIX) else wire.PREFIX + path)
        try:
            request = self._http.build_request(
                method, url, content=body, headers=headers, timeout=timeout
            )
            response = await self._http.send(request, stream=True)
            try:
                data = await self._read_capped(response, limit)
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise _Transient(f"{type(exc).__name__} talking to {method} {path}") from None
        except httpx.TransportError as exc:
            tls = _tls_failure(exc)
            if tls is not None:
                reason = getattr(tls, "verify_message", None) or getattr(tls, "reason", None)
                raise KbsTlsError(
                    f"TLS to the KBS failed ({reason or type(tls).__name__}); check [kbs] cert "
                    "and that the url is the KBS's https endpoint"
                ) from None
            raise _Transient(f"{type(exc).__name__} talking to {method} {path}") from None
        return _Answer(response.status_code, data, tuple(response.headers.get_list("set-cookie")))

    @staticmethod
    async def _read_capped(response: httpx.Response, limit: int) -> bytes:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise KbsProtocolError("KBS answer uses a content-encoding we did not ask for")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise KbsProtocolError(
                f"KBS answer is {int(declared)} bytes, over the {limit}-byte cap; refusing it"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > limit:
                raise KbsProtocolError(f"KBS answer exceeds the {limit}-byte cap; refusing it")
            chunks.append(chunk)
        return b"".join(chunks)
