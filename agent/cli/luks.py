"""`cva luks ...` commands (registered by agent.cli).

`cva luks inspect DEVICE` prints the structural verdict on a LUKS2 header as JSON:
{"verdict": "ok"|"refused", "cva_token": bool, "reasons": [...]}; exit 0 for ok, 1 for refused.
No key is needed (so the token MAC is not checked: only its shape).
"""

from __future__ import annotations

import argparse
import json
import sys


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
