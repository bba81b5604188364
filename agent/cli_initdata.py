"""CLI commands of this area (registered by agent.cli); filled in by its issue."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this area's subcommands to `cva`."""
