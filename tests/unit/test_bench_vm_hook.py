"""bench.vm_hook's pure part: the guest's timings to report rows."""

from __future__ import annotations

from bench.vm_hook import ROWS, convert, planned


def test_convert_medians_and_first_create() -> None:
    doc = {
        "none": [0.9, 0.8, 1.0],
        "reopen": [1.6, 1.4, 1.5],
        "open": [1.0, 1.1, 0.9],
        "first": [8.1, 3.0],
        "first_started": True,
    }
    rows = {r.name: r for r in convert(doc)}
    assert rows[ROWS[0][0]].value == 0.9
    assert rows[ROWS[1][0]].value == 1.5 and rows[ROWS[1][0]].target is not None
    assert rows[ROWS[2][0]].value == 1.0
    assert rows[ROWS[3][0]].value == 11.1 and "2 hook run(s)" in rows[ROWS[3][0]].note


def test_convert_missing_rounds_are_not_measured() -> None:
    rows = convert({"first": [8.0], "first_started": False})
    assert all(r.value is None for r in rows)
    assert [r.name for r in planned("no qemu")] == [n for n, _ in ROWS]


def test_rounds_that_outlasted_the_budget_are_counted_not_timed() -> None:
    doc = {"none": [0.9], "reopen": [5.6, 5.9], "reopen_killed": 1, "open": [1.0]}
    rows = {r.name: r for r in convert({**doc, "first": [8.0], "first_started": False})}
    reopen = rows[ROWS[1][0]]
    assert reopen.value == 5.75 and "1 more round(s) outlasted" in reopen.note
    assert "outlasted" not in rows[ROWS[2][0]].note
