"""`cva luks ...` commands (registered by agent.cli).

`cva luks inspect DEVICE` prints the structural verdict on a LUKS2 header as JSON:
{"verdict": "ok"|"refused", "cva_token": bool, "reasons": [...]}; exit 0 for ok, 1 for refused.
No key is needed (so the token MAC is not checked: only its shape).

`cva luks blank PATH [--sampled]` runs cva's blankness proof (luks.blankproof: signatures, then
every byte read as zero; `--sampled`: the contract's `blank_check = "sampled"` look) on a device
or an image file and prints {"blank": bool, "bytes_scanned": N, "first_nonzero_offset": N|null,
"reasons": [...]} (plus "mode" and "size_bytes"); exit 0 only when blank, 1 when not, 2 when it
could not look. A scan that takes longer than a few seconds prints a progress line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from agent.errors import REFUSALS


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this area's subcommands to `cva`."""
    luks = sub.add_parser("luks", help="LUKS2 header tools")
    luks_sub = luks.add_subparsers(dest="luks_command", metavar="COMMAND")
    luks_sub.required = True
    inspect = luks_sub.add_parser(
        "inspect", help="structural verdict on a LUKS2 header (no key needed), as JSON"
    )
    inspect.add_argument("device", metavar="DEVICE", help="block device or image file")
    inspect.add_argument(
        "--integrity",
        choices=("auto", "on", "off"),
        default="auto",
        help="what the contract says (auto: as the header declares)",
    )
    inspect.set_defaults(func=_inspect)
    blank = luks_sub.add_parser(
        "blank", help="prove a device or image file blank (every byte zero), as JSON"
    )
    blank.add_argument("path", metavar="PATH", help="block device or image file")
    blank.add_argument(
        "--sampled",
        action="store_true",
        help="only the header region and samples (cannot see data between the samples)",
    )
    blank.set_defaults(func=_blank)


PROGRESS_AFTER = 3.0  # seconds before the first progress line on stderr


def _blank(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415 - handlers import lazily (fast `cva --help`)
    from pathlib import Path  # noqa: PLC0415

    from luks import blankproof  # noqa: PLC0415

    started = time.monotonic()
    shown = False

    def progress(done: int, total: int) -> None:
        nonlocal shown
        elapsed = time.monotonic() - started
        if elapsed < PROGRESS_AFTER and done < total:
            return
        if elapsed < PROGRESS_AFTER and not shown:
            return
        shown = True
        pct = 100 * done // total if total else 100
        rate = done / max(elapsed, 1e-6) / (1 << 20)
        sys.stderr.write(f"\rcva luks blank: {done} of {total} bytes ({pct}%), {rate:.0f} MiB/s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    try:
        proof = blankproof.prove_blank(
            Path(args.path), mode="sampled" if args.sampled else "full", progress=progress
        )
    except (OSError, ValueError) as exc:
        if shown:
            sys.stderr.write("\n")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        sys.stderr.write(f"cva: cannot prove {args.path} blank: {reason}\n")
        return 2
    except REFUSALS as exc:
        sys.stderr.write(f"cva: cannot prove {args.path} blank: {exc.message}\n")
        return 2
    if shown and proof.bytes_scanned < proof.size_bytes:
        sys.stderr.write("\n")
    sys.stdout.write(json.dumps(proof.as_json()) + "\n")
    return 0 if proof.blank else 1


def _inspect(args: argparse.Namespace) -> int:
    from luks.header import (  # noqa: PLC0415 - handlers import lazily (fast `cva --help`)
        HeaderError,
        allow_list_reasons,
        declares_integrity,
        parse_luks2,
        read_header_area,
    )

    area = read_header_area(args.device)
    cva_token = False
    try:
        hdr = parse_luks2(area)
    except HeaderError as exc:
        reasons = [f"header: {exc.message}"]
    else:
        integrity = {"on": True, "off": False}.get(args.integrity, declares_integrity(hdr))
        reasons = allow_list_reasons(hdr, integrity=integrity)
        tokens = hdr.cva_tokens()
        cva_token = len(tokens) == 1 and not any(r.startswith("token-") for r in reasons)
    verdict = {
        "verdict": "refused" if reasons else "ok",
        "cva_token": cva_token,
        "reasons": reasons,
    }
    sys.stdout.write(json.dumps(verdict) + "\n")
    return 1 if reasons else 0
