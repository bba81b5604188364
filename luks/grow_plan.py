"""Pure decision of an online grow: what the next step is, given what the guest sees now.

A mounted volume whose disk the host enlarged is grown in place, one idempotent step at a time:

    pvresize       the PV (LVM) takes the whole disk
    lvextend       a `size = "max"` LV takes the volume group's free space (a fixed-size LV
                   is extended only up to its contract size; extra space stays free in the VG)
    crypt-resize   the dm-crypt mapping spans its whole backing device (LV or disk)
    fs-grow        resize2fs / xfs_growfs on the mounted filesystem

The shell (luks.grow) observes, asks `next_step`, runs that one step, and observes again, so a
crash between two steps leaves a state the next uevent or open finishes (crash windows GROW_*
in luks.volume). Never shrink: a disk smaller than its PV, or a backing device smaller than its
mapping, is refused and nothing is touched. Integrity (AEAD) volumes are refused: cryptsetup
cannot resize a LUKS2 mapping with dm-integrity online (crypt_resize returns ENOTSUP), and an
LV grown under it could never be used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from luks.volume_plan import DATA_OFFSET_BYTES, GROW_SLACK

GrowStep = Literal["pvresize", "lvextend", "crypt-resize", "fs-grow"]
INTEGRITY_REASON = (
    "integrity volumes are not grown: cryptsetup cannot resize a LUKS2 mapping with "
    "dm-integrity (authenticated encryption) online; the volume keeps its size (to use a larger "
    "disk, create a new volume and copy the data)"
)
SHRINK_HINT = "cva never shrinks a volume; give the disk back its size (nothing was touched)"


@dataclass(frozen=True)
class LvmFacts:
    """What LVM reports for the volume's PV, VG and LV (bytes)."""

    pv_bytes: int
    extent_bytes: int
    vg_free_bytes: int
    lv_bytes: int
    lv_target: int | None  # the contract's size; None: "max"


@dataclass(frozen=True)
class GrowFacts:
    """One observation of a mounted volume (bytes). `lvm` None: LUKS on the whole disk."""

    disk_bytes: int
    lvm: LvmFacts | None
    mapping_bytes: int  # the dm-crypt mapping
    fs_bytes: int | None  # from the mounted filesystem's superblock; None: not readable
    integrity: bool
    read_only: bool


@dataclass(frozen=True)
class GrowDecision:
    step: GrowStep | None  # None: nothing (left) to do, or refused
    refusal: str | None = None  # why nothing may be done (logged, shown by `cva status`)


def pv_needs_resize(disk_bytes: int, pv_bytes: int, extent_bytes: int) -> bool:
    """The disk holds at least one more extent than the PV (LVM keeps its metadata and
    alignment out of pv_size, so a smaller difference is what a resized PV looks like)."""
    return disk_bytes - pv_bytes >= max(extent_bytes, 1) + DATA_OFFSET_BYTES // 16


def lv_extension(lvm: LvmFacts) -> bool:
    """The LV should take more of the VG: "max" and a free extent, or below its contract size
    with space free for it."""
    if lvm.vg_free_bytes < max(lvm.extent_bytes, 1):
        return False
    return lvm.lv_target is None or lvm.lv_bytes < lvm.lv_target


def next_step(f: GrowFacts) -> GrowDecision:
    """The next grow step for `f`, None when done, or a refusal (pure; see the module doc)."""
    backing = f.lvm.lv_bytes if f.lvm is not None else f.disk_bytes
    if f.lvm is not None and f.disk_bytes < f.lvm.pv_bytes:
        return GrowDecision(
            None,
            f"the disk ({f.disk_bytes} bytes) is smaller than its LVM PV ({f.lvm.pv_bytes} "
            f"bytes); {SHRINK_HINT}",
        )
    if backing < f.mapping_bytes + DATA_OFFSET_BYTES:
        what = "logical volume" if f.lvm is not None else "disk"
        return GrowDecision(
            None,
            f"the {what} ({backing} bytes) is smaller than the encrypted mapping needs "
            f"({f.mapping_bytes + DATA_OFFSET_BYTES} bytes); {SHRINK_HINT}",
        )
    if f.fs_bytes is not None and f.fs_bytes > f.mapping_bytes:
        return GrowDecision(
            None,
            f"the filesystem ({f.fs_bytes} bytes) is larger than its mapping "
            f"({f.mapping_bytes} bytes); {SHRINK_HINT}",
        )
    steps: list[GrowStep] = []
    if f.lvm is not None and pv_needs_resize(f.disk_bytes, f.lvm.pv_bytes, f.lvm.extent_bytes):
        steps.append("pvresize")
    if f.lvm is not None and lv_extension(f.lvm):
        steps.append("lvextend")
    if backing - DATA_OFFSET_BYTES - f.mapping_bytes >= GROW_SLACK // 8:
        steps.append("crypt-resize")
    if f.fs_bytes is not None and f.mapping_bytes - f.fs_bytes >= GROW_SLACK:
        steps.append("fs-grow")
    if not steps:
        return GrowDecision(None)
    if f.integrity:
        return GrowDecision(None, INTEGRITY_REASON)
    if f.read_only:
        return GrowDecision(
            None, "the volume is mounted read-only: it is grown at its next read-write open"
        )
    return GrowDecision(steps[0])
