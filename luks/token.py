"""Per-volume keys (DESIGN §3) and the `cva` LUKS2 token that records a volume's state (§4).

Keys: from the KBS resource bytes `secret` (>= 32 bytes), HKDF-SHA256 (no salt, 32-byte
output) derives
    passphrase = HKDF(secret, info="cva/v1/luks-passphrase/" + name)
    mac_key    = HKDF(secret, info="cva/v1/header-mac/" + name)
    key_id     = HKDF(secret, info="cva/v1/key-id/" + name)     (public: measured on rotation)

Token: `{"type": "cva", "keyslots": [], "state": S, "volume": NAME, "seq": N, "mac": HEX}`
stored as LUKS2 token 0. `keyslots` stays empty so no libcryptsetup token plugin is ever tried
for it.

    mac = HMAC-SHA256(mac_key, "cva/v1/token-mac" 0x00 || lp(M) || lp(S) || lp(NAME) || lp(UUID)
                               || lp(u64be(N)))

where lp(x) = 8-byte big-endian length of x || x, every string UTF-8, UUID the binary header's
UUID, u64be(N) the 8-byte big-endian sequence, and M the **canonical header metadata without
tokens** (below).

Sequence N (`seq`, a JSON integer 0..2^64-1): a monotonic counter a verifier uses to detect a
rolled-back header (measured volume events carry it, agent.measure). cva writes N + 1 on every
read-write open (luks.volume: before the volume is mounted or measured) and when it marks a
volume ready (so the first ready token of a new volume has seq 1); a read-only open writes
nothing. A token without `seq` (volumes made before it existed) is read as seq 0 and its MAC is
the one above without the last field; cva writes a seq at the next write. The two MAC messages
cannot collide: every field is length-prefixed, so the form with seq is strictly longer with the
same prefix. Stripping `seq` from a token therefore breaks its MAC.

M:

    M = json.dumps(
            {"luks2": <the primary copy's JSON object without its "tokens" member>,
             "hdr_size": <binary header hdr_size>, "checksum_alg": <binary header checksum_alg>,
             "label": <binary header label>, "subsystem": <binary header subsystem>},
            sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

i.e. JSON with keys sorted at every level, no whitespace, only ASCII (other characters as
\\uXXXX escapes). It covers keyslots, segments, digests and config (every field libcryptsetup
uses to unlock and map the volume) but not the tokens (so changing the state keeps M) nor the
seqid/salt/checksum (which every header write changes). The host cannot forge a MAC without
the KBS secret. NOTE: it can replay an older, genuine header of the same volume (e.g. one
still in state `initializing`); the state machine must not trust `initializing` alone to
reformat a volume (check the opened device for a filesystem first).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from luks.errors import StorageInputError
from luks.header import (
    TOKEN_SEQ_MAX,
    TOKEN_STATES,
    TOKEN_TYPE,
    VOLUME_NAME_RE,
    Json,
    LuksHeader,
    token_shape_reasons,
)
from luks.secret import Secret

if TYPE_CHECKING:
    from luks.libcryptsetup import CryptDevice

MIN_SECRET_BYTES: Final = 32
DERIVED_KEY_BYTES: Final = 32
PASSPHRASE_INFO: Final = "cva/v1/luks-passphrase/"  # noqa: S105 - an HKDF label
MAC_KEY_INFO: Final = "cva/v1/header-mac/"
KEY_ID_INFO: Final = "cva/v1/key-id/"
MAC_DOMAIN: Final = b"cva/v1/token-mac\x00"
STATE_INITIALIZING: Final = "initializing"
STATE_READY: Final = "ready"
TOKEN_SCAN: Final = 32  # token ids cva_token_id looks at


class TokenError(StorageInputError):
    """The `cva` token is missing, malformed, for another volume, or its MAC does not match."""


def _check_name(volume_name: str) -> None:
    if not VOLUME_NAME_RE.fullmatch(volume_name):
        raise TokenError(f"volume name {volume_name!r} is not [a-z0-9][a-z0-9-]{{0,30}}")


def _hkdf(secret: Secret, info: str) -> Secret:
    kdf = HKDF(algorithm=hashes.SHA256(), length=DERIVED_KEY_BYTES, salt=None, info=info.encode())
    # straight into the Secret's own buffer: the derived key never exists as immutable bytes
    out = Secret(DERIVED_KEY_BYTES)
    kdf.derive_into(secret.data, out.data)
    return out


def derive_keys(secret: Secret, volume_name: str) -> tuple[Secret, Secret]:
    """(passphrase, mac_key) for one volume, from the KBS resource bytes (DESIGN §3)."""
    _check_name(volume_name)
    if len(secret) < MIN_SECRET_BYTES:
        raise TokenError(
            f"the KBS resource for volume {volume_name!r} has {len(secret)} bytes; at least "
            f"{MIN_SECRET_BYTES} random bytes are required (store a longer key in the KBS)"
        )
    return _hkdf(secret, PASSPHRASE_INFO + volume_name), _hkdf(secret, MAC_KEY_INFO + volume_name)


def key_id(secret: Secret, volume_name: str) -> bytes:
    """A public name of volume `volume_name`'s key (HKDF under its own label, 32 bytes): what a
    measured volume-rekey event carries. It reveals nothing of the passphrase or MAC key (other
    HKDF outputs), and whoever holds the KBS resource can compute it to check an event."""
    passphrase, mac_key = derive_keys(secret, volume_name)
    passphrase.wipe()
    mac_key.wipe()
    with _hkdf(secret, KEY_ID_INFO + volume_name) as kid:
        return bytes(kid.data)


def canonical_metadata(hdr: LuksHeader) -> bytes:
    """M of the module docstring: the header metadata the MAC covers (tokens excluded)."""
    luks2 = {k: v for k, v in hdr.metadata.items() if k != "tokens"}
    doc: dict[str, Json] = {
        "luks2": luks2,
        "hdr_size": hdr.primary.hdr_size,
        "checksum_alg": hdr.primary.checksum_alg,
        "label": hdr.primary.label,
        "subsystem": hdr.primary.subsystem,
    }
    try:
        text = json.dumps(
            doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (ValueError, TypeError, RecursionError):
        raise TokenError("header metadata cannot be canonicalised") from None
    return text.encode("ascii")


def metadata_sha256(hdr: LuksHeader) -> bytes:
    """SHA-256 of M: what a measured volume event names as the validated header's digest
    (stable across state changes and header rewrites; no secret in it, M is on the disk)."""
    return hashlib.sha256(canonical_metadata(hdr)).digest()


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _check_seq(seq: int) -> None:
    if type(seq) is not int or not 0 <= seq <= TOKEN_SEQ_MAX:
        raise TokenError(f"token seq must be an integer 0..{TOKEN_SEQ_MAX}")


def token_mac(
    hdr: LuksHeader, state: str, volume_name: str, mac_key: Secret, seq: int | None = None
) -> str:
    """The hex MAC binding state, volume name and sequence to this header (module docstring);
    `seq` None: the form of tokens made before the sequence existed (verification only)."""
    message = (
        MAC_DOMAIN
        + _lp(canonical_metadata(hdr))
        + _lp(state.encode("utf-8"))
        + _lp(volume_name.encode("utf-8"))
        + _lp(hdr.uuid.encode("utf-8"))
    )
    if seq is not None:
        _check_seq(seq)
        message += _lp(seq.to_bytes(8, "big"))
    return hmac.new(mac_key.data, message, hashlib.sha256).hexdigest()


def make_token(
    hdr: LuksHeader, state: str, volume_name: str, mac_key: Secret, *, seq: int = 0
) -> dict[str, Json]:
    """The token object for `state` and sequence `seq` (store it with `token_json(...)` as
    LUKS2 token 0). cva always writes a seq."""
    if state not in TOKEN_STATES:
        raise TokenError(f"token state {state!r} is not one of {TOKEN_STATES}")
    _check_name(volume_name)
    _check_seq(seq)
    return {
        "type": TOKEN_TYPE,
        "keyslots": [],
        "state": state,
        "volume": volume_name,
        "seq": seq,
        "mac": token_mac(hdr, state, volume_name, mac_key, seq),
    }


def next_sequence(seq: int) -> int:
    """The sequence the next write records; refuses to wrap (a verifier would see a rollback)."""
    _check_seq(seq)
    if seq == TOKEN_SEQ_MAX:
        raise TokenError(
            f"the volume's sequence is at its maximum ({TOKEN_SEQ_MAX}); refusing to wrap it "
            "(open the volume read-only, or copy the data to a new volume)"
        )
    return seq + 1


def token_json(token: Mapping[str, Json]) -> str:
    """Compact JSON text of a token, for `CryptDevice.token_json_set`."""
    return json.dumps(dict(token), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True)
class VerifiedToken:
    state: str
    seq: int  # 0 for a token made before the sequence existed


def verify_token(hdr: LuksHeader, volume_name: str, mac_key: Secret) -> str:
    """The volume's state from its `cva` token; TokenError unless the MAC proves it is ours."""
    return verified_token(hdr, volume_name, mac_key).state


def verified_token(hdr: LuksHeader, volume_name: str, mac_key: Secret) -> VerifiedToken:
    """State and sequence of the `cva` token; TokenError unless the MAC proves it is ours."""
    _check_name(volume_name)
    tokens = hdr.cva_tokens()
    if not tokens:
        raise TokenError(
            f"volume {volume_name!r}: the header has no cva token (never marked by cva, or "
            "stripped); refusing to open or format it"
        )
    if len(tokens) > 1:
        raise TokenError(f"volume {volume_name!r}: the header has {len(tokens)} cva tokens")
    tok_id, tok = tokens[0]
    problems: list[str] = []
    token_shape_reasons(f"token {tok_id}", tok, lambda rule, text: problems.append(text))
    if problems:
        raise TokenError(f"volume {volume_name!r}: malformed cva token: {problems[0]}")
    state, volume, mac = tok["state"], tok["volume"], tok["mac"]
    assert isinstance(state, str) and isinstance(volume, str) and isinstance(mac, str)
    if volume != volume_name:
        raise TokenError(
            f"volume {volume_name!r}: the header belongs to volume {volume!r} (wrong disk "
            "attached?); refusing it"
        )
    seq = tok.get("seq")  # shape-checked above: absent or an int 0..2^64-1
    assert seq is None or type(seq) is int
    expected = token_mac(hdr, state, volume_name, mac_key, seq)
    if not hmac.compare_digest(expected, mac):
        raise TokenError(
            f"volume {volume_name!r}: the cva token's MAC does not match (header changed by "
            "someone without this volume's key, or a different key); refusing it"
        )
    return VerifiedToken(state, 0 if seq is None else seq)


def cva_token_id(cd: CryptDevice) -> int:
    """The id of the loaded header's cva token (the first whose JSON says type cva), else 0."""
    for token in range(TOKEN_SCAN):
        text = cd.token_json_get(token)
        if text is None:
            continue
        with contextlib.suppress(ValueError, RecursionError, AttributeError):
            if json.loads(text).get("type") == TOKEN_TYPE:
                return token
    return 0
