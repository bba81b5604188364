"""LVM for one cva volume: PV/VG/LV create-if-absent, activate, deactivate, extend (DESIGN §7).

Every `lvm` call carries a `--config` that accepts only the contract's disk (nothing else the
host attached is even scanned), turns auto-activation and event activation off, skips the
devices file and metadata backups (the guest root is not ours to litter), and lets LVM create
device nodes itself (no udev needed). Reports are JSON (`--reportformat json`), never text.

Pure parts: `lvm_config`, `parse_report`, the argv builders and `plan`; the shell runs them.
An existing LV is used only when it is exactly `linear` (`lv_type_refusal`, from the "seg"
rows of `lvm fullreport`: segtype, lv_layout, lv_role, checked before any activation): thin,
cache, raid, vdo, snapshot or even `zero`/`error` LVs would make the guest kernel and LVM tools
parse host-written metadata (or silently drop writes).
Nothing here formats or wipes: `pvcreate` runs only after the caller proved the disk blank, and
`lvcreate` never zeroes or wipes signatures (`-Zn -Wn`), so a host that hid an LV from the
metadata cannot make cva overwrite its data — the volume layer's blank check then refuses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from luks.errors import StorageError
from luks.run import run

TIMEOUT = 60.0
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class LvmError(StorageError):
    """LVM state cva cannot use, or an lvm command that failed."""


@dataclass(frozen=True)
class PhysicalVolume:
    name: str
    vg: str  # "" = PV not in any VG
    size: int
    dev_size: int = 0  # the device under it (larger than `size` once the host grew the disk)


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    size: int
    free: int
    extent_size: int
    pv_count: int


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    vg: str
    size: int
    active: bool
    dm_path: str


@dataclass(frozen=True)
class LvSegment:
    """One segment of an LV (a "seg" row of `lvm fullreport`): its type, the LV's layout, roles."""

    lv: str
    vg: str
    segtype: str  # "linear", "striped", "thin", "raid1", "cache", "vdo", "zero", ...
    layout: str  # lv_layout, e.g. "linear" or "thin,sparse"
    role: str  # lv_role, e.g. "public" or "public,origin,thickorigin"


@dataclass(frozen=True)
class LvmState:
    """What LVM sees on the contract's disk (and only there)."""

    pvs: tuple[PhysicalVolume, ...]
    vgs: tuple[VolumeGroup, ...]
    lvs: tuple[LogicalVolume, ...]
    segments: tuple[LvSegment, ...] = ()  # of every LV in `lvs` (read_state fills it)


Step = Literal["pvcreate", "vgcreate", "lvcreate", "activate", "extend"]
MAX_FREE = "100%FREE"  # a contract size of None ("max"): all the VG's free extents


@dataclass(frozen=True)
class LvmPlan:
    steps: tuple[Step, ...]
    needs_blank_disk: bool  # pvcreate will write to the disk: the caller must prove it blank
    refusal: str | None = None


def check_name(name: str, what: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise LvmError(f"LVM {what} name {name!r} is invalid; use [a-z0-9][a-z0-9_-]*")
    return name


def _quote(text: str) -> str:
    if any(c in text for c in '"\\|\n'):
        raise LvmError(f"disk path {text!r} cannot be put in an LVM filter")
    return text


_REGEX_SPECIAL = frozenset(".^$*+?()[]{}")


def lvm_config(disk: str) -> str:
    """The `--config` string: scan only `disk`, no auto-activation, no devices file, no backups."""
    path = "".join("\\" + c if c in _REGEX_SPECIAL else c for c in _quote(disk))
    filt = f'["a|^{path}$|", "r|.*|"]'
    return (
        "devices { "
        "use_devicesfile=0 "
        f"filter={filt} global_filter={filt} "
        "obtain_device_list_from_udev=0 scan_lvs=0 multipath_component_detection=0 "
        "md_component_detection=0 fw_raid_component_detection=0 "
        "} "
        "activation { auto_activation_volume_list=[] udev_sync=0 udev_rules=0 "
        "verify_udev_operations=1 monitoring=0 } "
        "global { event_activation=0 use_lvmpolld=0 } "
        "backup { backup=0 archive=0 }"
    )


def _base(cmd: str, disk: str) -> list[str]:
    return ["lvm", cmd, "--config", lvm_config(disk)]


_REPORT_UNITS = ["--reportformat", "json", "--units", "b", "--nosuffix"]


def fullreport_argv(disk: str) -> list[str]:
    """Everything `read_state` needs in one `lvm fullreport` (one process, not four: each lvm
    start costs 0.5-0.8 s in a TCG guest, and a prestart hook's reopen has 8 s). Its JSON has
    one report part per VG (and one for PVs in no VG) holding "pv", "vg", "lv", "seg" and
    "pvseg" lists; the fields are the ones the four single reports asked for."""
    return [
        *_base("fullreport", disk),
        *_REPORT_UNITS,
        "--configreport", "pv", "-o", "pv_name,vg_name,pv_size,dev_size",
        "--configreport", "vg", "-o", "vg_name,vg_size,vg_free,vg_extent_size,pv_count",
        "--configreport", "lv", "-o", "lv_name,vg_name,lv_size,lv_active,lv_dm_path",
        "--configreport", "seg", "-o", "lv_name,vg_name,segtype,lv_layout,lv_role",
        "--configreport", "pvseg", "-o", "pv_name",
    ]  # fmt: skip


def pvcreate_argv(disk: str) -> list[str]:
    return [*_base("pvcreate", disk), "--", disk]


def vgcreate_argv(disk: str, vg: str) -> list[str]:
    return [*_base("vgcreate", disk), "--setautoactivation", "n", "--", check_name(vg, "VG"), disk]


def _size_args(size_bytes: int | None, *, grow: bool = False) -> list[str]:
    """`--size <n>b`, or for "max" (None) `--extents 100%FREE` (`+100%FREE` to extend)."""
    if size_bytes is None:
        return ["--extents", ("+" if grow else "") + MAX_FREE]
    return ["--size", f"{_positive(size_bytes)}b"]


def lvcreate_argv(disk: str, vg: str, lv: str, size_bytes: int | None) -> list[str]:
    return [
        *_base("lvcreate", disk),
        "--activate",
        "y",
        "--zero",
        "n",
        "--wipesignatures",
        "n",
        "--setactivationskip",
        "n",
        "--name",
        check_name(lv, "LV"),
        *_size_args(size_bytes),
        "--",
        check_name(vg, "VG"),
    ]


def lvchange_argv(disk: str, vg: str, lv: str, *, active: bool) -> list[str]:
    return [
        *_base("lvchange", disk),
        "--activate",
        "y" if active else "n",
        "--",
        f"{check_name(vg, 'VG')}/{check_name(lv, 'LV')}",
    ]


def vgchange_off_argv(disk: str, vg: str) -> list[str]:
    return [*_base("vgchange", disk), "--activate", "n", "--", check_name(vg, "VG")]


def lvextend_argv(disk: str, vg: str, lv: str, size_bytes: int | None) -> list[str]:
    return [
        *_base("lvextend", disk),
        *_size_args(size_bytes, grow=True),
        "--",
        f"{check_name(vg, 'VG')}/{check_name(lv, 'LV')}",
    ]


def pvresize_argv(disk: str) -> list[str]:
    """The PV takes the whole (grown) disk; never shrinks it (no --setphysicalvolumesize)."""
    return [*_base("pvresize", disk), "--", disk]


def _positive(n: int) -> int:
    if n <= 0:
        raise LvmError(f"LVM size {n} must be positive")
    return n


def _rows(text: str, kind: str) -> list[dict[str, str]]:
    try:
        doc = json.loads(text) if text.strip() else {"report": [{kind: []}]}
    except (ValueError, RecursionError) as exc:
        raise LvmError(f"lvm {kind} report is not JSON: {exc}") from None
    try:
        rows = [row for part in doc["report"] for row in part.get(kind, [])]
    except (TypeError, KeyError, AttributeError):
        raise LvmError(f"lvm {kind} report has an unexpected shape") from None
    for row in rows:
        if not isinstance(row, dict) or not all(isinstance(v, str) for v in row.values()):
            raise LvmError(f"lvm {kind} report row has an unexpected shape")
    return rows


def _num(row: dict[str, str], key: str) -> int:
    value = row.get(key, "")
    if not value.isdigit():
        raise LvmError(f"lvm report field {key} is not a number: {value[:40]!r}")
    return int(value)


def parse_pvs(text: str) -> tuple[PhysicalVolume, ...]:
    return tuple(
        PhysicalVolume(
            r.get("pv_name", ""),
            r.get("vg_name", ""),
            _num(r, "pv_size"),
            _num(r, "dev_size") if "dev_size" in r else 0,
        )
        for r in _rows(text, "pv")
    )


def parse_vgs(text: str) -> tuple[VolumeGroup, ...]:
    return tuple(
        VolumeGroup(
            r.get("vg_name", ""),
            _num(r, "vg_size"),
            _num(r, "vg_free"),
            _num(r, "vg_extent_size"),
            _num(r, "pv_count"),
        )
        for r in _rows(text, "vg")
    )


def parse_lvs(text: str) -> tuple[LogicalVolume, ...]:
    return tuple(
        LogicalVolume(
            r.get("lv_name", ""),
            r.get("vg_name", ""),
            _num(r, "lv_size"),
            r.get("lv_active", "") == "active",
            r.get("lv_dm_path", ""),
        )
        for r in _rows(text, "lv")
    )


_SEG_FIELD_RE = re.compile(r"^[a-z0-9_,+-]{0,64}$")


def parse_lv_segments(text: str) -> tuple[LvSegment, ...]:
    """The "seg" rows (lv_name, vg_name, segtype, lv_layout, lv_role) of a JSON report
    (hostile input: every field must be a short plain string, or the whole report is refused)."""
    out = []
    for r in _rows(text, "seg"):
        row = LvSegment(
            r.get("lv_name", ""),
            r.get("vg_name", ""),
            r.get("segtype", ""),
            r.get("lv_layout", ""),
            r.get("lv_role", ""),
        )
        for value in (row.segtype, row.layout, row.role):
            if not _SEG_FIELD_RE.fullmatch(value):
                raise LvmError(f"lvm segment report field is not plain text: {value[:40]!r}")
        out.append(row)
    return tuple(out)


LINEAR_ONLY_RULE = (
    "cva opens only plain linear LVs (rule lvm-linear-only: thin, cache, raid, vdo, snapshot "
    "and other types make the guest kernel and LVM tools parse host-written metadata); "
    "recreate it as a linear LV (lvcreate --type linear) or let cva create it on a blank disk"
)


def lv_type_refusal(state: LvmState, vg: str, lv: str) -> str | None:
    """None when `vg/lv` is exactly linear: every segment `linear`, layout `linear`, role
    `public` only (no snapshot origin, no sub-LV); else the refusal (pure)."""
    segs = [s for s in state.segments if s.vg == vg and s.lv == lv]
    if not segs:
        return f"LVM reports no segment for logical volume {vg}/{lv}; " + LINEAR_ONLY_RULE
    for seg in segs:
        if seg.segtype != "linear":
            return f"logical volume {vg}/{lv} has segment type {seg.segtype!r}; " + LINEAR_ONLY_RULE
        if seg.layout != "linear":
            return f"logical volume {vg}/{lv} has layout {seg.layout!r}; " + LINEAR_ONLY_RULE
        if seg.role != "public":
            return f"logical volume {vg}/{lv} has role {seg.role!r}; " + LINEAR_ONLY_RULE
    return None


def plan(
    state: LvmState, disk: str, vg: str, lv: str, size_bytes: int | None, *, create: bool
) -> LvmPlan:
    """Which LVM steps bring the disk to `vg/lv` of at least `size_bytes` (pure); None ("max"):
    the LV is extended while its VG has a free extent."""
    pv = next((p for p in state.pvs if p.name == disk), None)
    foreign = sorted({p.vg for p in state.pvs if p.vg and p.vg != vg})
    if foreign:
        return LvmPlan((), False, f"disk {disk} belongs to volume group {foreign[0]!r}, not {vg!r}")
    steps: list[Step] = []
    needs_blank = False
    if pv is None:
        if state.pvs:
            return LvmPlan((), False, f"LVM sees {state.pvs[0].name}, not the disk {disk}")
        if not create:
            return LvmPlan((), False, f"disk {disk} has no LVM physical volume and create = false")
        steps += ["pvcreate", "vgcreate"]
        needs_blank = True
    elif not pv.vg:
        if not create:
            return LvmPlan(
                (), False, f"disk {disk} is a PV without volume group and create = false"
            )
        steps.append("vgcreate")
    vg_row = next((g for g in state.vgs if g.name == vg), None)
    if vg_row is not None and vg_row.pv_count != 1:
        return LvmPlan((), False, f"volume group {vg!r} spans {vg_row.pv_count} disks, expected 1")
    lv_row = next((v for v in state.lvs if v.vg == vg and v.name == lv), None)
    if lv_row is None:
        if not create:
            return LvmPlan((), False, f"logical volume {vg}/{lv} is absent and create = false")
        steps.append("lvcreate")
    else:
        refusal = lv_type_refusal(state, vg, lv)
        if refusal is not None:  # before anything activates it
            return LvmPlan((), False, refusal)
        if not lv_row.active:
            steps.append("activate")
        if size_bytes is None:
            if vg_row is not None and vg_row.free >= max(vg_row.extent_size, 1):
                steps.append("extend")
        elif lv_row.size < size_bytes:
            steps.append("extend")
    return LvmPlan(tuple(steps), needs_blank)


def dm_path(vg: str, lv: str) -> Path:
    """/dev/mapper name LVM gives vg/lv (dashes doubled)."""
    return Path("/dev/mapper") / (
        f"{check_name(vg, 'VG').replace('-', '--')}-{check_name(lv, 'LV').replace('-', '--')}"
    )


def _run(argv: Sequence[str], what: str, timeout: float) -> str:
    result = run(argv, timeout=timeout, check=False)
    if result.returncode != 0:
        last = [ln for ln in result.stderr.splitlines() if ln.strip()]
        msg = last[-1].strip()[:200] if last else f"exit {result.returncode}"
        raise LvmError(f"lvm {what} failed: {msg}")
    return result.text


def read_state(disk: str, *, timeout: float = TIMEOUT) -> LvmState:
    """PVs, VGs, LVs and LV segments LVM sees when it may only look at `disk` (one lvm run)."""
    return parse_fullreport(_run(fullreport_argv(disk), "fullreport", timeout))


def parse_fullreport(text: str) -> LvmState:
    """`lvm fullreport` JSON (hostile input, as every report): each kind's rows are parsed as
    its single report's are; rows of a kind cva did not ask for are not read."""
    return LvmState(parse_pvs(text), parse_vgs(text), parse_lvs(text), parse_lv_segments(text))


def pvcreate(disk: str, *, timeout: float = TIMEOUT) -> None:
    _run(pvcreate_argv(disk), "pvcreate", timeout)


def vgcreate(disk: str, vg: str, *, timeout: float = TIMEOUT) -> None:
    _run(vgcreate_argv(disk, vg), "vgcreate", timeout)


def lvcreate(
    disk: str, vg: str, lv: str, size_bytes: int | None, *, timeout: float = TIMEOUT
) -> None:
    _run(lvcreate_argv(disk, vg, lv, size_bytes), "lvcreate", timeout)


def activate(disk: str, vg: str, lv: str, *, timeout: float = TIMEOUT) -> None:
    _run(lvchange_argv(disk, vg, lv, active=True), "lvchange -ay", timeout)


def deactivate_lv(disk: str, vg: str, lv: str, *, timeout: float = TIMEOUT) -> None:
    _run(lvchange_argv(disk, vg, lv, active=False), "lvchange -an", timeout)


def deactivate_vg(disk: str, vg: str, *, timeout: float = TIMEOUT) -> None:
    _run(vgchange_off_argv(disk, vg), "vgchange -an", timeout)


def extend(
    disk: str, vg: str, lv: str, size_bytes: int | None, *, timeout: float = TIMEOUT
) -> None:
    _run(lvextend_argv(disk, vg, lv, size_bytes), "lvextend", timeout)


def pvresize(disk: str, *, timeout: float = TIMEOUT) -> None:
    _run(pvresize_argv(disk), "pvresize", timeout)


def lv_size(disk: str, vg: str, lv: str, *, timeout: float = TIMEOUT) -> int:
    for row in read_state(disk, timeout=timeout).lvs:
        if row.vg == vg and row.name == lv:
            return row.size
    raise LvmError(f"logical volume {vg}/{lv} not found on {disk}")
