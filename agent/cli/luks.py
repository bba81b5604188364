"""`cva luks ...` commands (registered by agent.cli).

`cva luks inspect DEVICE` prints the structural verdict on a LUKS2 header as JSON:
{"verdict": "ok"|"refused", "cva_token": bool, "reasons": [...]}; exit 0 for ok, 1 for refused.
No key is needed (so the token MAC is not checked: only its shape).

`cva luks blank PATH [--sampled]` runs cva's blankness proof (luks.blankproof: signatures, then
every byte read as zero; `--sampled`: the contract's `blank_check = "sampled"` look) on a device
or an image file and prints {"blank": bool, "bytes_scanned": N, "first_nonzero_offset": N|null,
"reasons": [...]} (plus "mode" and "size_bytes"); exit 0 only when blank, 1 when not, 2 when it
could not look. A scan that takes longer than a few seconds prints a progress line on stderr.

`cva luks passphrase --secret-file F --volume NAME [--output FILE]` (recovery without cva) derives
volume NAME's LUKS2 passphrase from the KBS resource bytes in F (`-` = stdin; the exact bytes the
KBS serves, nothing stripped) with cva's own derivation (luks.token.derive_keys) and writes the 32
raw bytes, for `cryptsetup open --key-file`, to FILE (created 0600, never an existing file) or to
stdout (refused when stdout is a terminal). The secret and the passphrase never reach argv, the
environment, a log line or an error message; both buffers are wiped before exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import REFUSALS

if TYPE_CHECKING:
    from luks.secret import Secret


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
    phrase = luks_sub.add_parser(
        "passphrase",
        help="a volume's LUKS2 passphrase from its KBS secret (recovery without cva), raw bytes",
    )
    phrase.add_argument(
        "--secret-file",
        required=True,
        metavar="F",
        help="the volume key's KBS resource bytes, exactly as stored (- = stdin)",
    )
    phrase.add_argument("--volume", required=True, metavar="NAME", help="the contract's name")
    phrase.add_argument(
        "--output",
        metavar="FILE",
        help="write to FILE (created 0600; an existing FILE is refused) instead of stdout",
    )
    phrase.set_defaults(func=_passphrase)


PROGRESS_AFTER = 3.0  # seconds before the first progress line on stderr


def _blank(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415 - handlers import lazily (fast `cva --help`)

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


# the ceiling the KBS client puts on one resource (agent.kbs.client.MAX_RESOURCE_BYTES): whatever
# cva could have been given, this command can derive from; a key resource is tens of bytes
MAX_SECRET_FILE_BYTES = 1024 * 1024


def _read_secret(path: str) -> Secret:
    """The file's bytes in a wipeable buffer (read in place, never through an immutable copy)."""
    from luks.secret import Secret  # noqa: PLC0415

    fd = sys.stdin.fileno() if path == "-" else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    buf = Secret(MAX_SECRET_FILE_BYTES + 1)
    try:
        with buf.view() as view:
            filled = 0
            while filled < len(buf):
                n = os.readv(fd, [view[filled:]])
                if n == 0:
                    break
                filled += n
            if filled > MAX_SECRET_FILE_BYTES:
                raise ValueError(
                    f"it has more than {MAX_SECRET_FILE_BYTES} bytes (not a key resource)"
                )
            out = Secret(filled)
            with memoryview(out.data) as dst:
                dst[:] = view[:filled]  # buffer to buffer: no intermediate bytes object
        return out
    finally:
        buf.wipe()
        if path != "-":
            os.close(fd)


def _passphrase(args: argparse.Namespace) -> int:
    from luks.token import TokenError, derive_keys  # noqa: PLC0415

    source = "stdin" if args.secret_file == "-" else args.secret_file  # noqa: S105 - a path
    if args.output is None and os.isatty(sys.stdout.fileno()):
        sys.stderr.write(
            "cva: refusing to write the passphrase (raw bytes) to a terminal; use --output FILE "
            "or a pipe (| cryptsetup open --key-file - ...)\n"
        )
        return 2
    try:
        secret = _read_secret(args.secret_file)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        sys.stderr.write(f"cva: cannot read the secret from {source}: {reason}\n")
        return 2
    try:
        passphrase, mac_key = derive_keys(secret, args.volume)
    except TokenError as exc:
        sys.stderr.write(f"cva: {exc.message}\n")
        return 2
    finally:
        secret.wipe()
    mac_key.wipe()
    with passphrase:
        try:
            _write_private(args.output, passphrase.view())
        except OSError as exc:
            where = args.output if args.output is not None else "stdout"
            sys.stderr.write(f"cva: cannot write the passphrase to {where}: {exc.strerror}\n")
            return 2
    return 0


def _write_private(path: str | None, data: memoryview) -> None:
    """All of `data` to a new 0600 file at `path` (never an existing one or through a symlink),
    or to stdout."""
    if path is None:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    else:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    except OSError:
        if path is not None:
            os.close(fd)
            Path(path).unlink()
        raise
    if path is not None:
        os.fsync(fd)
        os.close(fd)
