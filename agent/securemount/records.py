"""What cva has mounted for SecureMount, kept in guest tmpfs so a restarted daemon still knows.

One `MountRecord` per `mount_point` cva served. The file (`<state_dir>/securemount/mounts.json`,
0600) holds no secret: names, paths and device numbers. It is cva's own file, but it is parsed as
strictly as hostile input anyway: a record that does not parse is dropped with a warning (the
volume it named is then left alone, never formatted again: its disk is not blank).

Record states:
    creating   set before an ephemeral volume is made; a record still "creating" when the
               daemon starts means a crash in the middle: the partial volume is released
    mounted    the volume is at `mount_point`; released once that mount (or link) is gone
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from agent.log import get_logger
from agent.statefile import write_private

log = get_logger("cva.securemount")

RecordKind = Literal["ephemeral", "persistent"]
RecordState = Literal["creating", "mounted"]
RecordTarget = Literal["filesystem", "device"]
MAX_RECORDS_BYTES = 1024 * 1024
_DEVNO = re.compile(r"[0-9]{1,7}:[0-9]{1,10}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


@dataclass(frozen=True)
class MountRecord:
    mount_point: str  # where kata-agent asked for it (a guest path)
    kind: RecordKind
    name: str  # persistent: contract volume name; ephemeral: dm name
    devno: str  # "MAJ:MIN" of the disk
    target: RecordTarget
    source: str  # the path bound at mount_point (filesystem) or linked (device)
    header: str  # ephemeral: detached header file; persistent: ""
    state: RecordState
    bound_at: str = ""  # where the kernel put the mount/link (mount_point, symlinks resolved)


def _record_from(doc: object) -> MountRecord | None:
    if not isinstance(doc, dict) or set(doc) != set(MountRecord.__dataclass_fields__):
        return None
    if not all(isinstance(v, str) for v in doc.values()):
        return None
    if doc["kind"] not in ("ephemeral", "persistent") or doc["state"] not in (
        "creating",
        "mounted",
    ):
        return None
    if doc["target"] not in ("filesystem", "device"):
        return None
    if _DEVNO.fullmatch(doc["devno"]) is None or _NAME.fullmatch(doc["name"]) is None:
        return None
    for key in ("mount_point", "source"):
        if not doc[key].startswith("/") or "\x00" in doc[key]:
            return None
    for key in ("header", "bound_at"):
        if doc[key] and (not doc[key].startswith("/") or "\x00" in doc[key]):
            return None
    return MountRecord(**doc)


def parse_records(text: str) -> tuple[tuple[MountRecord, ...], int]:
    """Records from the file's text, and how many entries were dropped as malformed."""
    if len(text) > MAX_RECORDS_BYTES:
        return (), 1
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return (), 1
    if not isinstance(doc, list):
        return (), 1
    good = [r for r in (_record_from(item) for item in doc) if r is not None]
    return tuple(good), len(doc) - len(good)


def dump_records(records: tuple[MountRecord, ...]) -> str:
    return json.dumps([asdict(r) for r in records], sort_keys=True, indent=1) + "\n"


class RecordStore:
    """The records, in memory and (when `path` is set) in the tmpfs file, replaced atomically."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._records: dict[str, MountRecord] = {}
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("securemount_records_unreadable", path=str(path), error=str(exc))
            return
        records, dropped = parse_records(text)
        if dropped:
            log.warning("securemount_records_dropped", path=str(path), dropped=dropped)
        self._records = {r.mount_point: r for r in records}

    def _save(self) -> None:
        if self._path is None:
            return
        write_private(self._path, dump_records(tuple(self._records.values())))

    def all(self) -> tuple[MountRecord, ...]:
        return tuple(self._records.values())

    def at(self, mount_point: str) -> MountRecord | None:
        return self._records.get(mount_point)

    def on_device(self, devno: str) -> tuple[MountRecord, ...]:
        return tuple(r for r in self._records.values() if r.devno == devno)

    def put(self, record: MountRecord) -> None:
        self._records[record.mount_point] = record
        self._save()

    def drop(self, mount_point: str) -> None:
        if self._records.pop(mount_point, None) is not None:
            self._save()
