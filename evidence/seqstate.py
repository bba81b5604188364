"""The verifier's rollback check over cva's volume events, pure: per LUKS UUID, the highest `seq`
seen so far (a state the verifier keeps across boots), and a verdict for every event of a log.

Rules (README "Measured volumes", evidence.volume_event): every read-write open writes seq + 1
into the volume's MAC'd header before the event is recorded, and a create records seq 1, so
* a read-write `volume-open` or a `volume-create` must be strictly above the highest seq seen
  for its UUID (equal: the header from just before the last open was put back; below: an older
  one);
* a read-only `volume-open` and a `volume-close` (both record the current seq) must not be below;
* gaps are normal (a crash between cva's header write and its event skips a number) and are
  only reported;
* the highest seen becomes the maximum of everything checked, in log order, so a log checks
  against its own earlier events too.
Events without a seq (ephemeral volumes) are listed and not tracked; an event without a seq for
a UUID that has one on record is a failure (cva always records a persistent volume's seq).

Unknown operations in cva's domain (a newer cva, e.g. `ephemeral-create`/`ephemeral-close`) do
not stop the check: one whose content carries no `seq` is listed as skipped (it cannot roll a
sequence back); one whose content is a JSON object with a `seq` is a failure, because this
verifier cannot tell which rule applies to it (upgrade the verifier). An event of a known
operation whose content does not parse is a failure too. Other domains are ignored.

A check never lowers a recorded value (`new_state` is the old one with maxima raised). The
caller writes `new_state` only when the whole log verified against its registers and `ok` is
true; the same events checked twice look exactly like a replay, by design (a new boot's log can
be byte-identical to an old one's when the host put back an old header), so each boot's log is
checked once.

State file: UTF-8 JSON `{"v": 1, "volumes": {"<uuid>": <seq>, ...}}`, canonical UUIDs, integer
seqs 0..2^64-1, no other keys, no duplicate keys, at most MAX_STATE_BYTES and MAX_VOLUMES;
anything else is `SeqStateError` (hostile input: never repaired, never overwritten).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from evidence.errors import EvidenceError
from evidence.volume_event import (
    DOMAIN,
    MAX_CONTENT,
    MAX_SEQUENCE,
    VolumeEventError,
    VolumeOperation,
    parse_volume_content,
)

STATE_VERSION = 1
MAX_STATE_BYTES = 4 * 1024 * 1024
MAX_VOLUMES = 65536
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class SeqStateError(EvidenceError):
    """The seq-state file is not one this verifier wrote (malformed, tampered, too large)."""


class _Event(Protocol):
    @property
    def domain(self) -> str: ...
    @property
    def operation(self) -> str: ...
    @property
    def content(self) -> str: ...


@dataclass(frozen=True)
class SeqState:
    """The highest seq seen per LUKS UUID."""

    highest: Mapping[str, int] = field(default_factory=dict)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise SeqStateError(f"seq state: key {key[:40]!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> object:
    raise SeqStateError(f"seq state: {name} is not JSON")


def parse_state(data: bytes) -> SeqState:
    """A state file's bytes; `SeqStateError` naming the first thing wrong."""
    if len(data) > MAX_STATE_BYTES:
        raise SeqStateError(f"seq state is {len(data)} bytes; the limit is {MAX_STATE_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SeqStateError(f"seq state is not UTF-8 (byte {exc.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except SeqStateError:
        raise
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise SeqStateError(f"seq state is not JSON ({where})") from None
    except (ValueError, RecursionError):
        raise SeqStateError("seq state is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"v", "volumes"}:
        raise SeqStateError('seq state must be exactly {"v": 1, "volumes": {...}}')
    if type(doc["v"]) is not int or doc["v"] != STATE_VERSION:
        raise SeqStateError(f"seq state version {str(doc['v'])[:16]!r} is not {STATE_VERSION}")
    volumes = doc["volumes"]
    if not isinstance(volumes, dict):
        raise SeqStateError("seq state volumes must be an object of UUID: seq")
    if len(volumes) > MAX_VOLUMES:
        raise SeqStateError(f"seq state holds {len(volumes)} volumes; the limit is {MAX_VOLUMES}")
    highest: dict[str, int] = {}
    for uuid, seq in volumes.items():
        if not _UUID.fullmatch(uuid):
            raise SeqStateError(f"seq state: {uuid[:40]!r} is not a lowercase LUKS UUID")
        if type(seq) is not int or not 0 <= seq <= MAX_SEQUENCE:
            raise SeqStateError(f"seq state: {uuid}: seq must be an integer 0..{MAX_SEQUENCE}")
        highest[uuid] = seq
    return SeqState(highest)


def encode_state(state: SeqState) -> bytes:
    """The canonical state file (sorted, one volume per line)."""
    doc = {"v": STATE_VERSION, "volumes": dict(sorted(state.highest.items()))}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("ascii")


@dataclass(frozen=True)
class EventVerdict:
    """One cva event of a tracked volume: `before` is the highest seq known before it."""

    index: int  # position in the log
    operation: str
    read_only: bool
    seq: int | None
    before: int | None
    ok: bool
    note: str  # "" | "gap" | the failure, in words


@dataclass(frozen=True)
class VolumeVerdict:
    uuid: str
    names: tuple[str, ...]
    recorded: int | None  # from the state, before this log
    highest: int | None  # after this log
    events: tuple[EventVerdict, ...]

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.events)


@dataclass(frozen=True)
class SkippedEvent:
    index: int
    operation: str
    reason: str


@dataclass(frozen=True)
class SeqReport:
    volumes: tuple[VolumeVerdict, ...]
    skipped: tuple[SkippedEvent, ...]
    problems: tuple[str, ...]  # failures not tied to one UUID
    new_state: SeqState

    @property
    def ok(self) -> bool:
        return not self.problems and all(v.ok for v in self.volumes)

    def failures(self) -> list[str]:
        """Every failure as one line, in log order per volume."""
        out = list(self.problems)
        for vol in self.volumes:
            out += [f"volume {vol.uuid}: {e.note}" for e in vol.events if not e.ok]
        return out


_KNOWN = {op.value for op in VolumeOperation}


def _unknown_has_seq(content: str) -> bool:
    if len(content) > MAX_CONTENT:
        return False
    try:
        value = json.loads(content)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and "seq" in value


def _judge(
    operation: VolumeOperation, read_only: bool, seq: int, before: int | None
) -> tuple[bool, str]:
    if before is None:
        return True, ""
    strict = operation in (VolumeOperation.CREATE, VolumeOperation.REKEY) or (
        operation is VolumeOperation.OPEN and not read_only
    )
    mode = "read-only" if read_only else "read-write"
    label = f"{operation.value} ({mode}) seq {seq}"
    if strict and seq <= before:
        kind = "replay" if seq == before else "rollback"
        return False, f"{kind}: {label} is not above the highest seen, {before}"
    if not strict and seq < before:
        return False, f"rollback: {label} is below the highest seen, {before}"
    if operation is not VolumeOperation.CLOSE and seq > before + (1 if strict else 0):
        return True, "gap"
    return True, ""


def check_sequences(state: SeqState, events: Iterable[_Event]) -> SeqReport:
    """Verdicts for every cva event in `events` (log order) against `state`."""
    highest: dict[str, int] = dict(state.highest)
    per_uuid: dict[str, list[EventVerdict]] = {}
    names: dict[str, list[str]] = {}
    skipped: list[SkippedEvent] = []
    problems: list[str] = []
    for index, event in enumerate(events):
        if event.domain != DOMAIN:
            continue
        if event.operation not in _KNOWN:
            op = event.operation[:40]
            if _unknown_has_seq(event.content):
                problems.append(
                    f"event {index}: cva operation {op!r} carries a seq this verifier has no rule"
                    " for; upgrade cva on the verifier"
                )
            else:
                skipped.append(SkippedEvent(index, op, "unknown cva operation without a seq"))
            continue
        operation = VolumeOperation(event.operation)
        if operation.ephemeral:  # a random key per volume, no seq: nothing to roll back
            skipped.append(SkippedEvent(index, operation.value, "ephemeral volume: no seq"))
            continue
        try:
            parsed = parse_volume_content(operation, event.content)
        except VolumeEventError as exc:
            problems.append(f"event {index}: {event.operation}: {exc.message}")
            continue
        uuid = parsed.luks_uuid
        before = highest.get(uuid)
        if parsed.sequence is None:
            if before is None:
                skipped.append(SkippedEvent(index, event.operation, f"{uuid}: no seq"))
                continue
            verdict = EventVerdict(
                index, event.operation, parsed.read_only, None, before, False,
                f"{event.operation} carries no seq, but seq {before} is on record",
            )  # fmt: skip
        else:
            ok, note = _judge(operation, parsed.read_only, parsed.sequence, before)
            verdict = EventVerdict(
                index, event.operation, parsed.read_only, parsed.sequence, before, ok, note
            )
            if operation is not VolumeOperation.REKEY:  # its open follows with the same seq
                highest[uuid] = max(parsed.sequence, before or 0)
        per_uuid.setdefault(uuid, []).append(verdict)
        seen = names.setdefault(uuid, [])
        if parsed.name not in seen:
            seen.append(parsed.name)
    volumes = tuple(
        VolumeVerdict(
            uuid, tuple(names[uuid]), state.highest.get(uuid), highest.get(uuid), tuple(verdicts)
        )
        for uuid, verdicts in per_uuid.items()
    )
    return SeqReport(volumes, tuple(skipped), tuple(problems), SeqState(highest))
