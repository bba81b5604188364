"""`cva serve` (the daemon) and `cva prepare|release|list` (gRPC clients printing JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this area's subcommands to `cva`."""
    p = sub.add_parser("serve", help="run the daemon (systemd Type=notify)")
    p.add_argument(
        "--config", type=Path, default=None, help="daemon config (default /etc/cva/config.toml)"
    )
    p.set_defaults(func=_serve)

    for name, help_text, func in (
        ("prepare", "bind a container's volumes (PrepareVolumes)", _prepare),
        ("release", "unbind a container's volumes (ReleaseVolumes)", _release),
        ("list", "every volume of the contract and its state (ListVolumes)", _list),
    ):
        c = sub.add_parser(name, help=help_text)
        if name != "list":
            c.add_argument("container_id", metavar="CONTAINER_ID")
        c.add_argument(
            "--address",
            default="unix:/run/cva/grpc.sock",
            help="gRPC target: unix:/PATH, unix-abstract:NAME or 127.0.0.1:PORT",
        )
        c.add_argument("--timeout", type=float, default=300.0, help="call deadline in seconds")
        c.set_defaults(func=func)


def _serve(args: argparse.Namespace) -> int:
    from agent.config import load_config  # noqa: PLC0415 - lazy: keeps `cva --help` fast

    config = load_config(args.config)  # a bad config is refused before anything else loads
    from agent.startup import serve  # noqa: PLC0415 - lazy: keeps `cva --help` fast

    return serve(config)


def _print(doc: dict[str, Any]) -> int:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from agent.rpc.client import AgentClient, to_json_dict  # noqa: PLC0415 - lazy: keeps `cva --help` fast

    with AgentClient(args.address, timeout=args.timeout) as client:
        return _print(to_json_dict(client.prepare(args.container_id)))


def _release(args: argparse.Namespace) -> int:
    from agent.rpc.client import AgentClient, to_json_dict  # noqa: PLC0415 - lazy: keeps `cva --help` fast

    with AgentClient(args.address, timeout=args.timeout) as client:
        return _print(to_json_dict(client.release(args.container_id)))


def _list(args: argparse.Namespace) -> int:
    from agent.rpc.client import AgentClient, to_json_dict  # noqa: PLC0415 - lazy: keeps `cva --help` fast

    with AgentClient(args.address, timeout=args.timeout) as client:
        return _print(to_json_dict(client.list()))
