"""The `cva status` report: typed, secret-free, with its JSON form and a table for people.

JSON (`cva status --json`, version 1):

    {"v": 1, "version": "0.1.0", "kbs": {"state": S, "token_expires": T|null},
     "measure": {"sink": SINK|null, "enabled": bool, "required": bool},
     "volumes": [{"name", "kind", "state", "holders", "device", "mapper", "luks_uuid", "seq",
                  "filesystem", "guest_path", "read_only", "size_bytes", "used_bytes",
                  "blank_proof", "last_event", "grow"}, ...]}

kind: "contract" (a volume of the contract: held by containers and/or SecureMount mount points)
or "ephemeral" (a SecureMount ephemeral volume, named by its dm name). S: not-started |
attesting | attested | expired | none. blank_proof (only while a zero scan runs): {"what",
"done", "total", "percent"}. last_event: {"operation", "sink" (null: not recorded), "at"} of
this daemon run, or null. grow: the last online grow of this daemon run (luks.grow), e.g.
"grown", "unchanged", "refused: <why>", "failed: <why>", or null. Unknown values are null.
Nothing here is a key, a passphrase or a token.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal

REPORT_VERSION = 1
VolumeKind = Literal["contract", "ephemeral"]


@dataclass(frozen=True)
class BlankProof:
    what: str
    done: int
    total: int

    @property
    def percent(self) -> int:
        return 100 * self.done // self.total if self.total else 100


@dataclass(frozen=True)
class EventReport:
    operation: str
    sink: str | None
    at: float


@dataclass(frozen=True)
class VolumeReport:
    name: str
    kind: VolumeKind
    state: str
    holders: tuple[str, ...] = ()  # container ids and "securemount:<mount point>"
    device: str | None = None  # the disk under the volume (from sysfs)
    mapper: str | None = None  # the dm-crypt mapping's name
    luks_uuid: str | None = None
    seq: int | None = None  # the token's sequence at open (persistent volumes)
    filesystem: str | None = None
    guest_path: str | None = None
    read_only: bool = False
    size_bytes: int | None = None  # the mounted filesystem's size
    used_bytes: int | None = None
    blank_proof: BlankProof | None = None
    last_event: EventReport | None = None
    grow: str | None = None  # the last online grow: "grown", "refused: <why>", ...


@dataclass(frozen=True)
class KbsReport:
    state: str
    token_expires: float | None = None


@dataclass(frozen=True)
class MeasureReport:
    sink: str | None  # None: `auto` and not decided yet, or disabled
    enabled: bool
    required: bool


@dataclass(frozen=True)
class StatusReport:
    version: str
    kbs: KbsReport
    measure: MeasureReport
    volumes: tuple[VolumeReport, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, object]:
        vols: list[dict[str, object]] = []
        for v in self.volumes:
            doc = asdict(v)
            doc["holders"] = list(v.holders)
            if v.blank_proof is not None:
                doc["blank_proof"] = {**asdict(v.blank_proof), "percent": v.blank_proof.percent}
            vols.append(doc)
        return {
            "v": REPORT_VERSION,
            "version": self.version,
            "kbs": asdict(self.kbs),
            "measure": asdict(self.measure),
            "volumes": vols,
        }


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"  # pragma: no cover - the loop always returns


def _when(at: float | None, now: float) -> str:
    if at is None:
        return "-"
    delta = int(at - now)
    return f"in {delta}s" if delta >= 0 else f"{-delta}s ago"


def render_table(report: StatusReport, now: float | None = None) -> str:
    """The report for a terminal: a header, one table row per volume, then per-volume details."""
    now = time.time() if now is None else now
    kbs = report.kbs
    expires = f" (token {_when(kbs.token_expires, now)})" if kbs.token_expires else ""
    sink = report.measure.sink or ("none" if not report.measure.enabled else "auto, undecided")
    lines = [
        f"cva {report.version}",
        f"KBS session: {kbs.state}{expires}",
        f"measurement sink: {sink}" + (" (required)" if report.measure.required else ""),
        "",
    ]
    if not report.volumes:
        lines.append("no volumes")
        return "\n".join(lines) + "\n"
    header = ("NAME", "KIND", "STATE", "DEVICE", "MAPPER", "SEQ", "SIZE", "USED", "LAST EVENT")
    rows = [header]
    for v in report.volumes:
        state = v.state
        if v.blank_proof is not None:
            state += f" {v.blank_proof.percent}%"
        event = "-"
        if v.last_event is not None:
            event = f"{v.last_event.operation} {_when(v.last_event.at, now)}"
        rows.append(
            (
                v.name,
                v.kind,
                state,
                v.device or "-",
                v.mapper or "-",
                "-" if v.seq is None else str(v.seq),
                _size(v.size_bytes),
                _size(v.used_bytes),
                event,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lines.append("")
    for v in report.volumes:
        detail = [f"uuid={v.luks_uuid or '-'}", f"fs={v.filesystem or '-'}"]
        if v.guest_path:
            detail.append(f"path={v.guest_path}")
        if v.read_only:
            detail.append("read-only")
        if v.holders:
            detail.append("holders=" + ",".join(v.holders))
        if v.blank_proof is not None:
            bp = v.blank_proof
            detail.append(f"blank-proof={bp.what} {bp.done}/{bp.total} bytes")
        if v.last_event is not None:
            detail.append(f"sink={v.last_event.sink or 'not recorded'}")
        if v.grow is not None:
            detail.append(f"grow={v.grow}")
        lines.append(f"{v.name}: " + " ".join(detail))
    return "\n".join(lines) + "\n"


class ReportError(ValueError):
    """A status answer that is not a version-1 report."""


def _str(doc: dict[str, object], key: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise ReportError(f"status field {key!r} is not a string")
    return value


def _int(doc: dict[str, object], key: str) -> int | None:
    value = doc.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ReportError(f"status field {key!r} is not an integer")
    return value


def _float(doc: dict[str, object], key: str) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError(f"status field {key!r} is not a number")
    return float(value)


def _obj(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ReportError(f"status {what} is not an object")
    return value


def _volume_from(doc: dict[str, object]) -> VolumeReport:
    kind = doc.get("kind")
    if kind not in ("contract", "ephemeral"):
        raise ReportError("status volume kind is not contract or ephemeral")
    holders = doc.get("holders", [])
    if not isinstance(holders, list) or not all(isinstance(h, str) for h in holders):
        raise ReportError("status volume holders is not a list of strings")
    bp = doc.get("blank_proof")
    ev = doc.get("last_event")
    proof = None
    if bp is not None:
        b = _obj(bp, "blank_proof")
        proof = BlankProof(_str(b, "what") or "", _int(b, "done") or 0, _int(b, "total") or 0)
    event = None
    if ev is not None:
        e = _obj(ev, "last_event")
        event = EventReport(_str(e, "operation") or "", _str(e, "sink"), _float(e, "at") or 0.0)
    return VolumeReport(
        name=_str(doc, "name") or "",
        kind="contract" if kind == "contract" else "ephemeral",
        state=_str(doc, "state") or "",
        holders=tuple(str(h) for h in holders),
        device=_str(doc, "device"),
        mapper=_str(doc, "mapper"),
        luks_uuid=_str(doc, "luks_uuid"),
        seq=_int(doc, "seq"),
        filesystem=_str(doc, "filesystem"),
        guest_path=_str(doc, "guest_path"),
        read_only=doc.get("read_only") is True,
        size_bytes=_int(doc, "size_bytes"),
        used_bytes=_int(doc, "used_bytes"),
        blank_proof=proof,
        last_event=event,
        grow=_str(doc, "grow"),
    )


def report_from_json(doc: dict[str, object]) -> StatusReport:
    """The typed report from its JSON form (what `cva status` received)."""
    if doc.get("v") != REPORT_VERSION:
        raise ReportError(f"status report version is not {REPORT_VERSION}")
    kbs = _obj(doc.get("kbs"), "kbs")
    measure = _obj(doc.get("measure"), "measure")
    vols = doc.get("volumes")
    if not isinstance(vols, list):
        raise ReportError("status volumes is not a list")
    return StatusReport(
        version=_str(doc, "version") or "",
        kbs=KbsReport(_str(kbs, "state") or "", _float(kbs, "token_expires")),
        measure=MeasureReport(
            _str(measure, "sink"),
            enabled=measure.get("enabled") is True,
            required=measure.get("required") is True,
        ),
        volumes=tuple(_volume_from(_obj(v, "volume")) for v in vols),
    )
