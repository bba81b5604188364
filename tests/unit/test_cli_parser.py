"""`cva COMMAND ...` builds only COMMAND's parser group (agent/cli/__init__.py REGISTRARS): the
table must name exactly what each registrar adds, and the partial parser must answer exactly as
the full one (help, usage errors, parsed values)."""

from __future__ import annotations

import argparse

import pytest

from agent.cli import REGISTRARS, build_parser

ALL_COMMANDS = [c for commands in REGISTRARS.values() for c in commands]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0].choices) if found else {}


def _choices(parser: argparse.ArgumentParser) -> list[str]:
    return list(_subparsers(parser))


def _outcome(
    parser: argparse.ArgumentParser, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[object, str, str]:
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        result: object = ("exit", exc.code)
    else:
        result = {k: v for k, v in vars(ns).items() if k != "func"}
        result["func"] = getattr(getattr(ns, "func", None), "__qualname__", None)
    out, err = capsys.readouterr()
    return result, out, err


def test_the_table_names_what_each_registrar_adds() -> None:
    assert _choices(build_parser()) == ALL_COMMANDS
    assert len(set(ALL_COMMANDS)) == len(ALL_COMMANDS)
    for commands in REGISTRARS.values():
        for command in commands:
            assert _choices(build_parser(command)) == list(commands)


@pytest.mark.parametrize("first", [None, "", "-h", "--help", "nosuch", "SERVE", "ser"])
def test_anything_but_a_known_command_builds_them_all(first: str | None) -> None:
    assert _choices(build_parser(first)) == ALL_COMMANDS


def _argvs() -> list[list[str]]:
    """`--help` of every command and subcommand, plus usage errors and good command lines."""
    full = build_parser()
    argvs: list[list[str]] = []
    for command in ALL_COMMANDS:
        argvs += [[command, "--help"], [command], [command, "--no-such-option"]]
        for name in _subparsers(_subparsers(full)[command]):
            argvs += [[command, name, "--help"], [command, name], [command, "nosuch"]]
    argvs += [
        ["serve"],
        ["serve", "--config", "/etc/cva/other.toml"],
        ["serve", "--config"],
        ["serve", "extra"],
        ["prepare", "cid-1", "--timeout", "5"],
        ["prepare", "cid-1", "--timeout", "soon"],
        ["list", "--address", "unix:/run/x.sock"],
        ["release"],
    ]
    return argvs


@pytest.mark.parametrize("argv", _argvs(), ids=lambda a: " ".join(a) or "-")
def test_the_partial_parser_answers_as_the_full_one(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    full = _outcome(build_parser(), argv, capsys)
    partial = _outcome(build_parser(argv[0]), argv, capsys)
    assert partial == full


def test_version_answers_with_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from agent import __version__
    from agent.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"cva {__version__}\n"
    with pytest.raises(SystemExit) as exc:  # the parser knows it too (listed in --help)
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"cva {__version__}\n"
