"""The AAEL event cva records for a volume, and its parser for verifiers, pure.

Intended use (wired in later): on create/open/close of every volume (PrepareVolumes and
SecureMount, persistent and ephemeral), the daemon builds a `VolumeEvent` from the *validated*
LUKS header (its UUID and the SHA-256 of the header metadata cva checked), measures
`volume_aael(event)` (to the AA via `evidence.aa_wire`, or directly via `evidence.eventlog`)
before the volume is handed to anyone, and fails closed if that fails. A verifier reads the log
with `evidence.eventlog.parse_log` and passes each cva event to `parse_volume_event`.

Event: domain `cva`, operation `volume-create` | `volume-open` | `volume-close` (contract
volumes) or `ephemeral-create` | `ephemeral-close` (SecureMount's random-key volumes, named by
the host's mapperName: their own operations, so no ephemeral event ever reads as a contract
volume's, whatever name the host picks), content a JSON
object canonicalised by RFC 8785 (JCS: keys sorted, no white space), as the CoCo event spec asks
of its own AAEL contents, so the whole event line has exactly two spaces (Trustee's text-form
AAEL parser splits an event at every space and wants exactly three fields):

    {"fs":"ext4","header-sha256":"<64 hex>","name":"<name>","ro":false,
     "uuid":"<uuid>","v":1}                  (one line; `"seq":<n>` after "ro" when present)

* v: the content format version, `1`.
* name: the volume name, `[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}`.
* uuid: the LUKS2 header UUID, canonical lowercase `8-4-4-4-12` hex.
* header-sha256: lowercase hex SHA-256 of the validated LUKS header metadata.
* fs: the filesystem, `[a-z][a-z0-9]{0,15}` (e.g. ext4, xfs).
* ro: `true` when mounted read-only, else `false` (JSON booleans).
* seq: persistent volumes only: the monotonic sequence in the volume's MAC'd LUKS token (a JSON
  integer, 0..2^64-1; luks.token): raised by every read-write open before the event is
  recorded, unchanged by a read-only open. Absent for ephemeral volumes.
* new-key-id, old-key-id: `volume-rekey` only (a volume moved from its previous key to its key,
  luks.rotation; recorded before the open event of the same open): lowercase hex of each key's
  public id (luks.token.key_id: HKDF of the KBS resource under its own label, never key bytes);
  new-key-id always, old-key-id when the run that rotated had the previous key at hand (absent
  when it finished a rotation a crash had cut after the new keyslot was written).

Every string value is restricted to ASCII letters, digits and `-_.+`, so Python's
`json.dumps(sort_keys=True, separators=(",", ":"))` of these fields is exactly the JCS form.
The form is canonical: `parse_volume_content(volume_content(e)) == e` and every accepted text is
exactly what `volume_content` would write, so a policy can match on the text. Only these typed
fields exist: there is no free-form field through which key material could get in.

A relying party pins a volume by its uuid and header-sha256 (and, for persistent volumes, a
minimum seq): `agent.kbs_policy` writes the Trustee resource policy that checks them in a TDX
token (SPEC.md §e.8), `evidence.seqstate` the per-UUID seq check across boots.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

from evidence.errors import EvidenceError
from evidence.eventlog import AaelEvent, aael_event

DOMAIN = "cva"
FORMAT_VERSION = 1
MAX_SEQUENCE = (1 << 64) - 1

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_FS = re.compile(r"[a-z][a-z0-9]{0,15}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_CONTENT = 1024
_KEYS = ("v", "name", "uuid", "header-sha256", "fs", "ro", "seq")
_REKEY_KEYS = ("new-key-id", "old-key-id")


class VolumeEventError(EvidenceError):
    """A volume event that is not in cva's canonical form."""


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


class VolumeOperation(enum.Enum):
    CREATE = "volume-create"
    OPEN = "volume-open"
    CLOSE = "volume-close"
    EPHEMERAL_CREATE = "ephemeral-create"
    EPHEMERAL_CLOSE = "ephemeral-close"
    REKEY = "volume-rekey"

    @property
    def ephemeral(self) -> bool:
        return self in (VolumeOperation.EPHEMERAL_CREATE, VolumeOperation.EPHEMERAL_CLOSE)

    @property
    def closes(self) -> bool:
        return self in (VolumeOperation.CLOSE, VolumeOperation.EPHEMERAL_CLOSE)


@dataclass(frozen=True)
class VolumeEvent:
    """What cva records about a volume; every field is checked on construction."""

    operation: VolumeOperation
    name: str
    luks_uuid: str
    header_sha256: bytes
    filesystem: str
    read_only: bool
    sequence: int | None  # persistent volumes only
    new_key_id: bytes | None = None  # volume-rekey only (required there)
    old_key_id: bytes | None = None  # volume-rekey only (optional)

    def __post_init__(self) -> None:
        if not isinstance(self.operation, VolumeOperation):
            raise VolumeEventError("volume event operation must be a VolumeOperation")
        for field, value, pattern in (
            ("name", self.name, _NAME),
            ("uuid", self.luks_uuid, _UUID),
            ("fs", self.filesystem, _FS),
        ):
            if not isinstance(value, str) or pattern.fullmatch(value) is None:
                raise VolumeEventError(f"volume event {field} is not of the form {pattern.pattern}")
        if not isinstance(self.header_sha256, bytes) or len(self.header_sha256) != 32:
            raise VolumeEventError("volume event header-sha256 must be 32 bytes")
        if not isinstance(self.read_only, bool):
            raise VolumeEventError("volume event ro must be a bool")
        if self.sequence is not None and (
            isinstance(self.sequence, bool)
            or not isinstance(self.sequence, int)
            or not 0 <= self.sequence <= MAX_SEQUENCE
        ):
            raise VolumeEventError(f"volume event seq must be an integer 0..{MAX_SEQUENCE}")
        if self.operation.ephemeral and self.sequence is not None:
            raise VolumeEventError("an ephemeral volume event carries no seq")
        rekey = self.operation is VolumeOperation.REKEY
        if rekey and self.new_key_id is None:
            raise VolumeEventError("a volume-rekey event needs new-key-id")
        if not rekey and (self.new_key_id is not None or self.old_key_id is not None):
            raise VolumeEventError("only a volume-rekey event has key ids")
        for kid in (self.new_key_id, self.old_key_id):
            if kid is not None and (not isinstance(kid, bytes) or len(kid) != 32):
                raise VolumeEventError("volume event key ids must be 32 bytes")


def volume_content(event: VolumeEvent) -> str:
    """The canonical (RFC 8785) JSON content of a volume event."""
    fields: dict[str, object] = {
        "v": FORMAT_VERSION,
        "name": event.name,
        "uuid": event.luks_uuid,
        "header-sha256": event.header_sha256.hex(),
        "fs": event.filesystem,
        "ro": event.read_only,
    }
    if event.sequence is not None:
        fields["seq"] = event.sequence
    if event.new_key_id is not None:
        fields["new-key-id"] = event.new_key_id.hex()
    if event.old_key_id is not None:
        fields["old-key-id"] = event.old_key_id.hex()
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def volume_aael(event: VolumeEvent) -> AaelEvent:
    """The AAEL event (domain, operation, content) to measure."""
    return aael_event(DOMAIN, event.operation.value, volume_content(event))


def parse_volume_content(operation: VolumeOperation, content: str) -> VolumeEvent:
    """Parse a content text; accepts only the canonical form `volume_content` writes."""
    if len(content) > MAX_CONTENT:
        raise VolumeEventError(f"volume event content is longer than {MAX_CONTENT} characters")
    try:
        values = json.loads(content, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise VolumeEventError("volume event content is not JSON") from None
    if not isinstance(values, dict):
        raise VolumeEventError("volume event content is not a JSON object")
    keys = set(values)
    rekey = operation is VolumeOperation.REKEY
    allowed = set(_KEYS) | (set(_REKEY_KEYS) if rekey else set())
    required = set(_KEYS) - {"seq"} | ({"new-key-id"} if rekey else set())
    if not required <= keys or not keys <= allowed:
        missing = sorted(required - keys)
        extra = sorted(k[:32] for k in keys - allowed)
        raise VolumeEventError(f"volume event fields: missing {missing}, unknown {extra}")
    if values["v"] != FORMAT_VERSION or isinstance(values["v"], bool):
        raise VolumeEventError(f"volume event format v={str(values['v'])[:16]!r} is not supported")
    for key in ("name", "uuid", "header-sha256", "fs"):
        if not isinstance(values[key], str):
            raise VolumeEventError(f"volume event {key} is not a string")
    if _HEX64.fullmatch(values["header-sha256"]) is None:
        raise VolumeEventError("volume event header-sha256 is not 64 lowercase hex digits")
    if not isinstance(values["ro"], bool):
        raise VolumeEventError("volume event ro is not true or false")
    sequence = values.get("seq")
    if sequence is not None and (isinstance(sequence, bool) or not isinstance(sequence, int)):
        raise VolumeEventError("volume event seq is not an integer")
    key_ids: list[bytes | None] = []
    for key in _REKEY_KEYS:
        text = values.get(key)
        if text is not None and (not isinstance(text, str) or _HEX64.fullmatch(text) is None):
            raise VolumeEventError(f"volume event {key} is not 64 lowercase hex digits")
        key_ids.append(bytes.fromhex(text) if text is not None else None)
    event = VolumeEvent(
        operation,
        values["name"],
        values["uuid"],
        bytes.fromhex(values["header-sha256"]),
        values["fs"],
        values["ro"],
        sequence,
        key_ids[0],
        key_ids[1],
    )
    if volume_content(event) != content:  # belt and braces: only the canonical text
        raise VolumeEventError("volume event content is not in canonical form")
    return event


def parse_volume_event(event: AaelEvent) -> VolumeEvent | None:
    """A cva volume event from any AAEL event; None when the event is not cva's domain.
    An event in cva's domain that does not parse is an error (not silently skipped)."""
    if event.domain != DOMAIN:
        return None
    try:
        operation = VolumeOperation(event.operation)
    except ValueError:
        raise VolumeEventError(
            f"cva event operation {event.operation[:32]!r} is not a volume operation"
        ) from None
    return parse_volume_content(operation, event.content)
