"""Storage benchmarks in the qemu guest (issue 8 #1 time to ready volume, #2 peak memory, #4 I/O).

Host side: boots the VM suite's guest image once (`tests.vm.machine`, TCG, 2 vCPUs, 2 GiB) with
one blank sparse virtio disk per (size, integrity, variant) plus one for the raw LV, runs
`bench.guest_storage` inside (as root, the repo at /mnt/vmsrc) and turns the JSON it leaves in
the job folder into results. Whatever cannot run here (no VM harness, no storage code, no qemu)
becomes "not measured: <reason>".

Knobs (environment): CVA_BENCH_VM_SIZES (GiB, default "1,8"), CVA_BENCH_VM_INTEGRITY_SIZES
(default "1,8"), CVA_BENCH_CDH_WIPE_MAX_GIB (default 1: the CLI-default baseline with integrity
wipes the whole device, about a minute per GiB under TCG; bigger ones are skipped and say so),
CVA_BENCH_IO_MIB (default 64), CVA_BENCH_IO_OPS (default 2000), CVA_BENCH_VM_TIMEOUT (s, 1500).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.guest_storage import zero_cold_regions
from bench.results import Result, Target, measured, not_measured
from bench.vm_guest import Disks, run_guest_job

GROUP_READY = "1. Time to ready volume (qemu guest)"
GROUP_MEM = "2. Peak memory during format/open (qemu guest)"
GROUP_IO = "4. I/O (qemu guest)"
GROUP_ZERO = "1b. Blankness proof: zero-scan throughput (qemu guest)"
ZERO_TARGET = Target("ratio", ">=", 0.8, "cva ≥ 0.8x dd's read floor")
CREATE_VS_CDH = (
    "cva's create reads every byte of the disk first (1b: at dd's read speed), (a) formats "
    "without looking, so the gap closes as the disk grows: cva ≈ a fixed part + size / read speed"
)
COLD_NOTE = (
    "each check on a fresh 1 GiB region of a blank disk (its first read, as a create sees a "
    "new disk); cva and dd: median of 3 alternating rounds, the hand tools once"
)
WARM_NOTE = (
    "the second pass over one disk: the host's page cache holds the image, so a read costs "
    "the host a memcpy and only the guest's emulated (TCG) CPU limits a tool that looks at "
    "the bytes; dd, which never looks, is not limited by it"
)
VARIANTS = ("cva", "profile", "cdh")
VARIANT_NAMES = {
    "cva": "cva prepare_volume",
    "profile": "(b) CLI, cva's profile",
    "cdh": "(a) CLI defaults (CDH)",
}
IO_COLUMNS = (
    ("seq_write_mib_s", "sequential write", "MiB/s"),
    ("seq_read_mib_s", "sequential read", "MiB/s"),
    ("rand_write_iops", "4K random write", "IOPS"),
    ("rand_read_iops", "4K random read", "IOPS"),
)
NOTES: list[tuple[str, str]] = [
    (
        GROUP_READY,
        "Create = blank disk to mounted ext4; reopen = closed volume to mounted (median of the "
        "interleaved reopen rounds). cva's time is the time inside luks.volume.prepare_volume "
        "(the daemon is already running when PrepareVolumes arrives); the note gives the "
        "child's wall time including interpreter start and imports. (b) has the same safety as "
        "cva: `blkid -p` must find nothing and the whole disk must read as zeros, checked with "
        "the fastest standard tool measured in this guest (section 1b); (a) has none (CDH "
        "formats what it is given). Beyond (b)'s steps, cva copies and validates the header "
        "and opens from that copy, checks the live dm table and writes/verifies its MAC'd "
        "state token. The CLI scripts pass the passphrase on stdin, as CDH does with a key "
        "file.",
    ),
    (
        GROUP_MEM,
        "(a)'s argon2id memory cost is what cryptsetup's own benchmark picked in this guest: on a "
        "slow (emulated) CPU it lowers the memory to keep unlocking near 2 s; on hardware it "
        "picks up to 1 GiB (at most half the RAM), so (a)'s peak RSS here is a lower bound.",
    ),
]


def _env_list(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip()]


def cases() -> list[tuple[int, bool]]:
    sizes = _env_list("CVA_BENCH_VM_SIZES", "1,8")
    integ = set(_env_list("CVA_BENCH_VM_INTEGRITY_SIZES", "1,8"))
    return [(s, i) for s in sizes for i in (False, True) if not i or s in integ]


def _label(size: int, integrity: bool) -> str:
    return f"{size} GiB, integrity {'on' if integrity else 'off'}"


def planned(reason: str) -> list[Result]:
    out: list[Result] = []
    for size, integ in cases():
        lab = _label(size, integ)
        out += [
            not_measured(
                f"ready {lab}: create vs (b)",
                reason,
                unit="s",
                group=GROUP_READY,
                target=Target("ratio", "<=", 1.1, "cva ≤ 1.1x (b)"),
            ),
            not_measured(
                f"ready {lab}: create vs (a)",
                reason,
                unit="s",
                group=GROUP_READY,
                target=Target("ratio", "<=", 1 / 3, "cva ≥ 3x faster than (a)"),
            ),
            not_measured(
                f"ready {lab}: reopen vs (b)",
                reason,
                unit="s",
                group=GROUP_READY,
                target=Target("ratio", "<=", 1.1, "cva ≤ 1.1x (b)"),
            ),
            not_measured(
                f"peak RSS {lab}: create",
                reason,
                unit="MiB",
                group=GROUP_MEM,
                target=Target("value", "<", 96, "cva under 96 MiB"),
            ),
        ]
    out.extend(
        not_measured(
            f"zero scan, 1 GiB blank disk, {when}: cva vs dd of=/dev/null",
            reason,
            unit="MiB/s",
            group=GROUP_ZERO,
            target=ZERO_TARGET,
        )
        for when in ("first read", "host cache warm")
    )
    for _, col, unit in IO_COLUMNS:
        out.append(
            not_measured(
                f"I/O {col}: dm-crypt, cva's flags",
                reason,
                unit=unit,
                group=GROUP_IO,
                target=Target("ratio", ">=", 1.0, "cva's flags ≥ the defaults"),
            )
        )
    return out


def _plan(job: Path) -> tuple[dict[str, Any], list[Any]]:
    disks = Disks(job)
    disk = disks.add

    plan_cases: list[dict[str, Any]] = []
    wipe_max = int(os.environ.get("CVA_BENCH_CDH_WIPE_MAX_GIB", "1"))
    for size, integ in sorted(cases()):
        variants = [v for v in VARIANTS if not (v == "cdh" and integ and size > wipe_max)]
        serials = {v: disk(f"b{size}{'i' if integ else 'p'}{v[:3]}", size << 30) for v in variants}
        plan_cases.append(
            {"size_gib": size, "integrity": integ, "variants": variants, "disks": serials}
        )
    io: dict[str, Any] = {
        "mib": int(os.environ.get("CVA_BENCH_IO_MIB", "64")),
        "ops": int(os.environ.get("CVA_BENCH_IO_OPS", "2000")),
        "rounds": 3,
        "raw_disk": disk("braw", 1 << 30),
    }
    for c in plan_cases:
        if c["size_gib"] == min(s for s, _ in cases()):
            if c["integrity"]:
                io["cva_integrity_disk"] = c["disks"]["cva"]
            else:
                io["cva_disk"] = c["disks"]["cva"]
                io["cdh_disk"] = c["disks"]["cdh"]
    plan = {
        "cases": plan_cases,
        "io": io,
        "reopen_rounds": 3,
        "warmup_disk": disk("bwarm", 1 << 30),
        # a fresh 1 GiB region of it per first-read zero check (guest_storage.zero_scan_rates)
        "zero_cold_disk": disk("bzcold", zero_cold_regions() << 30),
    }
    return plan, disks.all


def collect() -> list[Result]:
    run = run_guest_job(
        "vm_storage",
        module="bench.guest_storage",
        out_name="storage.json",
        needs="luks.volume",
        plan=_plan,
        timeout=float(os.environ.get("CVA_BENCH_VM_TIMEOUT", "1500")),
        tmp_prefix="cva-bench-vm-",
        absent="not in this tree yet",
    )
    if isinstance(run, str):
        return planned(run)
    doc, problem = run.doc, run.problem
    guest = doc.get("guest", {})
    NOTES.append(
        (
            GROUP_READY,
            f"Guest (sections 1, 2 and 4): qemu TCG (no KVM on this host), "
            f"{guest.get('cpus')} vCPUs, {guest.get('mem_mib')} MiB, kernel {guest.get('kernel')}, "
            f"{guest.get('cryptsetup')}; raw sparse disk images on the host. Absolute numbers "
            "are TCG numbers (crypto and argon2 are emulated, many times slower than on "
            "hardware), and other VMs may share the host's cores; the ratios are the point.",
        )
    )
    if problem:
        NOTES.append((GROUP_READY, f"The guest run did not finish: {problem.splitlines()[0]}"))
    return convert(doc, problem)


def _zero_rows(items: dict[str, Any], errors: dict[str, str], fallback: str) -> list[Result]:
    """cva's zero scan vs `dd ... of=/dev/null` (target), and each hand tool vs dd (info), on
    the first read of a fresh disk and with the host's page cache warm."""
    z = items.get("zero-scan")
    dd_name = "dd if=DEV of=/dev/null bs=4M iflag=direct"
    out: list[Result] = []
    for prefix, when, why in (
        ("cold:", "first read", COLD_NOTE),
        ("", "host cache warm", WARM_NOTE),
    ):
        name = f"zero scan, 1 GiB blank disk, {when}: cva vs dd of=/dev/null"
        if not isinstance(z, dict) or f"{prefix}cva_mib_s" not in z:
            reason = errors.get("zero-scan", fallback)
            out.append(
                not_measured(name, reason, unit="MiB/s", group=GROUP_ZERO, target=ZERO_TARGET)
            )
            continue
        floor = float(z[f"{prefix}dd_null_mib_s"])
        out.append(
            measured(
                name,
                "MiB/s",
                float(z[f"{prefix}cva_mib_s"]),
                baseline_name=dd_name,
                baseline=floor,
                target=ZERO_TARGET,
                note=f"{why}; luks.blank.scan_zeros: O_DIRECT 4 MiB reads by 4 threads, "
                "memcmp to zeros without the GIL",
                group=GROUP_ZERO,
            )
        )
        tools = {k.removeprefix(f"{prefix}tool:").removesuffix("_mib_s"): float(v)
                 for k, v in z.items() if k.startswith(f"{prefix}tool:")}  # fmt: skip
        fastest = max(tools, key=lambda k: tools[k]) if tools else "?"
        for tool, rate in sorted(tools.items()):
            chosen = prefix == "cold:" and tool == fastest
            out.append(
                measured(
                    f"zero check by hand, {when}, {tool}",
                    "MiB/s",
                    rate,
                    baseline_name=dd_name,
                    baseline=floor,
                    note="(b)'s zero check in section 1" if chosen else "",
                    group=GROUP_ZERO,
                )
            )
    return out


def _tag(case: dict[str, Any]) -> str:
    return f"{case['size_gib']}g-{'int' if case['integrity'] else 'plain'}/"


def convert(doc: dict[str, Any], problem: str | None = None) -> list[Result]:
    """Results from the guest's JSON (items keyed `<size>g-<plain|int>/<variant>/<step>`)."""
    items: dict[str, Any] = doc.get("items", {})
    errors: dict[str, str] = doc.get("errors", {})
    plan = doc.get("plan", {})
    fallback = (problem or "not reached").splitlines()[0]

    def why(key: str) -> str:
        variant = key.split("/")[1] if key.count("/") >= 2 else ""
        case_variants = next(
            (c["variants"] for c in plan.get("cases", []) if key.startswith(_tag(c))), None
        )
        if variant == "cdh" and case_variants is not None and "cdh" not in case_variants:
            one = items.get("1g-int/cdh/create")
            per_gib = f" (1 GiB took {float(one['seconds']):.0f} s here)" if one else ""
            return (
                "skipped: the CLI default's full-device integrity wipe grows with the disk, "
                f"about a minute per GiB under TCG{per_gib}; over this run's time budget"
            )
        return errors.get(key, fallback)

    def get(key: str, field: str) -> float | None:
        v = items.get(key)
        got = v.get(field) if isinstance(v, dict) else None
        return None if got is None else float(got)

    out: list[Result] = _zero_rows(items, errors, fallback) if plan.get("warmup_disk") else []
    for case in plan.get("cases", []):
        size, integ = int(case["size_gib"]), bool(case["integrity"])
        lab = _label(size, integ)
        tag = f"{size}g-{'int' if integ else 'plain'}"
        note_int = (
            "(a) = cryptsetup defaults + --integrity hmac-sha256 (full-device wipe); "
            "(b) and cva: no-wipe + pre-writes + mkfs without lazy init"
            if integ
            else ""
        )
        for step, targets in (
            (
                "create",
                (
                    ("profile", Target("ratio", "<=", 1.1, "cva ≤ 1.1x (b)")),
                    ("cdh", Target("ratio", "<=", 1 / 3, "cva ≥ 3x faster than (a)")),
                ),
            ),
            (
                "reopen",
                (
                    ("profile", Target("ratio", "<=", 1.1, "cva ≤ 1.1x (b)")),
                    ("cdh", None),
                ),
            ),
        ):
            cva_key = f"{tag}/cva/{step}"
            for base, target in targets:
                letter = "(b)" if base == "profile" else "(a)"
                base_key = f"{tag}/{base}/{step}"
                name = f"ready {lab}: {step} vs {letter}"
                value, baseline = get(cva_key, "seconds"), get(base_key, "seconds")
                if value is None or baseline is None:
                    missing = cva_key if value is None else base_key
                    out.append(
                        not_measured(
                            name,
                            f"{missing}: {why(missing)}",
                            unit="s",
                            baseline_name=VARIANT_NAMES[base],
                            target=target,
                            group=GROUP_READY,
                        )
                    )
                    continue
                wall = get(cva_key, "wall_seconds")
                note = f"cva child incl. interpreter start: {wall:.2f} s" if wall else ""
                if note_int and base == "cdh":
                    note = f"{note}; {note_int}" if note else note_int
                if step == "create" and base == "cdh":
                    note = f"{note}; {CREATE_VS_CDH}" if note else CREATE_VS_CDH
                out.append(
                    measured(
                        name,
                        "s",
                        value,
                        baseline_name=VARIANT_NAMES[base],
                        baseline=baseline,
                        target=target,
                        note=note,
                        group=GROUP_READY,
                    )
                )
        for step in ("create", "reopen"):
            name = f"peak RSS {lab}: {step}"
            target = Target("value", "<", 96, "cva under 96 MiB")
            cva_key, base_key = f"{tag}/cva/{step}", f"{tag}/cdh/{step}"
            value = get(cva_key, "rss_mib")
            if value is None:
                out.append(
                    not_measured(
                        name,
                        f"{cva_key}: {why(cva_key)}",
                        unit="MiB",
                        target=target,
                        group=GROUP_MEM,
                    )
                )
                continue
            prof = get(f"{tag}/profile/{step}", "rss_mib")
            note = "max RSS of the process and the tools it waited for (wait4)"
            own, imports = get(cva_key, "self_rss_mib"), get(cva_key, "imports_rss_mib")
            if own is not None and imports is not None:
                note += (
                    f"; cva's own process: {imports:.1f} MiB after imports, {own:.1f} MiB "
                    "after prepare_volume"
                )
            if prof is not None:
                note += f"; (b) CLI with cva's profile: {prof:.1f} MiB"
            kdf = items.get(f"{tag}/cdh/header")
            if kdf:
                note += (
                    f"; (a)'s keyslot as cryptsetup benchmarked it in this guest: "
                    f"{kdf.get('PBKDF', '?')}, memory {kdf.get('Memory', '?')}, "
                    f"time cost {kdf.get('Time cost', '?')}"
                )
            out.append(
                measured(
                    name,
                    "MiB",
                    value,
                    baseline_name=VARIANT_NAMES["cdh"],
                    baseline=get(base_key, "rss_mib"),
                    target=target,
                    note=note,
                    group=GROUP_MEM,
                )
            )
    io = plan.get("io")
    if io:
        layouts = {
            "cva": ("io/cva", "dm-crypt, cva's flags"),
            "cdh": ("io/cdh", "dm-crypt, cryptsetup defaults"),
            "raw": ("io/raw-lv", "raw LV"),
            "int": ("io/cva-integrity", "dm-crypt + dm-integrity, cva's flags"),
        }
        io_note = (
            f"{io['mib']} MiB sequential (dd, O_DIRECT, 1 MiB blocks) and {io['ops']} random 4K "
            f"reads/writes (O_DIRECT, queue depth 1, no fio in the guest image) per layout; "
            f"median of {io.get('rounds', 1)} interleaved rounds. Crypt layouts are whole virtio "
            "disks; the raw LV is an LVM volume on its own virtio disk."
        )
        note = ""
        cdh_hdr = next((v for k, v in items.items() if k.endswith("plain/cdh/header") and v), None)
        if cdh_hdr and cdh_hdr.get("sector"):
            io_note += (
                f" cryptsetup's defaults chose {cdh_hdr['sector'].split()[0]}-byte data sectors "
                "(cva: 4096) and "
                "the kcryptd workqueues (cva: no_read/no_write_workqueue)."
            )
        NOTES.append((GROUP_IO, io_note))
        for field, col, unit in IO_COLUMNS:

            def val(layout: str, field: str = field) -> float | None:
                return get(layouts[layout][0], field)

            rows = (
                ("cva", "cdh", Target("ratio", ">=", 1.0, "cva's flags ≥ the defaults")),
                ("cva", "raw", None),
                ("cdh", "raw", None),
                ("int", "cva", None),
            )
            for layout, base, target in rows:
                name = f"I/O {col}: {layouts[layout][1]}"
                if base != "cdh":
                    name += f" vs {layouts[base][1]}"
                value, baseline = val(layout), val(base)
                if value is None:
                    key = layouts[layout][0]
                    reason = f"{key}: {why(key)}"
                    if layout == "int" and not io.get("cva_integrity_disk"):
                        reason = "no integrity volume in this run (CVA_BENCH_VM_INTEGRITY_SIZES)"
                    out.append(not_measured(name, reason, unit=unit, target=target, group=GROUP_IO))
                    continue
                out.append(
                    measured(
                        name,
                        unit,
                        value,
                        baseline_name=layouts[base][1],
                        baseline=baseline,
                        target=target,
                        note=note,
                        group=GROUP_IO,
                    )
                )
    return out
