"""Pure decisions of the volume state machine (see luks.volume for the states and windows).

Everything here is a function of observed facts: no device, process or file is touched, so
each rule is unit-tested on the host.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from luks import blank, dmtable
from luks.errors import StorageError

DATA_OFFSET_BYTES = 16 * 1024 * 1024
DATA_OFFSET_SECTORS = DATA_OFFSET_BYTES // 512
# dm names LVM makes are `<vg>-<lv>` with every hyphen inside a name doubled, so they always
# hold exactly one single hyphen. cva's crypt mappings hold none (volume names use only
# [a-z0-9-]; "-" becomes "_"), so no VG/LV pair in a contract can take a crypt mapping's name.
MAPPER_PREFIX = "cva_"
GROW_SLACK = 4 * 1024 * 1024
INITIALIZING = "initializing"  # the cva token states (luks.token)
READY = "ready"


class VolumeRefused(StorageError):
    """cva will not open or create this volume; the message names the rule and the next step."""


class State(enum.Enum):
    ABSENT = "absent"
    INITIALIZING = "initializing"
    READY = "ready"
    OPEN = "open"
    MOUNTED = "mounted"
    BOUND = "bound"


class CrashWindow(enum.Enum):
    PV_CREATED = "pv-created"
    VG_CREATED = "vg-created"
    LV_CREATED = "lv-created"
    LUKS_FORMATTED = "luks-formatted"
    KEYSLOT_ADDED = "keyslot-added"
    INITIALIZING_WRITTEN = "initializing-written"
    OPENED_INITIALIZING = "opened-initializing"
    MKFS_DONE = "mkfs-done"
    READY_HALF_WRITTEN = "ready-half-written"
    READY_WRITTEN = "ready-written"
    SEQ_HALF_WRITTEN = "seq-half-written"
    SEQ_WRITTEN = "seq-written"
    MOUNTED = "mounted"
    LV_EXTENDED = "lv-extended"
    # online grow of a mounted volume (luks.grow) and the PV resize at open
    GROW_PV_RESIZED = "grow-pv-resized"
    GROW_LV_EXTENDED = "grow-lv-extended"
    GROW_MAPPING_RESIZED = "grow-mapping-resized"
    GROW_FS_GROWN = "grow-fs-grown"
    # key rotation (luks.rotation)
    REKEY_SLOT_ADDED_HALF = "rekey-slot-added-half"
    REKEY_SLOT_ADDED = "rekey-slot-added"
    REKEY_OLD_REMOVED_HALF = "rekey-old-removed-half"
    REKEY_DONE = "rekey-done"


# ---- pure decisions -----------------------------------------------------------------------

HeaderKind = Literal["zero", "cva", "invalid"]


@dataclass(frozen=True)
class HeaderObservation:
    """What the copied header region turned out to be."""

    kind: HeaderKind
    reasons: tuple[str, ...] = ()  # invalid: why (parser / allow-list / token / MAC)
    token_state: str | None = None  # cva: the MAC-verified state


@dataclass(frozen=True)
class Decision:
    action: Literal["create", "finish", "open", "refuse"]
    reason: str = ""


REINIT_HINT = (
    "cva never formats a disk that is not provably blank; to reinitialise on purpose, zero the "
    "disk or LV (e.g. blkdiscard -z) and prepare again"
)


def decide(
    header: HeaderObservation, blank_verdict: blank.BlankVerdict | None, *, create: bool
) -> Decision:
    """What to do with a volume given what its header region and data samples showed."""
    if header.kind == "invalid":
        return Decision("refuse", "not a usable cva volume: " + "; ".join(header.reasons))
    if header.kind == "cva":
        if header.token_state == INITIALIZING:
            return Decision("finish")
        if header.token_state == READY:
            return Decision("open")
        return Decision("refuse", f"cva token state {header.token_state!r} is unknown")
    if blank_verdict is None:
        raise ValueError("a zero header region needs a blank verdict")
    if not blank_verdict.blank:
        return Decision(
            "refuse",
            f"the header region is zero but the volume is not blank ({blank_verdict.reason}); "
            + REINIT_HINT,
        )
    if not create:
        return Decision("refuse", "the volume is blank and the contract says create = false")
    return Decision("create")


H = TypeVar("H")


def classify(
    area: bytes,
    *,
    parse: Callable[[bytes], H],
    allow_reasons: Callable[[H], list[str]],
    verify: Callable[[H], str],
) -> HeaderObservation:
    """Zero region, a MAC-verified cva header, or invalid with every reason (pure)."""
    if blank.is_zero(area):
        return HeaderObservation("zero")
    try:
        hdr = parse(area)
    except StorageError as exc:
        return HeaderObservation("invalid", (exc.message,))
    reasons = allow_reasons(hdr)
    if reasons:
        return HeaderObservation("invalid", tuple(reasons))
    try:
        state = verify(hdr)
    except StorageError as exc:
        return HeaderObservation("invalid", (f"cva token: {exc.message}",))
    return HeaderObservation("cva", token_state=state)


def expected_table(*, integrity: bool, backing_devno: str) -> dmtable.Expected:
    return dmtable.Expected(
        integrity=integrity, device=backing_devno, offset_sectors=DATA_OFFSET_SECTORS
    )


def mapper_name(volume_name: str) -> str:
    return MAPPER_PREFIX + volume_name.replace("-", "_")


def fs_size_bytes(kind: str, superblock_area: bytes) -> int | None:
    """Filesystem size from its superblock (first 64 KiB of the device); None if unknown."""
    if kind == "ext4" and len(superblock_area) >= 2048:
        sb = superblock_area[1024:2048]
        if sb[56:58] != b"\x53\xef":
            return None
        blocks_lo = int(struct.unpack_from("<I", sb, 4)[0])
        log_bs = int(struct.unpack_from("<I", sb, 24)[0])
        incompat = int(struct.unpack_from("<I", sb, 0x60)[0])
        blocks_hi = int(struct.unpack_from("<I", sb, 0x150)[0]) if incompat & 0x80 else 0
        if log_bs > 6:
            return None
        return ((blocks_hi << 32) | blocks_lo) * (1024 << log_bs)
    if kind == "xfs" and len(superblock_area) >= 16:
        if superblock_area[:4] != b"XFSB":
            return None
        block_size = int(struct.unpack_from(">I", superblock_area, 4)[0])
        dblocks = int(struct.unpack_from(">Q", superblock_area, 8)[0])
        if block_size not in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
            return None
        return block_size * dblocks
    return None


def fs_complete(kind: str, superblock_area: bytes) -> bool:
    """A finished filesystem of `kind` is there: ext4 magic (mke2fs writes the primary
    superblock last), or xfs magic with sb_inprogress (byte 126) cleared (mkfs.xfs clears it
    last)."""
    if fs_size_bytes(kind, superblock_area) is None:
        return False
    return kind != "xfs" or (len(superblock_area) > 126 and superblock_area[126] == 0)


INITIALIZING_RULE = (
    "rule initializing-needs-blank-data: a header saying 'initializing' may be an older genuine "
    "header the host put back over a volume in use, so cva formats only a data area it proves "
    "never written"
)
INITIALIZING_HINT = (
    "restore the volume's current header, or zero the disk or LV on purpose (blkdiscard -z) "
    "to start over"
)
InitAction = Literal["mkfs", "mark-ready", "prove-zero", "refuse"]


@dataclass(frozen=True)
class InitDecision:
    action: InitAction
    reason: str = ""


def initializing_action(
    *,
    filesystem: str,
    superblock_readable: bool,
    filesystem_complete: bool,
    formatted_now: bool,
    create: bool,
    integrity: bool,
    data_area_zero: bool | None = None,
    first_nonzero: int | None = None,
) -> InitDecision:
    """What to do with an opened INITIALIZING volume (see luks.volume, crash windows).

    The host can replay an older genuine header of this volume still saying "initializing"
    (the MAC does not cover the seqid) and damage the first data blocks so that no filesystem
    is found. So "initializing" alone never justifies mkfs:
    - a complete filesystem inside: keep it, only mark the volume ready (a crash after mkfs);
    - this very run proved the disk blank and formatted it: mkfs (the normal create path);
    - otherwise mkfs only when the contract says `create = true` AND the raw data area on the
      disk is proven all zeros (`prove-zero`: the caller scans it, then asks again with the
      result). Why that proves "no user data was ever written": every byte that reaches the
      disk through the dm-crypt mapping is aes-xts ciphertext under a key the host does not
      have; a 4096-byte ciphertext sector reads as all zeros with probability 2^-32768, and
      the mapping never passes discards. A data area that is all zeros on the medium therefore
      never had mkfs or any file written through the mapping since the disk was proven blank.
      (The host can zero the area itself: then it has already destroyed whatever was there.)
      With integrity, dm-integrity writes its own superblock and journal into the data area
      at format time, so the raw area is never zero and this proof cannot be made: refuse.
    - unreadable first blocks (EIO) of a volume not formatted in this run: refuse.
    """
    refuse = f"; {INITIALIZING_RULE}; {INITIALIZING_HINT}"
    if not superblock_readable:
        return InitDecision(
            "refuse",
            "the header says 'initializing' but the volume's first blocks cannot be read "
            "(a damaged or replayed volume)" + refuse,
        )
    if filesystem_complete:
        return InitDecision("mark-ready")
    if formatted_now:
        return InitDecision("mkfs")
    if not create:
        return InitDecision(
            "refuse",
            f"the header says 'initializing', no complete {filesystem} filesystem is inside, "
            "and the contract says create = false: cva never runs mkfs then" + refuse,
        )
    if integrity:
        return InitDecision(
            "refuse",
            f"the header says 'initializing' and no complete {filesystem} filesystem is inside; "
            "with integrity cva cannot prove the data area never written (dm-integrity's own "
            "superblock and journal live there)" + refuse,
        )
    if data_area_zero is None:
        return InitDecision("prove-zero")
    if not data_area_zero:
        where = f" at byte {first_nonzero}" if first_nonzero is not None else ""
        return InitDecision(
            "refuse",
            f"the header says 'initializing', no complete {filesystem} filesystem is inside, "
            f"and the data area is not all zeros (first non-zero byte{where}): data may have "
            "been written" + refuse,
        )
    return InitDecision("mkfs")


def needs_grow(fs_bytes: int | None, device_bytes: int) -> bool:
    return fs_bytes is not None and device_bytes - fs_bytes >= GROW_SLACK
