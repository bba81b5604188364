"""luks.grow_plan: the pure next-step decision of an online grow (issue 26 #4)."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from luks.grow_plan import (
    INTEGRITY_REASON,
    GrowFacts,
    LvmFacts,
    lv_extension,
    next_step,
    pv_needs_resize,
)
from luks.volume_plan import DATA_OFFSET_BYTES

MIB = 1 << 20
GIB = 1 << 30
EXT = 4 * MIB
PE_START = MIB


def lvm_facts(disk: int, *, lv: int, target: int | None, pv: int | None = None) -> LvmFacts:
    pv_bytes = pv if pv is not None else (disk - PE_START) // EXT * EXT
    return LvmFacts(pv_bytes, EXT, pv_bytes - lv, lv, target)


def settled(disk: int = GIB, *, target: int | None = None, integrity: bool = False) -> GrowFacts:
    """A volume filling its LV, its LV filling the PV ("max"), the PV filling the disk."""
    pv = (disk - PE_START) // EXT * EXT
    lv = pv if target is None else target
    mapping = lv - DATA_OFFSET_BYTES
    return GrowFacts(
        disk, lvm_facts(disk, lv=lv, target=target), mapping, mapping, integrity, False
    )


def run(f: GrowFacts) -> list[str]:
    """Simulate the shell: apply each step to the facts as the guest would then see them."""
    steps: list[str] = []
    for _ in range(6):
        d = next_step(f)
        assert d.refusal is None, d.refusal
        if d.step is None:
            return steps
        steps.append(d.step)
        lv = f.lvm
        if d.step == "pvresize":
            assert lv is not None
            pv = (f.disk_bytes - PE_START) // EXT * EXT
            lv = dataclasses.replace(lv, pv_bytes=pv, vg_free_bytes=pv - lv.lv_bytes)
        elif d.step == "lvextend":
            assert lv is not None
            new = lv.lv_bytes + lv.vg_free_bytes
            if lv.lv_target is not None:
                new = min(new, lv.lv_target)
            lv = dataclasses.replace(lv, lv_bytes=new, vg_free_bytes=lv.pv_bytes - new)
        f = dataclasses.replace(f, lvm=lv)
        if d.step == "crypt-resize":
            backing = f.lvm.lv_bytes if f.lvm is not None else f.disk_bytes
            f = dataclasses.replace(f, mapping_bytes=backing - DATA_OFFSET_BYTES)
        elif d.step == "fs-grow":
            f = dataclasses.replace(f, fs_bytes=f.mapping_bytes)
    raise AssertionError(f"no convergence: {steps}")


def test_settled_volume_has_nothing_to_do() -> None:
    assert next_step(settled()).step is None and next_step(settled()).refusal is None
    assert next_step(settled(target=512 * MIB)).step is None


def test_max_volume_on_a_grown_disk_runs_every_step_in_order() -> None:
    grown = dataclasses.replace(settled(), disk_bytes=2 * GIB)
    assert run(grown) == ["pvresize", "lvextend", "crypt-resize", "fs-grow"]


def test_fixed_size_lv_keeps_its_size_the_space_stays_in_the_vg() -> None:
    grown = dataclasses.replace(settled(target=512 * MIB), disk_bytes=2 * GIB)
    assert run(grown) == ["pvresize"]


def test_fixed_size_lv_below_a_larger_contract_size_is_extended_to_it() -> None:
    f = settled(target=512 * MIB)
    assert f.lvm is not None
    bigger = dataclasses.replace(
        f, disk_bytes=2 * GIB, lvm=dataclasses.replace(f.lvm, lv_target=GIB)
    )
    assert run(bigger) == ["pvresize", "lvextend", "crypt-resize", "fs-grow"]


def test_whole_disk_volume_resizes_mapping_then_fs() -> None:
    f = GrowFacts(2 * GIB, None, GIB - DATA_OFFSET_BYTES, GIB - DATA_OFFSET_BYTES, False, False)
    assert run(f) == ["crypt-resize", "fs-grow"]


def test_each_crash_window_resumes_where_it_stopped() -> None:
    """GROW_PV_RESIZED / GROW_LV_EXTENDED / GROW_MAPPING_RESIZED: a fresh observation after a
    crash names exactly the steps still missing."""
    grown = dataclasses.replace(settled(), disk_bytes=2 * GIB)
    pv = (2 * GIB - PE_START) // EXT * EXT
    after_pv = dataclasses.replace(grown, lvm=lvm_facts(2 * GIB, lv=GIB - EXT, target=None))
    assert run(after_pv) == ["lvextend", "crypt-resize", "fs-grow"]
    after_lv = dataclasses.replace(grown, lvm=lvm_facts(2 * GIB, lv=pv, target=None))
    assert run(after_lv) == ["crypt-resize", "fs-grow"]
    after_map = dataclasses.replace(after_lv, mapping_bytes=pv - DATA_OFFSET_BYTES)
    assert run(after_map) == ["fs-grow"]


def test_never_shrinks() -> None:
    f = settled()
    smaller_disk = dataclasses.replace(f, disk_bytes=GIB // 2)
    d = next_step(smaller_disk)
    assert d.step is None and d.refusal and "smaller than its LVM PV" in d.refusal
    assert "never shrinks" in d.refusal
    assert f.lvm is not None
    smaller_lv = dataclasses.replace(f, lvm=dataclasses.replace(f.lvm, lv_bytes=GIB // 2))
    assert "never shrinks" in (next_step(smaller_lv).refusal or "")
    whole = GrowFacts(
        GIB // 2, None, GIB - DATA_OFFSET_BYTES, GIB - DATA_OFFSET_BYTES, False, False
    )
    assert "disk" in (next_step(whole).refusal or "")
    big_fs = dataclasses.replace(f, fs_bytes=f.mapping_bytes + GIB)
    assert "filesystem" in (next_step(big_fs).refusal or "")


def test_integrity_volume_is_refused_with_its_reason_only_when_it_would_grow() -> None:
    assert next_step(settled(integrity=True)).refusal is None
    grown = dataclasses.replace(settled(integrity=True), disk_bytes=2 * GIB)
    d = next_step(grown)
    assert d.step is None and d.refusal == INTEGRITY_REASON
    assert "dm-integrity" in INTEGRITY_REASON


def test_read_only_volume_waits_for_a_read_write_open() -> None:
    grown = dataclasses.replace(settled(), disk_bytes=2 * GIB, read_only=True)
    assert "read-only" in (next_step(grown).refusal or "")


def test_thresholds() -> None:
    assert not pv_needs_resize(GIB, GIB - PE_START - 3 * MIB, EXT)  # a resized PV's remainder
    assert pv_needs_resize(GIB + EXT + 2 * MIB, GIB - PE_START, EXT)
    assert not lv_extension(LvmFacts(GIB, EXT, EXT - 1, GIB - EXT, None))
    assert lv_extension(LvmFacts(GIB, EXT, EXT, GIB - EXT, None))
    assert not lv_extension(LvmFacts(GIB, EXT, EXT, GIB - EXT, GIB - EXT))


sizes = st.integers(min_value=0, max_value=1 << 50)


@given(
    disk=sizes, pv=sizes, free=sizes, lv=sizes, mapping=sizes,
    fs=st.none() | sizes, target=st.none() | sizes, integrity=st.booleans(),
    ro=st.booleans(), has_lvm=st.booleans(),
)  # fmt: skip
def test_any_observation_gives_one_answer_and_never_grows_what_must_not(
    disk: int, pv: int, free: int, lv: int, mapping: int, fs: int | None,
    target: int | None, integrity: bool, ro: bool, has_lvm: bool,
) -> None:  # fmt: skip
    lvm = LvmFacts(pv, EXT, free, lv, target) if has_lvm else None
    d = next_step(GrowFacts(disk, lvm, mapping, fs, integrity, ro))
    assert (d.step is None) or (d.refusal is None)
    if d.step is not None:
        assert not integrity and not ro
        backing = lv if has_lvm else disk
        assert backing >= mapping + DATA_OFFSET_BYTES  # never a shrink
        if has_lvm:
            assert disk >= pv


def test_xfs_geometry_answer_parses() -> None:
    from luks.fs import xfs_geometry_bytes

    geom = bytearray(112)
    geom[0:4] = (4096).to_bytes(4, "little")
    geom[32:40] = (262144).to_bytes(8, "little")
    assert xfs_geometry_bytes(bytes(geom)) == GIB
    geom[0:4] = (4097).to_bytes(4, "little")
    assert xfs_geometry_bytes(bytes(geom)) is None
    assert xfs_geometry_bytes(b"\0" * 39) is None
