"""bench.results: the results.json records, the ratio and met logic, REPORT.md's statements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.results import (
    JSON_KEYS,
    Result,
    Target,
    measured,
    not_measured,
    ratio_of,
    render_report,
    result_from_json,
    to_wire,
    write_json,
)

LE_1_1 = Target("ratio", "<=", 1.1, "cva ≤ 1.1x (b)")


def test_record_has_exactly_the_schema_keys(tmp_path: Path) -> None:
    rs = [
        measured("a", "s", 2.0, baseline_name="b", baseline=4.0, target=LE_1_1),
        measured("c", "MiB", 50.0),
        not_measured("d", "no VM here", unit="s", target=LE_1_1),
    ]
    path = tmp_path / "results.json"
    write_json(rs, path)
    doc = json.loads(path.read_text())
    assert isinstance(doc, list)
    assert len(doc) == 3
    for record in doc:
        assert set(JSON_KEYS) <= set(record)
        assert set(record) - set(JSON_KEYS) <= {"note", "group"}
    first = doc[0]
    assert first["name"] == "a"
    assert first["unit"] == "s"
    assert first["value"] == 2.0
    assert first["baseline_name"] == "b"
    assert first["baseline"] == 4.0
    assert first["ratio"] == 0.5
    assert first["target"] == "ratio <= 1.1 (cva ≤ 1.1x (b))"
    assert first["met"] is True
    assert doc[1]["baseline"] is None
    assert doc[1]["ratio"] is None
    assert doc[1]["target"] is None
    assert doc[1]["met"] is None
    assert doc[2]["value"] is None
    assert doc[2]["met"] is None
    assert doc[2]["note"] == "not measured: no VM here"


@pytest.mark.parametrize(
    ("target", "value", "baseline", "met"),
    [
        (LE_1_1, 1.1, 1.0, True),  # the bound itself counts
        (LE_1_1, 1.2, 1.0, False),
        (Target("ratio", "<=", 1 / 3), 1.0, 3.0, True),  # exactly 3x faster
        (Target("ratio", "<=", 1 / 3), 1.0, 2.9, False),
        (Target("ratio", ">=", 1.0), 99.0, 100.0, False),  # throughput below the defaults
        (Target("ratio", ">=", 1.0), 100.0, 100.0, True),
        (Target("value", "<", 96), 95.9, 1024.0, True),  # absolute: the baseline does not matter
        (Target("value", "<", 96), 96.0, None, False),
        (Target("value", "==", 66), 66.0, 192.0, True),
        (Target("value", "==", 66), 67.0, 192.0, False),
    ],
)
def test_met(target: Target, value: float, baseline: float | None, met: bool) -> None:
    r = measured("x", "u", value, baseline_name="b", baseline=baseline, target=target)
    assert r.met is met


def test_met_is_none_without_target_or_value() -> None:
    assert measured("x", "s", 1.0, baseline=2.0).met is None
    assert not_measured("x", "why", target=LE_1_1).met is None
    # a ratio target with no baseline cannot be judged
    assert measured("x", "s", 1.0, target=LE_1_1).met is None


def test_ratio_of_edge_cases() -> None:
    assert ratio_of(1.0, 0.0) is None
    assert ratio_of(None, 1.0) is None
    assert ratio_of(1.0, None) is None
    assert ratio_of(3.0, 1.5) == 2.0


def test_target_rejects_unknown_parts() -> None:
    with pytest.raises(ValueError, match="comparison"):
        Target("ratio", "~=", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ratio or the value"):
        Target("speed", "<=", 1.0)  # type: ignore[arg-type]


@given(
    value=st.floats(min_value=1e-6, max_value=1e6),
    baseline=st.floats(min_value=1e-6, max_value=1e6),
    bound=st.floats(min_value=1e-3, max_value=1e3),
)
def test_wire_round_trip_keeps_met_and_ratio(value: float, baseline: float, bound: float) -> None:
    r = measured(
        "x", "s", value, baseline_name="b", baseline=baseline, target=Target("ratio", "<=", bound)
    )
    back = result_from_json(json.loads(json.dumps(to_wire(r))))
    assert back.target == r.target
    assert back.met == r.met
    assert back.ratio == pytest.approx(r.ratio, rel=1e-5)


def test_report_states_met_not_met_and_not_measured() -> None:
    rs: list[Result] = [
        measured(
            "create 1 GiB", "s", 1.0, baseline_name="(b)", baseline=1.0, target=LE_1_1, group="g1"
        ),
        measured(
            "reopen 1 GiB", "s", 2.0, baseline_name="(b)", baseline=1.0, target=LE_1_1, group="g1"
        ),
        not_measured("I/O seq", "guest did not boot", unit="MiB/s", target=LE_1_1, group="g2"),
        measured("splice", "ms", 0.3, baseline_name="direct", baseline=0.2, group="g2"),
    ]
    text = render_report(rs, preamble=["run notes"], group_notes={"g1": ["TCG, small sizes"]})
    assert "**1 of 3 targets met, 1 not met, 1 not measured.**" in text
    summary = text.split("## g1")[0]
    met_part, rest = summary.split("Not met:")
    assert "`create 1 GiB`" in met_part
    assert "ratio 1.000\u00d7" in met_part
    assert "`reopen 1 GiB`" in rest.split("Not measured:")[0]
    assert "ratio 2.000\u00d7" in rest
    assert "`I/O seq`: not measured: guest did not boot" in rest
    assert "## g1" in text
    assert "## g2" in text
    assert "TCG, small sizes" in text
    assert "| reopen 1 GiB | 2 s | (b): 1 s | 2.000\u00d7 | ratio <= 1.1" in text
    assert "**NOT met**" in text
    assert "| splice |" in text


def test_driver_placeholders_name_every_planned_target() -> None:
    from bench.__main__ import _placeholders

    rs = _placeholders("kbs_roundtrips", "boom")
    assert rs
    assert all(not r.measured and r.note == "not measured: boom" for r in rs)
    assert any(r.target is not None for r in rs)
    # a module that does not exist still yields one honest entry, not a crash
    (only,) = _placeholders("no_such_module", "gone")
    assert only.note == "not measured: gone"


def test_importtime_is_summed_per_top_level_package() -> None:
    from bench.footprint import parse_importtime

    text = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:      1500 |       1500 |   httpx._models\n"
        "import time:       500 |       2000 | httpx\n"
        "import time:      3000 |       3000 | luks.volume\n"
        "garbage line\n"
    )
    assert parse_importtime(text) == {"httpx": 2.0, "luks": 3.0}
