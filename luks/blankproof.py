"""The blankness proof cva runs before it formats anything (DESIGN §4), and `cva luks blank`.

Blank = no signature of any kind (cva's own magics, then `blkid -p`) AND every byte of the
target reads as zeros (`mode = "full"`, the default: `blank.scan_zeros`, O_DIRECT 4 MiB reads
by four threads, memcmp outside the GIL). `mode = "sampled"` (the contract's explicit
`blank_check = "sampled"`) reads only the 16 MiB header region, the first and last MiB after
it and 32 x 64 KiB spread samples (`blank.sample_plan`): it cannot see data anywhere else,
e.g. a filesystem whose header region was zeroed and whose files lie between two samples.

Resuming within one boot: a full scan interrupted (the daemon killed or restarted; a call's
deadline does not stop it) leaves a cursor in tmpfs (`<state_dir>/blank/`), keyed by the block
device's major:minor, its size in bytes and its `diskseq`. The kernel gives every disk it
attaches (a hot-plugged virtio disk, a loop device given a new backing file, a device-mapper
device made again) a new diskseq, never reused within a boot, so a disk swapped between calls
never inherits another disk's cursor. A device without a diskseq (an old kernel, a regular
file) gets no cursor: its scan starts over. cva drops the cursor before it first writes to the
device. Residual risk, stated: the host can change what a disk holds without a new attach
(writing into the image file, a storage-side copy); a scanned prefix changed that way is not
seen again. That is no weaker than the scan itself: the host can write after any scan, before
the format, just as well; what the proof shows is that the disk held nothing cva could destroy
when cva looked.

Nothing here imports `agent` (issue 15): the caller logs and reports progress.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from luks import blank

_BlankVerdict = blank.BlankVerdict  # (a Proof's field is named `blank`)
BlankCheck = Literal["full", "sampled"]
BLANK_CHECKS: tuple[BlankCheck, ...] = ("full", "sampled")
CURSOR_EVERY = 2.0  # seconds between cursor saves during a scan

# progress(bytes proven so far, bytes in total): at most every `progress_every` seconds
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Proof:
    """What the proof found; `as_json` is the `cva luks blank` output."""

    blank: bool
    mode: BlankCheck
    size_bytes: int
    bytes_scanned: int  # bytes shown to be zero (a resumed scan counts the cursor's prefix)
    first_nonzero_offset: int | None
    reasons: tuple[str, ...] = ()
    resumed_from: int = 0  # the cursor the scan resumed from (0: from the start)
    signatures: tuple[str, ...] = field(default=())

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    @property
    def verdict(self) -> _BlankVerdict:
        return _BlankVerdict(self.blank, self.reason)

    def as_json(self) -> dict[str, object]:
        return {
            "blank": self.blank,
            "mode": self.mode,
            "size_bytes": self.size_bytes,
            "bytes_scanned": self.bytes_scanned,
            "first_nonzero_offset": self.first_nonzero_offset,
            "reasons": list(self.reasons),
        }


# ---- the cursor (pure parts first) ----------------------------------------------------------


@dataclass(frozen=True)
class DeviceIdentity:
    devno: str  # "major:minor"
    size: int
    diskseq: int


def cursor_name(ident: DeviceIdentity) -> str:
    return "blank-" + ident.devno.replace(":", "-") + ".json"


def cursor_doc(ident: DeviceIdentity, scanned: int) -> dict[str, object]:
    return {"devno": ident.devno, "size": ident.size, "diskseq": ident.diskseq, "scanned": scanned}


def cursor_offset(doc: object, ident: DeviceIdentity) -> int:
    """Where a scan of `ident` may resume from a stored cursor: 0 unless the cursor names exactly
    this device (major:minor, size and diskseq) and holds an aligned offset inside it."""
    if not isinstance(doc, dict):
        return 0
    if (
        doc.get("devno") != ident.devno
        or doc.get("size") != ident.size
        or doc.get("diskseq") != ident.diskseq
    ):
        return 0
    scanned = doc.get("scanned")
    if type(scanned) is not int or not 0 <= scanned <= ident.size:
        return 0
    if scanned != ident.size and scanned % blank.SCAN_ALIGN:
        return 0
    return scanned


def device_identity(path: Path) -> DeviceIdentity | None:
    """major:minor, size and diskseq of a block device; None for anything else (no cursor)."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    try:
        diskseq = int(Path(f"/sys/dev/block/{devno}/diskseq").read_text().strip())
    except (OSError, ValueError):
        return None  # no diskseq: a swapped disk could not be told apart, so no cursor
    return DeviceIdentity(devno, blank.device_size(path), diskseq)


def load_cursor(cursor_dir: Path, ident: DeviceIdentity) -> int:
    try:
        doc = json.loads((cursor_dir / cursor_name(ident)).read_text())
    except (OSError, ValueError, RecursionError):
        return 0
    return cursor_offset(doc, ident)


def save_cursor(cursor_dir: Path, ident: DeviceIdentity, scanned: int) -> None:
    cursor_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = cursor_dir / cursor_name(ident)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(cursor_doc(ident, scanned), fh)
    tmp.replace(path)


def drop_cursor(cursor_dir: Path | None, device: Path) -> None:
    """Forget any scan of `device`: called before cva first writes to it."""
    if cursor_dir is None:
        return
    try:
        rdev = device.stat().st_rdev
    except OSError:
        return
    name = f"blank-{os.major(rdev)}-{os.minor(rdev)}.json"
    with contextlib.suppress(FileNotFoundError):
        (cursor_dir / name).unlink()


# ---- the proof ------------------------------------------------------------------------------


def signatures(device: Path, *, timeout: float = 30.0) -> tuple[str, ...]:
    """cva's own magics in the first 8 KiB, then libblkid's low-level probe."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        found = list(blank.magics_in(os.pread(fd, 8192, 0)))
    finally:
        os.close(fd)
    found.extend(blank.blkid_signatures(device, timeout=timeout))
    return tuple(dict.fromkeys(found))


def prove_blank(
    device: Path,
    *,
    mode: BlankCheck = "full",
    cursor_dir: Path | None = None,
    progress: Progress | None = None,
    progress_every: float = 1.0,
    timeout: float = 30.0,
) -> Proof:
    """Signatures first (cheap, and a refusal names what was found), then the zero proof.

    The full scan reads every byte from offset 0 (or a resume cursor) with O_DIRECT, the
    header region the caller already copied included: that copy came through the page cache,
    which may remember zeros the medium no longer holds. `cursor_dir`: where a full scan keeps
    its resumable cursor (tmpfs); None = no cursor.
    """
    size = blank.device_size(device)
    sigs = signatures(device, timeout=timeout)
    if sigs:
        return Proof(False, mode, size, 0, None, ("signature found: " + ", ".join(sigs),), 0, sigs)
    if mode == "sampled":
        return _sampled(device, size)
    return _full(device, size, cursor_dir, progress=progress, every=progress_every)


def _sampled(device: Path, size: int) -> Proof:
    plan = blank.sample_plan(size)
    read = 0
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for s in plan:
            data = blank.read_range(fd, s.offset, s.length)
            if len(data) != s.length:
                raise OSError(f"short read at {s.offset} of {device}")
            if not blank.is_zero(data):
                first = s.offset + next(i for i, b in enumerate(data) if b)
                return Proof(
                    False, "sampled", size, read + first - s.offset, first,
                    (f"non-zero data in the {s.what} (byte {first})",),
                )  # fmt: skip
            read += s.length
    finally:
        os.close(fd)
    return Proof(
        True, "sampled", size, read, None,
        (f"sampled only: {read} of {size} bytes read; data elsewhere is not seen",),
    )  # fmt: skip


def _full(
    device: Path,
    size: int,
    cursor_dir: Path | None,
    *,
    progress: Progress | None,
    every: float,
) -> Proof:
    ident = device_identity(device) if cursor_dir is not None else None
    resumed = load_cursor(cursor_dir, ident) if cursor_dir is not None and ident else 0
    start = resumed
    last_save = time.monotonic()

    def on_progress(done: int, _length: int) -> None:
        nonlocal last_save
        now = time.monotonic()
        if cursor_dir is not None and ident is not None and now - last_save >= CURSOR_EVERY:
            last_save = now
            save_cursor(cursor_dir, ident, start + done)
        if progress is not None:
            progress(start + done, size)

    if progress is not None:
        progress(start, size)
    scan = blank.scan_zeros(device, start, size - start, progress=on_progress, progress_every=every)
    if not scan.zero:
        if cursor_dir is not None:
            drop_cursor(cursor_dir, device)
        return Proof(
            False, "full", size, start + scan.bytes_scanned, scan.first_nonzero,
            (f"non-zero data at byte {scan.first_nonzero} (of {size})",), resumed,
        )  # fmt: skip
    if cursor_dir is not None and ident is not None:
        save_cursor(cursor_dir, ident, size)  # a crash before the format need not rescan
    return Proof(True, "full", size, size, None, (), resumed)
