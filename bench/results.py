"""The results of one `make bench` run: records, targets, `results.json` and `REPORT.md`.

Pure code (no timing, no processes): the benchmark modules build `Result`s with `measured(...)`
or `not_measured(...)`; the driver writes them with `write_json` and `render_report`.

A result compares `value` with a `baseline` measured in the same run: `ratio = value / baseline`.
A `Target` is a bound on the ratio (`on="ratio"`) or on the value itself (`on="value"`, e.g. an
RSS limit or an exact request count); `met` is None when there is no target or nothing was
measured. `results.json` is a list of objects with exactly the keys of `JSON_KEYS` (plus `note`
when there is one), so runs can be compared over time.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

JSON_KEYS = ("name", "unit", "value", "baseline_name", "baseline", "ratio", "target", "met")
TIMES = "\u00d7"  # the report writes ratios as 1.234x
Op = Literal["<=", ">=", "<", ">", "=="]
_OPS: Mapping[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "==": lambda a, b: math.isclose(a, b, rel_tol=0.0, abs_tol=1e-9),
}


@dataclass(frozen=True)
class Target:
    """`ratio <= 1.1`, `value < 96` ...: `describe` is what the report and the JSON show."""

    on: Literal["ratio", "value"]
    op: Op
    bound: float
    why: str = ""  # e.g. "≥ 3x faster than (a)"

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"unknown comparison {self.op!r}")
        if self.on not in ("ratio", "value"):
            raise ValueError(f"a target bounds the ratio or the value, not {self.on!r}")

    def describe(self) -> str:
        text = f"{self.on} {self.op} {_fmt(self.bound)}"
        return f"{text} ({self.why})" if self.why else text

    def met_by(self, value: float | None, ratio: float | None) -> bool | None:
        subject = ratio if self.on == "ratio" else value
        if subject is None or not math.isfinite(subject):
            return None
        return _OPS[self.op](subject, self.bound)


@dataclass(frozen=True)
class Result:
    name: str
    unit: str
    value: float | None
    baseline_name: str | None = None
    baseline: float | None = None
    target: Target | None = None
    note: str = ""
    group: str = ""  # report section (not part of the JSON record)

    @property
    def ratio(self) -> float | None:
        return ratio_of(self.value, self.baseline)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met_by(self.value, self.ratio)

    @property
    def measured(self) -> bool:
        return self.value is not None

    def to_json(self) -> dict[str, Any]:
        ratio = self.ratio
        record: dict[str, Any] = {
            "name": self.name,
            "unit": self.unit,
            "value": _round(self.value),
            "baseline_name": self.baseline_name,
            "baseline": _round(self.baseline),
            "ratio": None if ratio is None else round(ratio, 4),
            "target": None if self.target is None else self.target.describe(),
            "met": self.met,
        }
        if self.note:
            record["note"] = self.note
        if self.group:
            record["group"] = self.group
        return record


def ratio_of(value: float | None, baseline: float | None) -> float | None:
    """value / baseline; None when either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    ratio = value / baseline
    return ratio if math.isfinite(ratio) else None


def measured(
    name: str,
    unit: str,
    value: float,
    *,
    baseline_name: str | None = None,
    baseline: float | None = None,
    target: Target | None = None,
    note: str = "",
    group: str = "",
) -> Result:
    return Result(name, unit, float(value), baseline_name, _opt(baseline), target, note, group)


def not_measured(
    name: str,
    reason: str,
    *,
    unit: str = "",
    baseline_name: str | None = None,
    target: Target | None = None,
    group: str = "",
) -> Result:
    return Result(name, unit, None, baseline_name, None, target, f"not measured: {reason}", group)


def result_from_json(record: Mapping[str, Any], target: Target | None = None) -> Result:
    """Rebuild a Result from a record a benchmark module wrote (the target travels as a dict)."""
    t = record.get("target_spec")
    if target is None and isinstance(t, Mapping):
        target = Target(t["on"], t["op"], float(t["bound"]), str(t.get("why", "")))
    value = record.get("value")
    baseline = record.get("baseline")
    return Result(
        name=str(record["name"]),
        unit=str(record.get("unit", "")),
        value=None if value is None else float(value),
        baseline_name=record.get("baseline_name"),
        baseline=None if baseline is None else float(baseline),
        target=target,
        note=str(record.get("note", "")),
        group=str(record.get("group", "")),
    )


def to_wire(result: Result) -> dict[str, Any]:
    """What a benchmark module hands the driver: the JSON record plus the target's parts."""
    record = result.to_json()
    record["value"], record["baseline"] = result.value, result.baseline  # unrounded: same `met`
    if result.target is not None:
        t = result.target
        record["target_spec"] = {"on": t.on, "op": t.op, "bound": t.bound, "why": t.why}
    return record


def write_json(results: Sequence[Result], path: Path) -> None:
    path.write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")


# --- REPORT.md ------------------------------------------------------------------------------
def _round(x: float | None) -> float | None:
    if x is None:
        return None
    return float(f"{x:.6g}")


def _opt(x: float | None) -> float | None:
    return None if x is None else float(x)


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 1000 or x == int(x):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.01:
        return f"{x:.3g}"
    return f"{x:.2e}"


def _met_cell(r: Result) -> str:
    if not r.measured:
        return "not measured"
    if r.met is None:
        return "—" if r.target is None else "n/a"
    return "**met**" if r.met else "**NOT met**"


def _ratio_cell(r: Result) -> str:
    ratio = r.ratio
    return "—" if ratio is None else f"{ratio:.3f}{TIMES}"


def summary_lines(results: Iterable[Result]) -> list[str]:
    """The plain statement of which targets are met, which not, which could not be measured."""
    rs = list(results)
    targeted = [r for r in rs if r.target is not None]
    met = [r for r in targeted if r.met is True]
    missed = [r for r in targeted if r.met is False]
    absent = [r for r in targeted if r.met is None]
    lines = [
        f"**{len(met)} of {len(targeted)} targets met, {len(missed)} not met, "
        f"{len(absent)} not measured.**",
        "",
    ]

    def item(r: Result) -> str:
        parts = [f"`{r.name}`: {_fmt(r.value)} {r.unit}"]
        if r.baseline is not None:
            parts.append(f"vs {r.baseline_name} {_fmt(r.baseline)} {r.unit}")
        if r.ratio is not None:
            parts.append(f"ratio {r.ratio:.3f}{TIMES}")
        assert r.target is not None
        parts.append(f"target {r.target.describe()}")
        return "- " + ", ".join(parts)

    if met:
        lines += ["Met:", *[item(r) for r in met], ""]
    if missed:
        lines += ["Not met:", *[item(r) for r in missed], ""]
    if absent:
        lines += ["Not measured:"]
        lines += [f"- `{r.name}`: {r.note or 'no value'}" for r in absent]
        lines.append("")
    untargeted_missing = [r for r in rs if r.target is None and not r.measured]
    if untargeted_missing:
        lines += ["Also not measured (no target):"]
        lines += [f"- `{r.name}`: {r.note or 'no value'}" for r in untargeted_missing]
        lines.append("")
    return lines


def table_lines(results: Iterable[Result]) -> list[str]:
    lines = [
        "| benchmark | value | baseline | ratio | target | met | note |",
        "|---|---:|---|---:|---|---|---|",
    ]
    for r in results:
        value = f"{_fmt(r.value)} {r.unit}".strip() if r.measured else "—"
        baseline = "—"
        if r.baseline_name:
            baseline = f"{r.baseline_name}: {_fmt(r.baseline)} {r.unit}".strip()
        target = r.target.describe() if r.target else "—"
        note = r.note.replace("|", "/")
        lines.append(
            f"| {r.name} | {value} | {baseline} | {_ratio_cell(r)} | {target} | "
            f"{_met_cell(r)} | {note} |"
        )
    return lines


def render_report(
    results: Sequence[Result],
    *,
    title: str = "cva benchmarks",
    preamble: Sequence[str] = (),
    group_notes: Mapping[str, Sequence[str]] | None = None,
    chart: str | None = None,
) -> str:
    """REPORT.md: summary first, then one table per group, in the order the groups appear."""
    lines = [f"# {title}", "", *preamble]
    if preamble:
        lines.append("")
    lines += ["## Summary", "", *summary_lines(results)]
    if chart:
        lines += [f"![ratios against the baselines]({chart})", ""]
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.group or "other", []).append(r)
    for group, members in sorted(groups.items()):  # groups are numbered "1. ...", "2. ..."
        lines += [f"## {group}", ""]
        for note in (group_notes or {}).get(group, ()):
            lines += [note, ""]  # one paragraph each
        lines += [*table_lines(members), ""]
    return "\n".join(lines).rstrip() + "\n"
