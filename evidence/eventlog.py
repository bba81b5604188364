"""Runtime-measurement event logs in the Attestation Agent's format (AAEL events in TCG2 entries),
pure: encode an entry, parse a whole log, replay it per register, check registers, and the
write-ahead entry with its recovery decision. SPEC.md §e.6; no I/O, no TPM, no AA client here.

Intended use (wired in by the daemon/CLI later, not by this module):
* cva measuring a volume: build the AAEL text (`evidence.volume_event`), then either send
  domain/operation/content to the Attestation Agent (`evidence.aa_wire`), or measure directly:
  `encode_wal(WalEntry(offset=len(log), expected=extend(alg, current, digest), text))` to the WAL
  file, extend the register with `event_digest(alg, text)`, write `encode_entry(...)` at that
  offset, delete the WAL. After a crash: `plan_recovery(parse_wal(...), current=<register>,
  before=register_before(log, wal.offset, ...))` says what to finish, or raises.
* the verifier (`cva evidence events LOG --register INDEX=HEX`): `parse_log`, `replay`,
  `check_registers`.

Entry layout (all integers little-endian):
    u32 register | u32 event_type = 0x6 (EV_EVENT_TAG) | u32 digest_count = 1 |
    u16 alg | digest[size(alg)] | u32 event_data_length | event_data
    event_data = u32 tag 0x4141454c ("AAEL") | u32 size | AAEL text (UTF-8, `size` bytes)
The digest is H(event_data) -- the whole tagged event -- and the register is extended with it:
R' = H(R || digest), starting from the register's initial value (zeros of the digest size
unless the caller says otherwise: a TPM's PCR 17..22 start at all 0xFF before any DRTM).

Algorithms: SHA-256 (0x0B), SHA-384 (0x0C), SHA-512 (0x0D). SM3 (0x12) is recognised and
refused: hashlib cannot be relied on to have it, so its digests could not be checked.

AAEL text grammar (exactly one line): `<domain> SP <operation> SP <content>`, split at the first
two U+0020 spaces. `domain` and `operation` are non-empty and contain no space; `content` may be
empty and may contain spaces (even a leading one). No newline (U+000A) anywhere; at most
MAX_TEXT_BYTES bytes of UTF-8. Every text that cva itself encodes also follows the AAEL spec's
stricter rules ("Specification for Attestation Agent Event Log", CoCo): no white space at all in
domain and operation, no control characters (C0, DEL, C1) anywhere, domain and operation within
MAX_NAME_BYTES. The parser follows what the AA itself enforces (split, no LF) and accepts
other writers' events (the AA's log holds events of every domain) as long as they follow the
grammar, and refuses the whole log otherwise.

Strictness of `parse_log`: every entry must be an AAEL event exactly as the AA writes it
(type 0x6, one digest, tag "AAEL", tagged size == event_data_length - 8, digest == H(event_data)),
no trailing bytes, at most MAX_LOG_BYTES and MAX_EVENTS. Errors are `EventLogError` with the byte
offset of the entry that is malformed.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from evidence.errors import EvidenceError

EV_EVENT_TAG = 0x6
AAEL_TAG = 0x4141454C

ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_SM3 = 0x0012

DIGEST_SIZES: Mapping[int, int] = {ALG_SHA256: 32, ALG_SHA384: 48, ALG_SHA512: 64, ALG_SM3: 32}
ALG_NAMES: Mapping[int, str] = {
    ALG_SHA256: "sha256",
    ALG_SHA384: "sha384",
    ALG_SHA512: "sha512",
    ALG_SM3: "sm3",
}
SUPPORTED_ALGS = (ALG_SHA256, ALG_SHA384, ALG_SHA512)

MAX_LOG_BYTES = 16 * 1024 * 1024
MAX_EVENTS = 65536
MAX_TEXT_BYTES = 64 * 1024
MAX_NAME_BYTES = 255
MAX_REGISTER = 0xFFFFFFFF

_HEAD = struct.Struct("<IIIH")  # register, event type, digest count, alg
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<II")  # tag, size
_WAL_OFFSET = struct.Struct(">Q")


class AaelTextError(EvidenceError):
    """An AAEL text (domain, operation, content) that breaks the grammar above."""


class EventLogError(EvidenceError):
    """A malformed or unverifiable event log; `offset` is where the bad entry starts."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"event log entry at byte offset {offset}: {message}")
        self.offset = offset


class WalError(EvidenceError):
    """A malformed write-ahead entry, or a crash state that cannot be recovered (fatal)."""


# ----------------------------------------------------------------------------------------------
# AAEL text


@dataclass(frozen=True)
class AaelEvent:
    """One AAEL event; construct it through `aael_event` (validated) or `parse_aael_text`."""

    domain: str
    operation: str
    content: str

    @property
    def text(self) -> str:
        return f"{self.domain} {self.operation} {self.content}"


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)


def aael_event(domain: str, operation: str, content: str) -> AaelEvent:
    """Validate an event cva is about to record (the strict, encode-side grammar)."""
    for field, value in (("domain", domain), ("operation", operation)):
        if not value:
            raise AaelTextError(f"AAEL {field} is empty; name the {field}")
        if any(c.isspace() for c in value):
            raise AaelTextError(f"AAEL {field} contains white space; it must be one word")
        if len(value.encode()) > MAX_NAME_BYTES:
            raise AaelTextError(f"AAEL {field} is longer than {MAX_NAME_BYTES} bytes")
    for field, value in (("domain", domain), ("operation", operation), ("content", content)):
        if _has_control(value):
            raise AaelTextError(
                f"AAEL {field} contains a newline or another control character;"
                " an event is one printable line"
            )
    event = AaelEvent(domain, operation, content)
    try:
        size = len(event.text.encode())
    except UnicodeEncodeError:
        raise AaelTextError("AAEL text is not valid Unicode (lone surrogate)") from None
    if size > MAX_TEXT_BYTES:
        raise AaelTextError(f"AAEL text is {size} bytes; the limit is {MAX_TEXT_BYTES}")
    return event


def parse_aael_text(text: str) -> AaelEvent:
    """Split an AAEL text at its first two spaces (the parse-side grammar, any writer)."""
    if "\n" in text:
        raise AaelTextError("AAEL text contains a newline; an event is one line")
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise AaelTextError("AAEL text is not valid Unicode (lone surrogate)") from None
    if size > MAX_TEXT_BYTES:
        raise AaelTextError(f"AAEL text is {size} bytes; the limit is {MAX_TEXT_BYTES}")
    parts = text.split(" ", 2)
    if len(parts) != 3:
        raise AaelTextError("AAEL text is not '<domain> <operation> <content>' (needs two spaces)")
    domain, operation, content = parts
    if not domain or not operation:
        raise AaelTextError("AAEL text has an empty domain or operation (double space)")
    return AaelEvent(domain, operation, content)


# ----------------------------------------------------------------------------------------------
# Digests, entries


def _hash(alg: int, data: bytes) -> bytes:
    if alg not in SUPPORTED_ALGS:
        raise EvidenceError(f"digest algorithm {alg:#06x} is not supported (sha256/384/512 only)")
    return hashlib.new(ALG_NAMES[alg], data).digest()


def tagged_event(text: str) -> bytes:
    """The TCG2 event_data of an AAEL text: tag "AAEL", u32 size, the UTF-8 text."""
    raw = text.encode()
    return _TAG.pack(AAEL_TAG, len(raw)) + raw


def event_digest(alg: int, text: str) -> bytes:
    """The digest recorded in the entry and extended into the register: H(tagged event)."""
    return _hash(alg, tagged_event(text))


def extend(alg: int, value: bytes, digest: bytes) -> bytes:
    """One register extend: H(value || digest); both must have the algorithm's size."""
    size = DIGEST_SIZES.get(alg)
    if size is None or alg not in SUPPORTED_ALGS:
        raise EvidenceError(f"digest algorithm {alg:#06x} is not supported (sha256/384/512 only)")
    if len(value) != size or len(digest) != size:
        raise EvidenceError(
            f"extend with {ALG_NAMES[alg]} needs {size}-byte values, got {len(value)} and"
            f" {len(digest)}"
        )
    return _hash(alg, value + digest)


def encode_entry(register: int, alg: int, event: AaelEvent) -> bytes:
    """One TCG2 entry for an event; validates the event with the encode-side grammar."""
    if not 0 <= register <= MAX_REGISTER:
        raise EvidenceError(f"register index {register} does not fit a u32")
    checked = aael_event(event.domain, event.operation, event.content)
    data = tagged_event(checked.text)
    return (
        _HEAD.pack(register, EV_EVENT_TAG, 1, alg) + _hash(alg, data) + _U32.pack(len(data)) + data
    )


@dataclass(frozen=True)
class LogEvent:
    """One parsed entry; `offset` is where it starts in the log."""

    offset: int
    register: int
    alg: int
    digest: bytes
    domain: str
    operation: str
    content: str

    @property
    def text(self) -> str:
        return f"{self.domain} {self.operation} {self.content}"


def _parse_entry(log: bytes, start: int) -> tuple[LogEvent, int]:
    def fail(message: str) -> EventLogError:
        return EventLogError(message, start)

    end = len(log)
    if end - start < _HEAD.size:
        raise fail(f"truncated: {end - start} bytes left, the entry header needs {_HEAD.size}")
    register, event_type, count, alg = _HEAD.unpack_from(log, start)
    if event_type != EV_EVENT_TAG:
        raise fail(f"event type {event_type:#x} is not EV_EVENT_TAG (0x6)")
    if count != 1:
        raise fail(f"{count} digests; an AAEL entry has exactly one")
    size = DIGEST_SIZES.get(alg)
    if size is None:
        raise fail(f"digest algorithm {alg:#06x} is unknown")
    if alg not in SUPPORTED_ALGS:
        raise fail(f"digest algorithm {ALG_NAMES[alg]} is recognised but not supported")
    pos = start + _HEAD.size
    if end - pos < size + _U32.size:
        raise fail(f"truncated: the {ALG_NAMES[alg]} digest and data length need {size + 4} bytes")
    digest = log[pos : pos + size]
    pos += size
    (data_len,) = _U32.unpack_from(log, pos)
    pos += _U32.size
    if data_len > _TAG.size + MAX_TEXT_BYTES:
        raise fail(f"event data is {data_len} bytes; the limit is {_TAG.size + MAX_TEXT_BYTES}")
    if data_len < _TAG.size:
        raise fail(f"event data is {data_len} bytes, shorter than the AAEL tag and size")
    if end - pos < data_len:
        raise fail(f"truncated: event data needs {data_len} bytes, {end - pos} left")
    data = log[pos : pos + data_len]
    pos += data_len
    tag, text_len = _TAG.unpack_from(data, 0)
    if tag != AAEL_TAG:
        raise fail(f"tag {tag:#010x} is not AAEL (0x4141454c)")
    if text_len != data_len - _TAG.size:
        raise fail(f"AAEL size {text_len} does not match event data length {data_len} - 8")
    if not hmac.compare_digest(digest, _hash(alg, data)):
        raise fail(f"digest is not the {ALG_NAMES[alg]} of the event data (altered entry)")
    try:
        text = data[_TAG.size :].decode("utf-8", errors="strict")
        event = parse_aael_text(text)
    except UnicodeDecodeError:
        raise fail("AAEL text is not UTF-8") from None
    except AaelTextError as e:
        raise fail(e.message) from None
    return (
        LogEvent(start, register, alg, digest, event.domain, event.operation, event.content),
        pos,
    )


def parse_log(log: bytes) -> tuple[LogEvent, ...]:
    """Every entry of a whole log (AA's or cva's); raises `EventLogError` with the offset."""
    if len(log) > MAX_LOG_BYTES:
        raise EventLogError(f"the log is {len(log)} bytes; the limit is {MAX_LOG_BYTES}", 0)
    events: list[LogEvent] = []
    pos = 0
    while pos < len(log):
        if len(events) >= MAX_EVENTS:
            raise EventLogError(f"more than {MAX_EVENTS} entries", pos)
        event, pos = _parse_entry(log, pos)
        events.append(event)
    return tuple(events)


# ----------------------------------------------------------------------------------------------
# Replay and register checks


def replay(
    events: Iterable[LogEvent], initial: Mapping[int, bytes] | None = None
) -> dict[int, bytes]:
    """Each register's value after the events: R' = H(R || digest) from its initial value.

    `initial` gives a register's starting value (default zeros of the algorithm's size). All
    entries of one register must use one algorithm (a register has one bank in these logs)."""
    initial = initial or {}
    values: dict[int, bytes] = {}
    algs: dict[int, int] = {}
    for ev in events:
        if ev.register not in values:
            start = initial.get(ev.register, bytes(DIGEST_SIZES[ev.alg]))
            if len(start) != DIGEST_SIZES[ev.alg]:
                raise EventLogError(
                    f"the initial value of register {ev.register} is {len(start)} bytes,"
                    f" {ALG_NAMES[ev.alg]} needs {DIGEST_SIZES[ev.alg]}",
                    ev.offset,
                )
            values[ev.register], algs[ev.register] = start, ev.alg
        elif algs[ev.register] != ev.alg:
            raise EventLogError(
                f"register {ev.register} mixes {ALG_NAMES[algs[ev.register]]} and"
                f" {ALG_NAMES[ev.alg]} entries",
                ev.offset,
            )
        values[ev.register] = extend(ev.alg, values[ev.register], ev.digest)
    return values


@dataclass(frozen=True)
class RegisterCheck:
    """`verified` only when at least one register was claimed, every claimed register equals
    its replay, and every register the log extends was claimed (no unchecked events)."""

    verified: bool
    matched: tuple[int, ...]
    mismatched: tuple[int, ...]
    unchecked: tuple[int, ...]


def check_registers(
    replayed: Mapping[int, bytes],
    claimed: Mapping[int, bytes],
    initial: Mapping[int, bytes] | None = None,
) -> RegisterCheck:
    """Compare replayed values with the register values a quote/report vouches for, in
    constant time. A claimed register the log never extends must equal its initial value
    (`initial`, else zeros of the claimed size)."""
    initial = initial or {}
    matched: list[int] = []
    mismatched: list[int] = []
    for index in sorted(claimed):
        value = claimed[index]
        expected = replayed.get(index, initial.get(index, bytes(len(value))))
        (matched if hmac.compare_digest(expected, value) else mismatched).append(index)
    unchecked = tuple(sorted(set(replayed) - set(claimed)))
    verified = bool(claimed) and not mismatched and not unchecked
    return RegisterCheck(verified, tuple(matched), tuple(mismatched), unchecked)


# ----------------------------------------------------------------------------------------------
# Write-ahead entry and crash recovery


@dataclass(frozen=True)
class WalEntry:
    """`.wal_event_entry`: where the entry goes, the register value after the extend, the text."""

    offset: int
    expected: bytes
    text: str


def encode_wal(entry: WalEntry, alg: int) -> bytes:
    """u64 big-endian offset | expected register value | AAEL text (UTF-8, to the end)."""
    size = DIGEST_SIZES.get(alg)
    if size is None or alg not in SUPPORTED_ALGS:
        raise WalError(f"digest algorithm {alg:#06x} is not supported (sha256/384/512 only)")
    if not 0 <= entry.offset <= MAX_LOG_BYTES:
        raise WalError(f"WAL offset {entry.offset} is outside 0..{MAX_LOG_BYTES}")
    if len(entry.expected) != size:
        raise WalError(f"WAL register value is {len(entry.expected)} bytes, {size} expected")
    event = parse_aael_text(entry.text)
    checked = aael_event(event.domain, event.operation, event.content)
    return _WAL_OFFSET.pack(entry.offset) + entry.expected + checked.text.encode()


def parse_wal(data: bytes, alg: int) -> WalEntry:
    """Parse a WAL file written for `alg` (the file does not say which; the writer knows)."""
    size = DIGEST_SIZES.get(alg)
    if size is None or alg not in SUPPORTED_ALGS:
        raise WalError(f"digest algorithm {alg:#06x} is not supported (sha256/384/512 only)")
    head = _WAL_OFFSET.size + size
    if len(data) < head:
        raise WalError(f"WAL is {len(data)} bytes, shorter than offset + {ALG_NAMES[alg]} value")
    if len(data) > head + MAX_TEXT_BYTES:
        raise WalError(f"WAL is {len(data)} bytes; the limit is {head + MAX_TEXT_BYTES}")
    (offset,) = _WAL_OFFSET.unpack_from(data, 0)
    if offset > MAX_LOG_BYTES:
        raise WalError(f"WAL offset {offset} is beyond the log limit {MAX_LOG_BYTES}")
    try:
        text = data[head:].decode("utf-8", errors="strict")
        event = parse_aael_text(text)
    except UnicodeDecodeError:
        raise WalError(
            "WAL text is not UTF-8; delete the WAL only after checking the log"
        ) from None
    except AaelTextError as e:
        raise WalError(f"WAL text: {e.message}") from None
    return WalEntry(offset, data[_WAL_OFFSET.size : head], event.text)


class RecoveryAction(enum.Enum):
    REWRITE_ENTRY = "rewrite entry only"  # the register already has the event
    EXTEND_THEN_WRITE = "extend then write"  # the crash came before the extend


@dataclass(frozen=True)
class RecoveryPlan:
    """What to finish: (extend with `digest` if asked, then) write `entry` at `offset`,
    truncate the log there + len(entry), delete the WAL."""

    action: RecoveryAction
    offset: int
    digest: bytes
    entry: bytes


def register_before(
    log: bytes, offset: int, register: int, alg: int, initial: bytes | None = None
) -> bytes:
    """The register's value as the log explains it up to `offset` (the WAL's entry position):
    the log prefix must parse to exactly that offset."""
    size = DIGEST_SIZES.get(alg)
    if size is None or alg not in SUPPORTED_ALGS:
        raise WalError(f"digest algorithm {alg:#06x} is not supported (sha256/384/512 only)")
    if not 0 <= offset <= len(log):
        raise WalError(f"WAL offset {offset} is past the end of the {len(log)}-byte log")
    start = bytes(size) if initial is None else initial
    if len(start) != size:
        raise WalError(f"the initial value of register {register} is not {size} bytes")
    mine = [ev for ev in parse_log(log[:offset]) if ev.register == register]
    if any(ev.alg != alg for ev in mine):
        raise WalError(f"the log extends register {register} with another algorithm than the WAL")
    return replay(mine, {register: start}).get(register, start)


def plan_recovery(
    wal: WalEntry, *, register: int, alg: int, current: bytes, before: bytes
) -> RecoveryPlan:
    """Decide how to finish an interrupted measurement, or refuse (fatal, naming the values).

    `current` is the register now; `before` the value it had when the WAL was written (as
    `register_before` computes it from the log). The WAL must follow from `before`:
    H(before || digest) == expected. Then current == expected -> the extend happened, only the
    entry is missing; current == before -> extend, then write; anything else -> someone else
    extended the register or the log/WAL is corrupt."""
    size = DIGEST_SIZES.get(alg)
    if size is None or alg not in SUPPORTED_ALGS:
        raise WalError(f"digest algorithm {alg:#06x} is not supported (sha256/384/512 only)")
    if len(current) != size or len(before) != size or len(wal.expected) != size:
        raise WalError(f"recovery needs {size}-byte {ALG_NAMES[alg]} register values")
    try:
        event = parse_aael_text(wal.text)
        entry = encode_entry(register, alg, event)
    except AaelTextError as e:
        raise WalError(f"cannot recover the measurement: WAL text: {e.message}") from None
    digest = event_digest(alg, event.text)
    shown = (
        f"register {register} is {current.hex()}, the WAL expects {wal.expected.hex()},"
        f" the log gives {before.hex()} before the entry"
    )
    if not hmac.compare_digest(extend(alg, before, digest), wal.expected):
        raise WalError(
            f"cannot recover the measurement: the WAL does not follow from the log ({shown});"
            " the log or the WAL is corrupt, keep both for inspection and restart the VM"
        )
    if hmac.compare_digest(current, wal.expected):
        return RecoveryPlan(RecoveryAction.REWRITE_ENTRY, wal.offset, digest, entry)
    if hmac.compare_digest(current, before):
        return RecoveryPlan(RecoveryAction.EXTEND_THEN_WRITE, wal.offset, digest, entry)
    raise WalError(
        f"cannot recover the measurement: {shown}; another process extended the register or"
        " the log is corrupt, restart the VM"
    )
