"""`cva evidence parse FILE`, `cva evidence collect --report-data HEX [--tee T]` and
`cva evidence events LOG [--register INDEX=HEX ...] [--initial INDEX=HEX ...]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.errors import InputError

MAX_FILE = 4 * 1024 * 1024


def _read(path: str, what: str) -> bytes:
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_FILE + 1)
        else:
            with Path(path).open("rb") as f:
                data = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE:
        raise InputError(f"{what} {path} is larger than {MAX_FILE} bytes")
    return data


def _parse(args: argparse.Namespace) -> int:
    from cryptography import x509  # noqa: PLC0415 - handlers import lazily (fast `cva --help`)

    from evidence.errors import EvidenceError  # noqa: PLC0415
    from evidence.inspect import parse_any  # noqa: PLC0415
    from evidence.snp_report import load_certificate  # noqa: PLC0415

    signer = load_certificate(_read(args.vcek, "VCEK"), "--vcek") if args.vcek else None
    chain = None
    if args.chain:
        try:
            chain = x509.load_pem_x509_certificates(_read(args.chain, "chain"))
        except ValueError as exc:
            raise EvidenceError(f"--chain is not a PEM certificate bundle: {exc}") from None
    claims = parse_any(_read(args.file, "evidence file"), signer=signer, chain=chain)
    json.dump(claims, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _collect(args: argparse.Namespace) -> int:
    from evidence.base import Attester  # noqa: PLC0415
    from evidence.detect import attester_for  # noqa: PLC0415
    from evidence.tpm import TpmAttester  # noqa: PLC0415

    text = args.report_data.strip()
    if text.startswith(("0x", "0X")):
        text = text[2:]
    try:
        report_data = bytes.fromhex(text)
    except ValueError:
        raise InputError("--report-data must be hex (at most 64 bytes)") from None
    if len(report_data) > 64:
        raise InputError(f"--report-data is {len(report_data)} bytes; at most 64 are allowed")
    attester: Attester
    if args.tcti:
        if args.tee not in ("tpm", "auto"):
            raise InputError("--tcti only applies to --tee tpm")
        attester = TpmAttester(args.tcti)
    else:
        attester = attester_for(args.tee)
    evidence = attester.evidence(report_data)
    json.dump({"tee": attester.tee, "evidence": evidence}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


EXIT_NOT_VERIFIED = 1
EXIT_MALFORMED = 2


def _register_values(items: list[str] | None, option: str) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for item in items or ():
        index_text, sep, hex_text = item.partition("=")
        if not sep or not index_text.isdigit() or len(index_text) > 10:
            raise InputError(f"{option} {item[:80]!r} must be INDEX=HEX (e.g. 23=00ff...)")
        index = int(index_text)
        if index > 0xFFFFFFFF:
            raise InputError(f"{option}: register index {index} does not fit a u32")
        hex_text = hex_text.removeprefix("0x").removeprefix("0X")
        try:
            value = bytes.fromhex(hex_text)
        except ValueError:
            raise InputError(f"{option} {index}: the value is not hex") from None
        if len(value) not in (32, 48, 64):
            raise InputError(f"{option} {index}: {len(value)} bytes; 32, 48 or 64 expected")
        if index in out:
            raise InputError(f"{option} {index} is given twice")
        out[index] = value
    return out


def _events(args: argparse.Namespace) -> int:
    from evidence.eventlog import (  # noqa: PLC0415
        MAX_LOG_BYTES,
        EventLogError,
        check_registers,
        parse_log,
        replay,
    )

    claimed = _register_values(args.register, "--register")
    initial = _register_values(args.initial, "--initial")
    try:
        with Path(args.log).open("rb") as fh:
            data = fh.read(MAX_LOG_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read event log {args.log}: {exc.strerror or exc}") from None
    try:
        events = parse_log(data)
        replayed = replay(events, initial)
    except EventLogError as exc:
        sys.stderr.write(f"cva: malformed event log {args.log}: {exc.message}\n")
        return EXIT_MALFORMED
    check = check_registers(replayed, claimed, initial)
    doc = {
        "registers": {str(i): v.hex() for i, v in sorted(replayed.items())},
        "events": [
            {
                "register": ev.register,
                "domain": ev.domain,
                "operation": ev.operation,
                "content": ev.content,
                "digest": ev.digest.hex(),
            }
            for ev in events
        ],
        "verified": check.verified,
    }
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if not check.verified:
        why = (
            "no --register value given"
            if not claimed
            else "; ".join(
                part
                for part in (
                    f"mismatch: {', '.join(map(str, check.mismatched))}"
                    if check.mismatched
                    else "",
                    f"not checked: {', '.join(map(str, check.unchecked))}"
                    if check.unchecked
                    else "",
                )
                if part
            )
        )
        sys.stderr.write(f"cva: event log not verified ({why})\n")
        return EXIT_NOT_VERIFIED
    return 0


def _policy(args: argparse.Namespace) -> int:
    from agent.cli.initdata import load_raw  # noqa: PLC0415
    from agent.initdata import parse_initdata  # noqa: PLC0415
    from agent.kbs_policy import VolumePin, parse_resource_path, volume_policy  # noqa: PLC0415

    pin = VolumePin(args.volume, args.uuid, args.header_sha256, args.min_seq)
    resources = [parse_resource_path(text) for text in args.resource]
    initdata = parse_initdata(load_raw(args.initdata, "auto")) if args.initdata else None
    sys.stdout.write(
        volume_policy(pin, resources, initdata, require_affirming=not args.allow_unaffirmed)
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `cva evidence parse|collect|events`."""
    group = sub.add_parser("evidence", help="TEE evidence: parse quotes/reports, collect evidence")
    cmds = group.add_subparsers(dest="evidence_command", metavar="COMMAND")
    cmds.required = True

    p = cmds.add_parser(
        "parse",
        help="print a TDX quote / TDREPORT / SNP report / evidence JSON as Trustee-named claims",
    )
    p.add_argument("file", metavar="FILE", help="the quote, report or evidence JSON ('-' = stdin)")
    p.add_argument("--vcek", metavar="FILE", help="VCEK/VLEK certificate (DER/PEM) for SNP")
    p.add_argument("--chain", metavar="PEM", help="ASK/ASVK + ARK bundle to check the VCEK/VLEK")
    p.set_defaults(func=_parse)

    c = cmds.add_parser("collect", help="collect this TEE's evidence for the given report data")
    c.add_argument("--report-data", required=True, metavar="HEX", help="up to 64 bytes, hex")
    c.add_argument(
        "--tee",
        default="auto",
        choices=("auto", "tdx", "snp", "tpm", "sample"),
        help="which TEE (default: detect; sample only by name)",
    )
    c.add_argument("--tcti", metavar="TCTI", help="TPM TCTI (default device:/dev/tpmrm0)")
    c.set_defaults(func=_collect)

    e = cmds.add_parser(
        "events",
        help="parse an AAEL/TCG2 runtime-measurement log (the AA's or cva's), replay it per"
        " register and check it against register values (exit 0 verified, 1 not, 2 malformed)",
    )
    e.add_argument("log", metavar="LOG", help="the event log file")
    e.add_argument(
        "--register",
        action="append",
        metavar="INDEX=HEX",
        help="a register value from a verified quote/report (repeat per register); every"
        " register the log extends must be given",
    )
    e.add_argument(
        "--initial",
        action="append",
        metavar="INDEX=HEX",
        help="a register's value before the log (default zeros; TPM PCR 17-22: ff..ff)",
    )
    e.set_defaults(func=_events)

    pol = cmds.add_parser(
        "policy",
        help="print a Trustee KBS resource policy (Rego) releasing resources only to a TDX VM"
        " whose replayed event log shows cva opened this volume (and has not closed it)",
    )
    pol.add_argument("--volume", required=True, metavar="NAME", help="the volume's name")
    pol.add_argument(
        "--uuid", required=True, metavar="UUID", help="its LUKS UUID (from cva's event)"
    )
    pol.add_argument(
        "--header-sha256", required=True, metavar="HEX", help="its header digest (from cva's event)"
    )
    pol.add_argument(
        "--resource",
        required=True,
        action="append",
        metavar="REPO/TYPE/TAG",
        help="a resource to release (repeatable; kbs:///REPO/TYPE/TAG also accepted)",
    )
    pol.add_argument("--min-seq", type=int, metavar="N", help="require the event's seq >= N")
    pol.add_argument(
        "--initdata", metavar="FILE", help="also require this initdata's MRCONFIGID (TDX)"
    )
    pol.add_argument(
        "--allow-unaffirmed",
        action="store_true",
        help='do not require ear.status == "affirming" (the AS\'s appraisal of the image)',
    )
    pol.set_defaults(func=_policy)
