"""Which header a volume's live mapping was activated from, recorded when cva activated it.

A mapping outlives the call that made it (a failed mount, a killed cva, a busy deactivation), and
the disk's header region is the host's to rewrite at any time. So what a measured event says
about a mapping (LUKS UUID, header digest, seq) is never re-read from the disk: cva writes a
record into its state directory (tmpfs, `<runtime_dir>/mappings/<name>.json`, 0600) from the
validated in-memory copy it activates from, and a later run that finds the mapping still up
takes the identity from that record only.

The record is written *before* the activation (`complete = false`) and completed after the
mapping is checked and its seq written, just before the mount. Only cva makes `cva_*` mappings,
and it activates one only while none is up, so an active mapping always came from the last
record written for it: a crash before the activation leaves a record and no mapping (harmless,
the next activation overwrites it); a crash after it leaves an incomplete record, and such a
mapping is never reused (closed and activated again from the disk's validated header). The
kernel's dm UUID of the mapping (`CRYPT-LUKS2-<uuid without dashes>-<mapper>`, set by
libcryptsetup from the copy) is checked against the record before any reuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from luks.errors import StorageError
from luks.run import run

RECORD_DIR = "mappings"
MAX_RECORD_BYTES = 4096
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_DM_UUID_RE = re.compile(r"CRYPT-LUKS2-([0-9a-f]{32})-([A-Za-z0-9_]{1,64})")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")


class MappingRecordError(StorageError):
    """The state directory's record could not be written, or the mapping's dm UUID read."""


@dataclass(frozen=True)
class MappingRecord:
    """The identity of the validated header copy a mapping was (or is being) activated from."""

    luks_uuid: str  # canonical lower-case 8-4-4-4-12
    header_sha256: bytes  # luks.token.metadata_sha256 of the copy
    seq: int  # the token's seq the mapping stands for (after the open's seq write)
    device: str  # "major:minor" of the disk or LV the mapping was activated on
    complete: bool  # False from just before the activation until just before the mount

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": 1,
                "uuid": self.luks_uuid,
                "header_sha256": self.header_sha256.hex(),
                "seq": self.seq,
                "device": self.device,
                "complete": self.complete,
            },
            sort_keys=True,
        )


def parse_record(text: str) -> MappingRecord | None:
    """A record written by `to_json`; None for anything else (treated as no record at all)."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or set(doc) != {
        "v",
        "uuid",
        "header_sha256",
        "seq",
        "device",
        "complete",
    }:
        return None
    uuid, digest, seq, device, complete = (
        doc["uuid"],
        doc["header_sha256"],
        doc["seq"],
        doc["device"],
        doc["complete"],
    )
    if doc["v"] != 1 or not isinstance(uuid, str) or _UUID_RE.fullmatch(uuid) is None:
        return None
    if not isinstance(digest, str) or re.fullmatch(r"[0-9a-f]{64}", digest) is None:
        return None
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 1 << 63:
        return None
    if not isinstance(device, str) or re.fullmatch(r"[0-9]{1,10}:[0-9]{1,10}", device) is None:
        return None
    if not isinstance(complete, bool):
        return None
    return MappingRecord(uuid, bytes.fromhex(digest), seq, device, complete)


def dm_uuid(luks_uuid: str, mapper: str) -> str:
    """The dm UUID libcryptsetup gives a LUKS2 mapping activated from a header with `luks_uuid`."""
    return f"CRYPT-LUKS2-{luks_uuid.replace('-', '').lower()}-{mapper}"


def reuse_refusal(
    record: MappingRecord | None, *, live_dm_uuid: str, mapper: str, device: str
) -> str | None:
    """Why an active mapping must not be reused with `record` as its identity (None: it may).

    The record must be complete (the activation, table check and seq write all finished), be
    for the same backing device, and name the header whose UUID the kernel holds for the
    mapping. Pure: the shell reads the record, the dm UUID and the device number."""
    if record is None:
        return "cva has no record of the header it was activated from (state dir cleared?)"
    if not record.complete:
        return "its activation did not finish (cva stopped or failed before the mount)"
    if record.device != device:
        return f"it was recorded on device {record.device}, the volume is now on {device}"
    expected = dm_uuid(record.luks_uuid, mapper)
    if live_dm_uuid != expected:
        shown = live_dm_uuid[:80] or "none"
        return f"its dm UUID {shown!r} is not the recorded header's {expected!r}"
    return None


def luks_uuid_of_dm(live_dm_uuid: str, mapper: str) -> str | None:
    """The LUKS UUID (8-4-4-4-12) in a mapping's dm UUID, if it is a LUKS2 mapping of `mapper`."""
    m = _DM_UUID_RE.fullmatch(live_dm_uuid)
    if m is None or m.group(2) != mapper:
        return None
    h = m.group(1)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def record_path(runtime_dir: Path, name: str) -> Path:
    if _NAME_RE.fullmatch(name) is None:
        raise MappingRecordError(f"volume name {name[:40]!r} is not a contract volume name")
    return runtime_dir / RECORD_DIR / f"{name}.json"


def load(runtime_dir: Path, name: str) -> MappingRecord | None:
    path = record_path(runtime_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MappingRecordError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(MAX_RECORD_BYTES + 1)
    if len(data) > MAX_RECORD_BYTES:
        return None
    return parse_record(data.decode("utf-8", "replace"))


def save(runtime_dir: Path, name: str, record: MappingRecord) -> None:
    """Write the record whole: a 0600 sibling, fsync, rename (the folder is made 0700)."""
    path = record_path(runtime_dir, name)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        with os.fdopen(fd, "w") as fh:
            fh.write(record.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError as exc:
        raise MappingRecordError(
            f"cannot record the mapping of volume {name} in {path.parent}: {exc.strerror}; "
            "check the state directory (tmpfs)"
        ) from None


def drop(runtime_dir: Path, name: str) -> None:
    """Forget the record (after the mapping is gone)."""
    with contextlib.suppress(FileNotFoundError):
        record_path(runtime_dir, name).unlink()


def live_dm_uuid(mapper: str, *, timeout: float = 10.0) -> str:
    """The kernel's dm UUID of the active mapping `mapper` ("" when it has none)."""
    result = run(
        ["dmsetup", "info", "-c", "--noheadings", "-o", "uuid", "--", mapper],
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise MappingRecordError(
            f"cannot read the dm UUID of mapping {mapper} (dmsetup info failed: "
            f"{result.stderr.strip()[:200]})"
        )
    return result.text.strip()
