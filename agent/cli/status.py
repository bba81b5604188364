"""`cva status [--json]`: what the running daemon holds, asked over its root-only control socket
(agent.control): every volume (contract and SecureMount, persistent and ephemeral) with its
state, disk, mapper, LUKS UUID, seq, filesystem size and use, blank-proof progress and last
measured event; the KBS session; the measurement sink; the version. A table, or the JSON
report of agent.control.report with `--json`. Exit 0, or 2 when the daemon cannot be asked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this area's subcommands to `cva`."""
    p = sub.add_parser(
        "status", help="what the running daemon holds (root, inside the guest; not the host API)"
    )
    p.add_argument("--json", action="store_true", help="the JSON report instead of a table")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--socket", type=Path, default=None, help="control socket (default /run/cva/control.sock)"
    )
    where.add_argument(
        "--config", type=Path, default=None, help="daemon config whose state_dir holds the socket"
    )
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    from agent.config import load_config  # noqa: PLC0415 - lazy: keeps `cva --help` fast
    from agent.control.client import ControlError, request  # noqa: PLC0415
    from agent.control.report import ReportError, render_table, report_from_json  # noqa: PLC0415

    path = args.socket or load_config(args.config).control_socket
    try:
        doc = request(path, "status")
        report = report_from_json(doc)
    except (ControlError, ReportError) as exc:
        sys.stderr.write(f"cva: status: {exc}\n")
        return 2
    if args.json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(render_table(report))
    return 0
