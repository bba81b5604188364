"""luks.lvm: config string, argv, JSON reports (captured from lvm 2.03.16), the plan."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from luks import lvm
from luks.errors import StorageError

DATA = Path(__file__).parent / "data" / "lvm"
GIB = 1 << 30


def test_config_accepts_only_the_disk() -> None:
    cfg = lvm.lvm_config("/dev/vdb")
    assert 'filter=["a|^/dev/vdb$|", "r|.*|"]' in cfg
    assert "global_filter=" in cfg and "auto_activation_volume_list=[]" in cfg
    assert "use_devicesfile=0" in cfg and "event_activation=0" in cfg
    assert "a|^/dev/disk/by-id/virtio-a\\.b$|" in lvm.lvm_config("/dev/disk/by-id/virtio-a.b")
    with pytest.raises(StorageError):
        lvm.lvm_config('/dev/x"|')


def test_every_argv_carries_the_config_and_json() -> None:
    argv = lvm.fullreport_argv("/dev/vdb")
    assert argv[:3] == ["lvm", "fullreport", "--config"]
    assert argv[argv.index("--reportformat") + 1] == "json"
    create = lvm.lvcreate_argv("/dev/vdb", "cva", "pg", GIB)
    assert create[create.index("--zero") + 1] == "n"
    assert create[create.index("--wipesignatures") + 1] == "n"
    assert create[-1] == "cva" and f"{GIB}b" in create
    assert lvm.vgcreate_argv("/dev/vdb", "cva")[-2:] == ["cva", "/dev/vdb"]
    with pytest.raises(StorageError):
        lvm.lvcreate_argv("/dev/vdb", "cva", "-rf", GIB)
    with pytest.raises(StorageError):
        lvm.extend("/dev/vdb", "cva", "pg", 0)


def test_real_reports_parse() -> None:
    pvs = lvm.parse_pvs((DATA / "pvs_in_vg.json").read_text())
    assert pvs == (lvm.PhysicalVolume("/dev/loop0", "cva", 205520896),)
    assert lvm.parse_pvs((DATA / "pvs_none.json").read_text()) == ()
    vgs = lvm.parse_vgs((DATA / "vgs.json").read_text())
    assert vgs[0].name == "cva" and vgs[0].extent_size == 4 << 20 and vgs[0].pv_count == 1
    assert lvm.parse_lvs((DATA / "lvs_empty.json").read_text()) == ()


def test_lv_row_parses() -> None:
    text = (
        '{"report":[{"lv":[{"lv_name":"pg", "vg_name":"cva", "lv_size":"1073741824", '
        '"lv_active":"active", "lv_dm_path":"/dev/mapper/cva-pg"}]}]}'
    )
    assert lvm.parse_lvs(text) == (lvm.LogicalVolume("pg", "cva", GIB, True, "/dev/mapper/cva-pg"),)


@pytest.mark.parametrize(
    "text",
    ["[", "{}", '{"report": 3}', '{"report":[{"pv":[{"pv_size":"x"}]}]}', '{"report":[{"pv":[1]}]}',
     "[" * 100000],
)  # fmt: skip
def test_hostile_reports_fail_cleanly(text: str) -> None:
    with pytest.raises(StorageError):
        lvm.parse_pvs(text)


@given(st.text(max_size=300))
def test_any_report_parses_or_fails_cleanly(text: str) -> None:
    for parse in (lvm.parse_pvs, lvm.parse_vgs, lvm.parse_lvs, lvm.parse_fullreport):
        with contextlib.suppress(StorageError):
            parse(text)


PV = lvm.PhysicalVolume("/dev/vdb", "cva", 10 * GIB)
VG = lvm.VolumeGroup("cva", 10 * GIB, 5 * GIB, 4 << 20, 1)
LV = lvm.LogicalVolume("pg", "cva", GIB, True, "/dev/mapper/cva-pg")
SEG = (lvm.LvSegment("pg", "cva", "linear", "linear", "public"),)


def plan(state: lvm.LvmState, size: int | None = GIB, create: bool = True) -> lvm.LvmPlan:
    return lvm.plan(state, "/dev/vdb", "cva", "pg", size, create=create)


def test_plan_fresh_disk_needs_blank_and_creates_all() -> None:
    p = plan(lvm.LvmState((), (), ()))
    assert p.steps == ("pvcreate", "vgcreate", "lvcreate") and p.needs_blank_disk
    assert plan(lvm.LvmState((), (), ()), create=False).refusal


def test_plan_resumes_after_each_crash_window() -> None:
    pv_only = lvm.PhysicalVolume("/dev/vdb", "", 10 * GIB)
    assert plan(lvm.LvmState((pv_only,), (), ())).steps == ("vgcreate", "lvcreate")
    assert plan(lvm.LvmState((PV,), (VG,), ())).steps == ("lvcreate",)
    assert plan(lvm.LvmState((PV,), (VG,), (LV,), SEG)).steps == ()
    inactive = lvm.LogicalVolume("pg", "cva", GIB, False, "")
    assert plan(lvm.LvmState((PV,), (VG,), (inactive,), SEG)).steps == ("activate",)
    assert plan(lvm.LvmState((PV,), (VG,), (LV,), SEG), size=2 * GIB).steps == ("extend",)
    assert plan(lvm.LvmState((PV,), (VG,), (LV,), SEG), size=GIB // 2).steps == ()  # no shrink
    for p in (plan(lvm.LvmState((PV,), (VG,), ())),):
        assert not p.needs_blank_disk


def test_size_max_creates_and_extends_with_free_extents() -> None:
    """Issue 26 #4: `size = "max"` (None): lvcreate -l 100%FREE, lvextend -l +100%FREE, pvresize
    of the whole disk; the plan extends only while the VG has a free extent."""
    create = lvm.lvcreate_argv("/dev/vdb", "cva", "pg", None)
    assert create[create.index("--extents") + 1] == "100%FREE" and "--size" not in create
    extend = lvm.lvextend_argv("/dev/vdb", "cva", "pg", None)
    assert extend[extend.index("--extents") + 1] == "+100%FREE" and "--size" not in extend
    assert lvm.pvresize_argv("/dev/vdb")[-2:] == ["--", "/dev/vdb"]
    assert "--setphysicalvolumesize" not in lvm.pvresize_argv("/dev/vdb")
    full = lvm.VolumeGroup("cva", 10 * GIB, 0, 4 << 20, 1)
    spare = lvm.VolumeGroup("cva", 10 * GIB, 4 << 20, 4 << 20, 1)
    assert plan(lvm.LvmState((PV,), (full,), (LV,), SEG), size=None).steps == ()
    assert plan(lvm.LvmState((PV,), (spare,), (LV,), SEG), size=None).steps == ("extend",)
    assert plan(lvm.LvmState((PV,), (spare,), ()), size=None).steps == ("lvcreate",)


def test_pvs_report_carries_the_device_size() -> None:
    text = (
        '{"report":[{"pv":[{"pv_name":"/dev/vdb", "vg_name":"cva", "pv_size":"1069547520", '
        '"dev_size":"2147483648"}]}]}'
    )
    assert lvm.parse_pvs(text) == (lvm.PhysicalVolume("/dev/vdb", "cva", 1069547520, GIB * 2),)
    argv = lvm.fullreport_argv("/dev/vdb")
    assert "dev_size" in argv[argv.index("pv") + 2].split(",")


def test_plan_refuses_foreign_lvm() -> None:
    foreign = lvm.PhysicalVolume("/dev/vdb", "hostvg", GIB)
    assert "hostvg" in (plan(lvm.LvmState((foreign,), (), ())).refusal or "")
    two = lvm.VolumeGroup("cva", GIB, 0, 4 << 20, 2)
    assert "2 disks" in (plan(lvm.LvmState((PV,), (two,), ())).refusal or "")
    assert plan(lvm.LvmState((PV,), (VG,), ()), create=False).refusal


def test_dm_path_doubles_dashes() -> None:
    assert lvm.dm_path("cva", "pg-data") == Path("/dev/mapper/cva-pg--data")


# ---- segment types (issue 13 item 4: only linear LVs) -------------------------------------


def _segs(*rows: tuple[str, str, str, str, str]) -> str:
    keys = ("lv_name", "vg_name", "segtype", "lv_layout", "lv_role")
    return json.dumps({"report": [{"seg": [dict(zip(keys, r, strict=True)) for r in rows]}]})


def test_segment_report_parses() -> None:
    text = _segs(("pg", "cva", "linear", "linear", "public"), ("pg", "cva", "linear", "linear",
                 "public"))  # fmt: skip
    assert lvm.parse_lv_segments(text) == SEG * 2
    assert lvm.parse_lv_segments('{"report":[{"seg":[]}]}') == ()


@pytest.mark.parametrize(
    "text",
    ["[", '{"report":[{"seg":[{"segtype":1}]}]}', '{"report":[{"seg":"linear"}]}',
     _segs(("pg", "cva", "linear\nlinear", "linear", "public")),
     _segs(("pg", "cva", "x" * 65, "linear", "public")),
     _segs(("pg", "cva", "linear", "linear", "public origin")), "[" * 100000],
)  # fmt: skip
def test_hostile_segment_reports_fail_cleanly(text: str) -> None:
    with pytest.raises(StorageError):
        lvm.parse_lv_segments(text)


@given(st.text(max_size=300))
def test_any_segment_report_parses_or_fails_cleanly(text: str) -> None:
    with contextlib.suppress(StorageError):
        lvm.parse_lv_segments(text)


@pytest.mark.parametrize(
    ("segtype", "layout", "role", "named"),
    [
        ("thin", "thin,sparse", "public", "'thin'"),
        ("raid1", "raid,raid1", "public", "'raid1'"),
        ("cache", "cache", "public", "'cache'"),
        ("vdo", "vdo", "public", "'vdo'"),
        ("striped", "striped", "public", "'striped'"),
        ("mirror", "mirror", "public", "'mirror'"),
        ("zero", "zero", "public", "'zero'"),
        ("error", "error", "public", "'error'"),
        ("snapshot", "linear", "public,snapshot,thicksnapshot", "'snapshot'"),
        ("linear", "linear", "public,origin,thickorigin", "origin"),
        ("linear", "thin,sparse", "public", "layout"),
        ("Linear", "linear", "public", "'Linear'"),
    ],
)
def test_plan_refuses_every_lv_that_is_not_exactly_linear(
    segtype: str, layout: str, role: str, named: str
) -> None:
    seg = lvm.LvSegment("pg", "cva", segtype, layout, role)
    for state in (
        lvm.LvmState((PV,), (VG,), (LV,), (seg,)),
        lvm.LvmState((PV,), (VG,), (LV,), (*SEG, seg)),  # one bad segment among linear ones
        lvm.LvmState((PV,), (VG,), (lvm.LogicalVolume("pg", "cva", GIB, False, ""),), (seg,)),
    ):
        p = plan(state)
        assert p.steps == () and p.refusal is not None
        assert "lvm-linear-only" in p.refusal and named in p.refusal


def test_plan_refuses_an_lv_without_segment_rows() -> None:
    p = plan(lvm.LvmState((PV,), (VG,), (LV,)))
    assert p.steps == () and "no segment" in (p.refusal or "")
    other = (lvm.LvSegment("pg", "other", "linear", "linear", "public"),)
    assert "no segment" in (plan(lvm.LvmState((PV,), (VG,), (LV,), other)).refusal or "")


def test_fullreport_asks_each_report_for_the_fields_its_parser_reads() -> None:
    argv = lvm.fullreport_argv("/dev/vdb")
    fields = {
        argv[i + 1]: argv[i + 3].split(",")
        for i, a in enumerate(argv)
        if a == "--configreport" and argv[i + 2] == "-o"
    }
    assert fields["pv"] == ["pv_name", "vg_name", "pv_size", "dev_size"]
    assert fields["vg"] == ["vg_name", "vg_size", "vg_free", "vg_extent_size", "pv_count"]
    assert fields["lv"] == ["lv_name", "vg_name", "lv_size", "lv_active", "lv_dm_path"]
    assert fields["seg"] == ["lv_name", "vg_name", "segtype", "lv_layout", "lv_role"]


def test_real_fullreports_parse() -> None:
    """Captured from lvm 2.03.16 (Debian 12, the guest's) with `fullreport_argv` on a loop disk."""
    none = lvm.parse_fullreport((DATA / "fullreport_none.json").read_text())
    assert none == lvm.LvmState((), (), (), ())
    orphan = lvm.parse_fullreport((DATA / "fullreport_orphan_pv.json").read_text())
    assert orphan == lvm.LvmState(
        (lvm.PhysicalVolume("/dev/loop0", "", 64 << 20, 64 << 20),), (), (), ()
    )
    in_vg = lvm.parse_fullreport((DATA / "fullreport_vg_no_lv.json").read_text())
    assert in_vg.pvs == (lvm.PhysicalVolume("/dev/loop0", "cva", 60 << 20, 64 << 20),)
    assert in_vg.vgs == (lvm.VolumeGroup("cva", 60 << 20, 60 << 20, 4 << 20, 1),)
    assert (in_vg.lvs, in_vg.segments) == ((), ())


def test_fullreport_with_an_lv_parses_every_kind() -> None:
    text = (
        '{"report":[{"vg":[{"vg_name":"cva","vg_size":"1069547520","vg_free":"532676608",'
        '"vg_extent_size":"4194304","pv_count":"1"}],'
        '"pv":[{"pv_name":"/dev/vdc","vg_name":"cva","pv_size":"1069547520"}],'
        '"lv":[{"lv_name":"pg","vg_name":"cva","lv_size":"536870912","lv_active":"",'
        '"lv_dm_path":"/dev/mapper/cva-pg"}],"pvseg":[{"pv_name":"/dev/vdc"},{"pv_name":"/dev/vdc"}],'
        '"seg":[{"lv_name":"pg","vg_name":"cva","segtype":"linear","lv_layout":"linear",'
        '"lv_role":"public"}]}]}'
    )
    state = lvm.parse_fullreport(text)
    assert state.lvs == (lvm.LogicalVolume("pg", "cva", 512 << 20, False, "/dev/mapper/cva-pg"),)
    assert state.segments == (lvm.LvSegment("pg", "cva", "linear", "linear", "public"),)
    assert lvm.lv_type_refusal(state, "cva", "pg") is None
    thin = text.replace('"segtype":"linear"', '"segtype":"thin"')
    assert "thin" in (lvm.lv_type_refusal(lvm.parse_fullreport(thin), "cva", "pg") or "")
    with pytest.raises(StorageError):
        lvm.parse_fullreport(text.replace('"lv_role":"public"', '"lv_role":"public;rm"'))
    with pytest.raises(StorageError):
        lvm.parse_fullreport(text.replace('"vg_free":"532676608"', '"vg_free":"-1"'))
