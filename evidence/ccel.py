"""The TDX CC event log (ACPI CCEL table data), pure: trimming as guest-components does before
sending it, and the event records (for `cva evidence parse` and tests).

Layout (TCG PC Client crypto-agile): one TCG_PCR_EVENT header (`mr u32, type u32, sha1[20],
size u32, data`), then TCG_PCR_EVENT2 records (`mr u32, type u32, count u32, {alg u16,
digest}*count, size u32, data`) until an 8-byte all-FF or all-00 marker (the unused rest of the
ACPI area). `mr` index 1..4 = RTMR0..3 (0 = MRTD).
"""

from __future__ import annotations

from dataclasses import dataclass

from evidence.errors import EvidenceError
from evidence.reader import Reader

EV_NO_ACTION = 3
END_MARKERS = (b"\xff" * 8, bytes(8))
DIGEST_SIZES = {0x0004: 20, 0x000B: 32, 0x000C: 48, 0x000D: 64, 0x0012: 32}
MAX_CCEL = 64 * 1024 * 1024
MAX_EVENTS = 1_000_000


@dataclass(frozen=True)
class CcEvent:
    mr_index: int
    event_type: int
    digests: tuple[tuple[int, bytes], ...]
    data: bytes


def _events(ccel: bytes) -> tuple[int, list[CcEvent]]:
    """Parse to the end marker; returns (length up to the marker, the TCG_PCR_EVENT2 records)."""
    if len(ccel) > MAX_CCEL:
        raise EvidenceError(f"CCEL is {len(ccel)} bytes; the limit is {MAX_CCEL}")
    r = Reader(ccel, "CCEL")
    r.take(4, "header mr index")
    header_type = r.u32le("header event type")
    r.take(20, "header digest")
    if header_type == EV_NO_ACTION:
        r.take(r.u32le("header event size"), "header event")
    events: list[CcEvent] = []
    while True:
        if r.remaining < 8:
            raise EvidenceError("CCEL has no end marker")
        if ccel[r.pos : r.pos + 8] in END_MARKERS:
            return r.pos, events
        if len(events) >= MAX_EVENTS:
            raise EvidenceError(f"CCEL has more than {MAX_EVENTS} events")
        mr = r.u32le("mr index")
        etype = r.u32le("event type")
        count = r.u32le("digest count")
        if count > len(DIGEST_SIZES):
            raise EvidenceError(f"CCEL event with {count} digests")
        digests = []
        for _ in range(count):
            alg = r.u16le("digest algorithm")
            if alg not in DIGEST_SIZES:
                raise EvidenceError(f"CCEL digest algorithm {alg:#06x} is not supported")
            digests.append((alg, r.take(DIGEST_SIZES[alg], "digest")))
        data = r.take(r.u32le("event size"), "event data")
        events.append(CcEvent(mr, etype, tuple(digests), data))


def trim_ccel(ccel: bytes) -> bytes:
    """The log up to (not including) the end marker, as guest-components sends it."""
    end, _ = _events(bytes(ccel))
    return bytes(ccel[:end])


def parse_ccel(ccel: bytes) -> list[CcEvent]:
    return _events(bytes(ccel))[1]
