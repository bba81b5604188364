"""`cva hook prestart`: the guest prestart hook (agent.hook.prestart), run by kata-agent.

Kept to the hook's own imports: `cva hook` loads neither gRPC nor the storage stack.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `cva hook` to `cva`."""
    p = sub.add_parser("hook", help="OCI hooks run by kata-agent in the guest")
    hooks = p.add_subparsers(dest="hook", metavar="HOOK")
    hooks.required = True
    pre = hooks.add_parser(
        "prestart",
        help="bind the container's volumes in its mount namespace (OCI state on stdin);"
        " on any failure the container's init is killed",
    )
    pre.add_argument(
        "--config", type=Path, default=None, help="daemon config (default /etc/cva/config.toml)"
    )
    pre.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="kill the container this long after the hook's start at the latest (default 8;"
        " kata kills a hook at 10 s: only tests raise it)",
    )
    pre.set_defaults(func=_prestart)


def _prestart(args: argparse.Namespace) -> int:
    from agent.hook import prestart  # noqa: PLC0415 - lazy: keeps `cva --help` fast

    if args.budget is None:
        return prestart.main(args.config)
    return prestart.main(args.config, budget=args.budget)  # out of range: fails closed there
