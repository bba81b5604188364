"""The `cva` command line: `main` (the console script `agent.cli:main`, `python -m agent`) and
one module per command group (`daemon`, `initdata`, `kbs`, `evidence`, `luks`, `status`, `hook`).

Each command group lives in its own module and registers itself here; heavy imports happen
inside the handlers, so `cva --help` and the daemon's start stay fast. Machine-readable output is
JSON on stdout; errors are one line on stderr; exit 0 only on success; never a traceback for bad
input. The CLI is the application's outermost layer: it may import anything in agent, luks and
evidence; nothing imports it but `agent.__main__`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from agent import __version__
from agent.errors import REFUSALS

# "module:function" registrars, each `register(subparsers) -> None`, and the top-level commands
# each adds; each added parser sets `func=handler(args) -> int` via `set_defaults`. `cva COMMAND`
# loads only COMMAND's registrar (the daemon's start does not build the other command groups);
# anything else, `cva --help` included, loads them all. tests/unit/test_cli_parser.py checks
# that these names are what the registrars add.
REGISTRARS: dict[str, tuple[str, ...]] = {
    "agent.cli.daemon:register": ("serve", "prepare", "release", "list"),
    "agent.cli.initdata:register": ("initdata",),
    "agent.cli.evidence:register": ("evidence",),
    "agent.cli.kbs:register": ("kbs",),
    "agent.cli.luks:register": ("luks",),
    "agent.cli.status:register": ("status",),
    "agent.cli.hook:register": ("hook",),
}

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"cva: error: {message}\n")
        raise SystemExit(2)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `cva` parser: with only `command`'s group when it names a known command, else all."""
    specs = [spec for spec, commands in REGISTRARS.items() if command in commands]
    parser = _Parser(prog="cva", description="Confidential Volume Agent")
    parser.add_argument("--version", action="version", version=f"cva {__version__}")
    sub: argparse._SubParsersAction[argparse.ArgumentParser]
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for spec in specs or REGISTRARS:
        mod_name, fn_name = spec.split(":")
        register: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]
        register = getattr(importlib.import_module(mod_name), fn_name)
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--version"]:  # answered without loading any command group
        sys.stdout.write(f"cva {__version__}\n")
        return 0
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return func(args)
    except REFUSALS as exc:
        sys.stderr.write(f"cva: {exc.message}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("cva: interrupted\n")
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        sys.stderr.write(f"cva: internal error: {type(exc).__name__}; please report it\n")
        return 70
