"""Trustee's KBS protocol 0.4.0 (RCAR) as pure functions: bodies out, parsed answers in.

Everything here is byte-exact to SPEC §a and free of I/O, so it is unit-tested on its own:
the Request and Attestation bodies, the JCS + SHA-384 runtime-data digest (§a.5), the per-TEE
report data, the Challenge / token / error-body parsers (every KBS answer is hostile input: size
caps, strict types, clean `KbsError`s), the resource path of a `kbs://` URI (§a.8) and the
mapping of Trustee's error bodies to the error classes of `agent.kbs.errors`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from agent.kbs.errors import (
    AttestationFailed,
    KbsError,
    KbsProtocolError,
    KbsUnavailable,
    PolicyDenied,
    ProtocolMismatch,
    ResourceNotFound,
    clean_text,
)

PROTOCOL_VERSION = "0.4.0"
PREFIX = "/kbs/v0"
COOKIE_NAME = "kbs-session-id"
# what guest-components offers (KT `HashAlgorithm::list_all`, lower-case)
OFFERED_HASH_ALGORITHMS = ("sha256", "sha384", "sha512", "sm3")
DEFAULT_HASH_ALGORITHM = "sha384"
NONCE_BYTES = 32
MAX_JSON_BYTES = 256 * 1024  # Challenge, token and error bodies
MAX_TOKEN_CHARS = 128 * 1024
ERROR_TYPE_PREFIX = "https://github.com/confidential-containers/kbs/errors/"

_SEGMENT = re.compile(r"[A-Za-z0-9_\-]+[A-Za-z0-9_\-.]*")  # TR ResourceDesc::try_from
_PLUGIN = re.compile(r"[a-z0-9][a-z0-9_\-]{0,63}")
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_\-]{1,128}")
_B64URL = re.compile(r"[A-Za-z0-9_\-]*")
_JWT = re.compile(r"[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")

Stage = Literal["auth", "attest", "resource"]
JSON = dict[str, Any]


class ResourceRef(Protocol):
    """What the client needs of `agent.contract.KbsResourceUri` (structural, read-only)."""

    @property
    def repo(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def tag(self) -> str: ...
    @property
    def plugin(self) -> str | None: ...


# ---------------------------------------------------------------------------------------------
# encodings


def jcs(obj: object) -> bytes:
    """RFC 8785 canonical JSON for the objects this protocol hashes (ASCII keys, strings, ints)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def b64url(data: bytes) -> str:
    """base64url without padding (KT `serialize_base64`)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: object, what: str) -> bytes:
    """Strict base64url-no-pad decoding of a peer-supplied field."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise KbsProtocolError(f"KBS answer field {what} is not base64url; refusing the answer")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(raw) != text:  # non-canonical trailing bits: one value, one encoding
        raise KbsProtocolError(f"KBS answer field {what} is not canonical base64url; refusing it")
    return raw


def b64std_decode(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise KbsProtocolError(f"KBS answer field {what} is not a string; refusing the answer")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KbsProtocolError(
            f"KBS answer field {what} is not standard base64; refusing the answer"
        ) from None


def parse_json_object(body: bytes, what: str, limit: int = MAX_JSON_BYTES) -> JSON:
    """A JSON object from a peer, or a clean KbsProtocolError (size cap, depth, type)."""
    if len(body) > limit:
        raise KbsProtocolError(f"KBS {what} is {len(body)} bytes, over the {limit}-byte cap")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise KbsProtocolError(f"KBS {what} is not JSON; is the URL a Trustee KBS?") from None
    if not isinstance(value, dict):
        raise KbsProtocolError(f"KBS {what} is JSON but not an object; refusing it")
    return value


def _str_field(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise KbsProtocolError(f"KBS {what} has no string field {key!r}; refusing it")
    return value


# ---------------------------------------------------------------------------------------------
# bodies we send


def request_body(tee: str) -> bytes:
    """The `POST /auth` Request (KT `Request`), exactly as guest-components sends it."""
    body = {
        "version": PROTOCOL_VERSION,
        "tee": tee,
        "extra-params": {"supported-hash-algorithms": list(OFFERED_HASH_ALGORITHMS)},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def runtime_data_object(tee_pubkey: Mapping[str, str], nonce: str, additional: str = "") -> JSON:
    """The object the KBS hashes for the primary evidence (SPEC §a.5 step 1)."""
    return {"tee-pubkey": dict(tee_pubkey), "nonce": nonce, "additional-evidence": additional}


def runtime_data_digest(
    tee_pubkey: Mapping[str, str],
    nonce: str,
    *,
    additional: str = "",
    algorithm: str = DEFAULT_HASH_ALGORITHM,
) -> bytes:
    """hash(JCS(runtime data)): what must appear in the evidence's report data."""
    return hashlib.new(algorithm, jcs(runtime_data_object(tee_pubkey, nonce, additional))).digest()


def report_data_for(tee: str, digest: bytes) -> bytes:
    """The report-data bytes each TEE's verifier compares with `digest` (SPEC §a.5 table)."""
    if tee in ("tdx", "snp"):
        return digest[:64].ljust(64, b"\0")
    if tee == "tpm":
        return digest[:32].ljust(32, b"\0")
    return digest  # sample (exact bytes), az-snp-vtpm / az-tdx-vtpm (full digest as TPM nonce)


def attestation_body(
    nonce: str, tee_pubkey: Mapping[str, str], evidence: object, initdata_text: str | None
) -> bytes:
    """The `POST /attest` Attestation (KT `Attestation`, kebab-case outside, snake inside)."""
    body = {
        "init-data": None if initdata_text is None else {"format": "toml", "body": initdata_text},
        "runtime-data": {"nonce": nonce, "tee-pubkey": dict(tee_pubkey)},
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def resource_path(uri: ResourceRef) -> str:
    """`/kbs/v0/<plugin>/<repo>/<type>/<tag>` for a `kbs:///` or `kbs+plugin://` URI."""
    plugin = uri.plugin or "resource"
    if not _PLUGIN.fullmatch(plugin):
        raise KbsError(f"KBS plugin name {plugin!r} is not valid; fix the kbs+<plugin>:// URI")
    for name, seg in (("repo", uri.repo), ("type", uri.type), ("tag", uri.tag)):
        if not _SEGMENT.fullmatch(seg) or seg in (".", ".."):
            raise KbsError(f"KBS resource {name} {seg!r} is not a valid path segment")
    return f"{PREFIX}/{plugin}/{uri.repo}/{uri.type}/{uri.tag}"


def uri_text(uri: ResourceRef) -> str:
    scheme = "kbs" if not uri.plugin or uri.plugin == "resource" else f"kbs+{uri.plugin}"
    return f"{scheme}:///{uri.repo}/{uri.type}/{uri.tag}"


# ---------------------------------------------------------------------------------------------
# answers we parse


@dataclass(frozen=True)
class Challenge:
    nonce: str  # verbatim, it goes back into runtime-data
    hash_algorithm: str


def parse_challenge(body: bytes) -> Challenge:
    """The /auth answer: a 32-byte nonce and the runtime-data hash algorithm (default sha384)."""
    obj = parse_json_object(body, "challenge")
    nonce = _str_field(obj, "nonce", "challenge")
    raw = b64std_decode(nonce, "challenge.nonce")
    if len(raw) != NONCE_BYTES:
        raise KbsProtocolError(
            f"KBS challenge nonce is {len(raw)} bytes, Trustee sends {NONCE_BYTES}; refusing it"
        )
    algorithm = DEFAULT_HASH_ALGORITHM
    extra = obj.get("extra-params", "")
    if isinstance(extra, dict):
        selected = extra.get("selected-hash-algorithm")
        if selected is not None:
            if not isinstance(selected, str) or selected.lower() not in (
                "sha256",
                "sha384",
                "sha512",
            ):
                shown = clean_text(str(selected), 20)
                raise KbsProtocolError(f"KBS selected hash algorithm {shown!r} is not supported")
            algorithm = selected.lower()
    elif not isinstance(extra, str):
        raise KbsProtocolError("KBS challenge extra-params is neither a string nor an object")
    return Challenge(nonce=nonce, hash_algorithm=algorithm)


@dataclass(frozen=True)
class Token:
    """The attestation token and the validity window read from its (unverified) claims."""

    raw: str
    exp: float | None
    nbf: float | None

    def usable(self, now: float, skew: float, default_lifetime: float, issued: float) -> bool:
        """Valid at `now` with `skew` margin: renew `skew` before exp; tolerate nbf skew ahead."""
        if self.nbf is not None and now + skew < self.nbf:
            return False
        end = self.exp if self.exp is not None else issued + default_lifetime
        return now < end - skew

    def __repr__(self) -> str:
        return f"<Token exp={self.exp} nbf={self.nbf}>"


def parse_token(raw: object) -> Token:
    """A JWT's exp/nbf (guest-components decodes without verifying; the KBS verifies)."""
    if not isinstance(raw, str) or len(raw) > MAX_TOKEN_CHARS or not _JWT.fullmatch(raw):
        raise KbsProtocolError("KBS attestation token is not a JWT; refusing it")
    claims = parse_json_object(b64url_decode(raw.split(".")[1], "token payload"), "token claims")
    times: list[float | None] = []
    for key in ("exp", "nbf"):
        value = claims.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise KbsProtocolError(f"KBS token claim {key!r} is not a number; refusing the token")
        times.append(None if value is None else float(value))
    return Token(raw=raw, exp=times[0], nbf=times[1])


def parse_attest_response(body: bytes) -> Token:
    return parse_token(parse_json_object(body, "attestation answer").get("token"))


def session_cookie(set_cookie_values: Iterable[str]) -> str | None:
    """The `kbs-session-id` value from Set-Cookie headers, or None (charset-checked)."""
    for header in set_cookie_values:
        first = header.split(";", 1)[0].strip()
        name, sep, value = first.partition("=")
        if sep and name.strip() == COOKIE_NAME:
            value = value.strip().strip('"')
            if not _COOKIE_VALUE.fullmatch(value):
                raise KbsProtocolError("KBS session cookie has an invalid value; refusing it")
            return value
    return None


@dataclass(frozen=True)
class ErrorBody:
    """Trustee's RFC 7807-style error (KT `ErrorInformation`), or what stands in for it."""

    status: int
    variant: str  # the Rust enum variant name, "" if the body is not Trustee's
    detail: str

    def describe(self) -> str:
        label = f"{self.status} {self.variant}" if self.variant else f"HTTP {self.status}"
        return f"({label}): {self.detail}" if self.detail else f"({label})"


def parse_error_body(status: int, body: bytes) -> ErrorBody:
    """Never raises: an unparseable body becomes an ErrorBody with an empty variant."""
    try:
        obj = parse_json_object(body, "error body", limit=64 * 1024)
    except KbsProtocolError:
        return ErrorBody(status, "", "")
    kind, detail = obj.get("type"), obj.get("detail")
    variant = ""
    if isinstance(kind, str) and kind.startswith(ERROR_TYPE_PREFIX):
        variant = clean_text(kind[len(ERROR_TYPE_PREFIX) :], 40)
    return ErrorBody(status, variant, clean_text(detail) if isinstance(detail, str) else "")


_VERSION_EXPECT = re.compile(r"[Vv]ersion [Mm]ismatch: expect ([^ ]{1,32})")
_NOT_FOUND_VARIANTS = ("PluginNotFound", "InvalidRequestPath", "PluginInternalError")


def is_transient_status(status: int) -> bool:
    return status in (408, 425, 429) or 500 <= status <= 599


def should_reattest(err: ErrorBody) -> bool:
    """A resource 401 that a fresh session may cure (token/session problems, unknown bodies).

    Policy denials and missing resources would only repeat, so they are terminal at once.
    """
    return err.status == 401 and err.variant not in ("PolicyDeny", *_NOT_FOUND_VARIANTS)


def failure(stage: Stage, err: ErrorBody, what: str) -> KbsError:
    """The error class and one-line message for a non-200 KBS answer at `stage`."""
    said = err.describe()
    m = _VERSION_EXPECT.search(err.detail)
    if m:
        return ProtocolMismatch(
            f"protocol version mismatch: KBS expects {m.group(1)}, cva speaks {PROTOCOL_VERSION} "
            f"{said}; use a Trustee release >= v0.14.0"
        )
    if err.variant == "PolicyDeny":
        return PolicyDenied(
            f"KBS policy denied {what} {said}; check the KBS resource policy for this TEE"
        )
    if (stage == "resource" and err.variant in _NOT_FOUND_VARIANTS) or err.status == 404:
        return ResourceNotFound(
            f"KBS has no resource {what} {said}; register it on the KBS or fix the URI"
        )
    if is_transient_status(err.status):
        return KbsUnavailable(f"KBS answered {what} with a server error {said}")
    if stage in ("auth", "attest"):
        return AttestationFailed(
            f"KBS refused the attestation at /{stage} {said}; check the TEE's reference values"
        )
    if err.status == 401:
        return AttestationFailed(
            f"KBS rejected the attestation token for {what} {said} even after re-attesting"
        )
    return KbsProtocolError(f"KBS answered {what} unexpectedly {said}")
