"""The AAEL event cva records for a volume, and its parser for verifiers, pure.

Intended use (wired in later): on create/open/close of every volume (PrepareVolumes and
SecureMount, persistent and ephemeral), the daemon builds a `VolumeEvent` from the *validated*
LUKS header (its UUID and the SHA-256 of the header metadata cva checked), measures
`volume_aael(event)` (to the AA via `evidence.aa_wire`, or directly via `evidence.eventlog`)
before the volume is handed to anyone, and fails closed if that fails. A verifier reads the log
with `evidence.eventlog.parse_log` and passes each cva event to `parse_volume_event`.

Event: domain `cva`, operation `volume-create` | `volume-open` | `volume-close`, content
(one line, fields separated by single spaces, always in this order, each `key=value`):

    v=1 name=<name> uuid=<luks-uuid> header-sha256=<64 hex> fs=<fs> ro=<true|false>[ seq=<n>]

* v: the content format version, `1`.
* name: the volume name, `[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}`.
* uuid: the LUKS2 header UUID, canonical lowercase `8-4-4-4-12` hex.
* header-sha256: lowercase hex SHA-256 of the validated LUKS header metadata.
* fs: the filesystem, `[a-z][a-z0-9]{0,15}` (e.g. ext4, xfs).
* ro: `true` when mounted read-only, else `false`.
* seq: persistent volumes only: the monotonic sequence from the MAC'd token, decimal u64 without
  leading zeros. Absent for ephemeral volumes; a verifier that pins a persistent volume should
  require it and compare it with the last sequence it saw (a rolled-back header shows a lower one).

The form is canonical: `parse_volume_content(volume_content(e)) == e` and every accepted text is
exactly what `volume_content` would write, so a policy can match on the text. Only these typed
fields exist: there is no free-form field through which key material could get in.

A relying party pins a volume by its uuid and header-sha256 (and, for persistent volumes, a
minimum seq). The Trustee resource-policy snippet that checks these belongs with the CLI/README
work: the claim path under which the AS exposes AAEL events has not been confirmed here.
"""

from __future__ import annotations

import enum
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
_SEQ = re.compile(r"0|[1-9][0-9]{0,19}")
_KEYS = ("v", "name", "uuid", "header-sha256", "fs", "ro", "seq")


class VolumeEventError(EvidenceError):
    """A volume event that is not in cva's canonical form."""


class VolumeOperation(enum.Enum):
    CREATE = "volume-create"
    OPEN = "volume-open"
    CLOSE = "volume-close"


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


def volume_content(event: VolumeEvent) -> str:
    """The canonical content text of a volume event."""
    parts = [
        f"v={FORMAT_VERSION}",
        f"name={event.name}",
        f"uuid={event.luks_uuid}",
        f"header-sha256={event.header_sha256.hex()}",
        f"fs={event.filesystem}",
        f"ro={'true' if event.read_only else 'false'}",
    ]
    if event.sequence is not None:
        parts.append(f"seq={event.sequence}")
    return " ".join(parts)


def volume_aael(event: VolumeEvent) -> AaelEvent:
    """The AAEL event (domain, operation, content) to measure."""
    return aael_event(DOMAIN, event.operation.value, volume_content(event))


def parse_volume_content(operation: VolumeOperation, content: str) -> VolumeEvent:
    """Parse a content text; accepts only the canonical form `volume_content` writes."""
    items = content.split(" ")
    if not 6 <= len(items) <= 7:
        raise VolumeEventError(f"volume event has {len(items)} fields; 6 or 7 expected")
    values: dict[str, str] = {}
    for item, key in zip(items, _KEYS, strict=False):
        got, sep, value = item.partition("=")
        if not sep or got != key:
            raise VolumeEventError(f"volume event field {item[:32]!r} is not {key}=<value>")
        values[key] = value
    if values["v"] != str(FORMAT_VERSION):
        raise VolumeEventError(f"volume event format v={values['v'][:16]!r} is not supported")
    if _HEX64.fullmatch(values["header-sha256"]) is None:
        raise VolumeEventError("volume event header-sha256 is not 64 lowercase hex digits")
    if values["ro"] not in ("true", "false"):
        raise VolumeEventError("volume event ro is not true or false")
    sequence = None
    if "seq" in values:
        if _SEQ.fullmatch(values["seq"]) is None or int(values["seq"]) > MAX_SEQUENCE:
            raise VolumeEventError("volume event seq is not a canonical decimal u64")
        sequence = int(values["seq"])
    event = VolumeEvent(
        operation,
        values["name"],
        values["uuid"],
        bytes.fromhex(values["header-sha256"]),
        values["fs"],
        values["ro"] == "true",
        sequence,
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
