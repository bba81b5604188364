"""`make bench` = `python -m bench`: run every benchmark module, write results.json + REPORT.md.

Each module runs in its own process (`bench.run_one`) under a time limit, with its output in
`bench/logs/<module>.log`. A module that fails, times out or cannot run here becomes
"not measured: <reason>" entries in the report, never a failed `make bench`. Nothing here is a
test: the numbers are ratios against baselines measured in the same run.

    python -m bench [--only footprint,kbs_roundtrips] [--skip vm_storage] [--out bench]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.results import Result, not_measured, render_report, result_from_json, write_json

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Module:
    name: str  # bench.<name>
    timeout: float  # seconds
    # run first, outside the time limit (e.g. building the guest image on a clean machine)
    prepare: tuple[str, ...] = ()
    prepare_timeout: float = 1800.0


MODULES = (
    Module("vm_storage", 1600.0, prepare=("-m", "tests.vm.build")),
    Module("vm_kata", 660.0, prepare=("-m", "tests.vm.build")),
    Module("vm_hook", 900.0, prepare=("-m", "tests.vm.build")),
    Module("kbs_roundtrips", 180.0),
    Module("footprint", 120.0),
    Module("rpc_latency", 120.0),
    Module("image_size", 600.0),
)


def _module_info(name: str) -> tuple[str, Any]:
    try:
        mod = importlib.import_module(f"bench.{name}")
    except Exception as exc:  # a broken module must not stop the others
        return name, exc
    return str(getattr(mod, "GROUP", name)), mod


def _placeholders(name: str, reason: str) -> list[Result]:
    group, mod = _module_info(name)
    planned = getattr(mod, "planned", None)
    if callable(planned):
        with contextlib.suppress(Exception):
            return list(planned(reason))
    return [not_measured(f"{name} (all)", reason, group=group)]


def prepare_module(module: Module, logs: Path) -> None:
    """The module's preparation step, if its code is here; failures show up in the module."""
    if not module.prepare or importlib.util.find_spec(module.prepare[-1]) is None:
        return
    log = logs / f"{module.name}-prepare.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with log.open("wb") as handle:
        try:
            subprocess.run(
                [sys.executable, *module.prepare],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=module.prepare_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            handle.write(b"prepare step timed out\n")


def run_module(
    module: Module, work: Path, logs: Path
) -> tuple[list[Result], list[tuple[str, str]], float]:
    out = work / f"{module.name}.json"
    out.unlink(missing_ok=True)
    log = logs / f"{module.name}.log"
    start = time.monotonic()
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.run_one", f"bench.{module.name}", str(out)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=module.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait()
            rc = None
    seconds = time.monotonic() - start
    rel = log.relative_to(REPO) if log.is_relative_to(REPO) else log
    if rc is None:
        reason = f"bench.{module.name} exceeded its {module.timeout:.0f} s limit (see {rel})"
        return _placeholders(module.name, reason), [], seconds
    if rc != 0 or not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        reason = f"bench.{module.name} failed (rc {rc}): {tail[0][:200]} (see {rel})"
        return _placeholders(module.name, reason), [], seconds
    doc = json.loads(out.read_text())
    results = [result_from_json(r) for r in doc["results"]]
    first = results[0].group if results else module.name
    notes = [(n.get("group") or first, str(n["text"])) for n in doc.get("notes", [])]
    return results, notes, seconds


def _line(r: Result) -> str:
    """One console line: the value with its baseline beside it."""
    if not r.measured:
        return f"{r.name}: {r.note}"
    text = f"{r.name}: {r.value:.4g} {r.unit}"
    if r.baseline is not None:
        text += f" | {r.baseline_name}: {r.baseline:.4g} {r.unit}"
    if r.ratio is not None:
        text += f" | ratio {r.ratio:.3f}"
    if r.target is not None:
        text += f" | {r.target.describe()}: {'met' if r.met else 'NOT met'}"
    return text


def _git_head() -> str:
    try:
        return (
            subprocess.run(
                ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated module names")
    ap.add_argument("--skip", default="", help="comma-separated module names")
    ap.add_argument("--out", type=Path, default=REPO / "bench")
    args = ap.parse_args(argv)
    only = {m for m in args.only.split(",") if m}
    skip = {m for m in args.skip.split(",") if m}
    out_dir: Path = args.out
    logs = out_dir / "logs"
    work = logs / "raw"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: list[Result] = []
    group_notes: dict[str, list[str]] = {}
    timings: list[str] = []
    for module in MODULES:
        if (only and module.name not in only) or module.name in skip:
            continue
        print(f"bench: {module.name} ...", flush=True)
        prepare_module(module, logs)
        got, notes, seconds = run_module(module, work, logs)
        results += got
        for group, text in notes:
            group_notes.setdefault(group, []).append(text)
        timings.append(f"{module.name} {seconds:.0f} s")
        for r in got:
            print(f"  {_line(r)}", flush=True)
        missing = sum(1 for r in got if not r.measured)
        print(
            f"bench: {module.name}: {len(got)} results ({missing} not measured), {seconds:.0f} s",
            flush=True,
        )
    total = time.monotonic() - started
    preamble = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at `{_git_head()}` on "
        f"{platform.node() or 'host'}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; `make bench` took {total:.0f} s "
        f"({', '.join(timings)}).",
        "",
        "Every number is a ratio against a baseline measured side by side in this run "
        "(`ratio = value / baseline`); absolute times on shared machines vary from run to run. "
        "Nothing here is a pass/fail test. Machine-readable: `bench/results.json`; "
        "logs: `bench/logs/`.",
    ]
    write_json(results, out_dir / "results.json")
    report = render_report(results, preamble=preamble, group_notes=group_notes)
    (out_dir / "REPORT.md").write_text(report)
    met = sum(1 for r in results if r.met is True)
    targeted = sum(1 for r in results if r.target is not None)
    print(
        f"bench: {met} of {targeted} targets met; wrote {out_dir / 'REPORT.md'} and "
        f"{out_dir / 'results.json'} in {total:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
