"""`cva evidence parse FILE`, `cva evidence collect --report-data HEX [--tee T]` and
`cva evidence events LOG [--register INDEX=HEX ...] [--initial INDEX=HEX ...]`."""

from __future__ import annotations

import argparse
import json
import os
import stat
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


class _SeqStateFile:
    """The verifier's seq state on disk: locked for the whole check (a sibling `.lock`, so two
    verifiers never both read the old value and the later write lowers the other's), read
    without following a symlink, replaced atomically (temp file, fsync, rename, fsync dir)."""

    LOCK_WAIT = 10.0

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __enter__(self) -> _SeqStateFile:
        import fcntl  # noqa: PLC0415
        import time  # noqa: PLC0415

        lock = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise _StateFailure(f"cannot open {lock}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + self.LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise _StateFailure(
                        f"{lock} is held by another verifier for more than"
                        f" {self.LOCK_WAIT:.0f} s; try again"
                    ) from None
                time.sleep(0.1)
        self._lock_fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def read(self) -> bytes | None:
        """The file's bytes, or None when it does not exist yet."""
        from evidence.seqstate import MAX_STATE_BYTES  # noqa: PLC0415

        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _StateFailure(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _StateFailure(f"{self.path} is not a regular file")
            chunks = []
            size = 0
            while size <= MAX_STATE_BYTES:
                chunk = os.read(fd, MAX_STATE_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise _StateFailure(f"cannot read {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def replace(self, data: bytes) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(tmp, flags, 0o644)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                tmp.replace(self.path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise _StateFailure(f"cannot write {self.path}: {exc.strerror or exc}") from None


class _StateFailure(Exception):
    """The seq state cannot be used (exit 2, nothing written)."""


def _events(args: argparse.Namespace) -> int:
    if args.seq_state is None:
        return _events_checked(args, None)
    try:
        with _SeqStateFile(args.seq_state) as state_file:
            return _events_checked(args, state_file)
    except _StateFailure as exc:
        sys.stderr.write(f"cva: seq state: {exc}; nothing was written\n")
        return EXIT_MALFORMED


def _events_checked(args: argparse.Namespace, state_file: _SeqStateFile | None) -> int:
    from evidence.eventlog import (  # noqa: PLC0415
        MAX_LOG_BYTES,
        EventLogError,
        check_registers,
        parse_log,
        replay,
    )
    from evidence.seqstate import (  # noqa: PLC0415
        SeqState,
        SeqStateError,
        check_sequences,
        encode_state,
        parse_state,
    )

    claimed = _register_values(args.register, "--register")
    initial = _register_values(args.initial, "--initial")
    state: SeqState | None = None
    if state_file is not None:
        raw_state = state_file.read()
        try:
            state = SeqState() if raw_state is None else parse_state(raw_state)
        except SeqStateError as exc:
            raise _StateFailure(f"{state_file.path}: {exc.message}") from None
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
    doc: dict[str, object] = {
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
    failures: list[str] = []
    if state_file is not None and state is not None:
        report = check_sequences(state, events)
        failures = report.failures()
        update = check.verified and report.ok
        if update and (raw_state is None or report.new_state != state):
            state_file.replace(encode_state(report.new_state))
        else:
            update = False
        doc["seq"] = {
            "state": str(state_file.path),
            "ok": report.ok,
            "updated": update,
            "volumes": [
                {
                    "uuid": vol.uuid,
                    "names": list(vol.names),
                    "recorded": vol.recorded,
                    "highest": vol.highest,
                    "ok": vol.ok,
                    "events": [
                        {
                            "index": ev.index,
                            "operation": ev.operation,
                            "read_only": ev.read_only,
                            "seq": ev.seq,
                            "before": ev.before,
                            "ok": ev.ok,
                            "note": ev.note,
                        }
                        for ev in vol.events
                    ],
                }
                for vol in report.volumes
            ],
            "skipped": [
                {"index": sk.index, "operation": sk.operation, "reason": sk.reason}
                for sk in report.skipped
            ],
            "problems": list(report.problems),
        }
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    for line in failures:
        sys.stderr.write(f"cva: {line}\n")
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
        if state_file is not None:
            sys.stderr.write("cva: seq state not updated: the log did not verify\n")
        return EXIT_NOT_VERIFIED
    if failures:
        sys.stderr.write("cva: seq state not updated\n")
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
    e.add_argument(
        "--seq-state",
        metavar="FILE",
        help="rollback check: the highest seq seen per volume UUID (JSON; created if absent,"
        " updated only when the log verifies and no volume went back); run once per log",
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
