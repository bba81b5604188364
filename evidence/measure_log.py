"""cva's own runtime-measurement log when it extends a register itself (no Attestation Agent):
the AA's format and the AA's write-ahead protocol (SPEC.md §e.6), over one register.

The thin shell around `evidence.eventlog` (which stays pure): a log file of TCG2/AAEL entries, a
write-ahead file next to it, and a `Register` (a TPM PCR via `evidence.tpm`, a TDX RTMR via
`evidence.tdx_rtmr` with `alg=ALG_SHA384`, or a test double).

Recording one event (one at a time: a thread lock and an flock on the log):
    1. the register must still equal the replay of the log (else someone else extended it, or
       the log is not this boot's: refuse, nothing is written);
    2. write the WAL `u64 BE offset | expected register value | AAEL text` (file + fsync +
       rename, so it is whole or absent);
    3. extend the register with H(tagged event);
    4. write the entry at `offset`, truncate there + its length, fsync;
    5. delete the WAL.
A crash anywhere is finished by `recover()` at the next start (`eventlog.plan_recovery`): the
register already has the event -> only (re)write the entry; it has the value before -> extend,
then write; anything else -> fatal (keep both files, restart the VM). After that the whole log
must replay to the register's value, or cva refuses to measure (a log of another boot, an
altered log, or another writer on the register).

The register field of each entry is `log_index` (the CC measurement register index,
`pcr_to_ccmr(pcr)` in the AA; for a TPM that is the PCR itself, for TDX RTMRn it is n + 1).
Nothing here ever sees a key: the event text is built from typed fields
(`evidence.volume_event`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from evidence.errors import EvidenceError
from evidence.eventlog import (
    ALG_NAMES,
    ALG_SHA256,
    DIGEST_SIZES,
    MAX_LOG_BYTES,
    AaelEvent,
    EventLogError,
    RecoveryAction,
    WalEntry,
    WalError,
    encode_entry,
    encode_wal,
    event_digest,
    extend,
    parse_log,
    parse_wal,
    plan_recovery,
    register_before,
    replay,
)

WAL_SUFFIX = ".wal_event_entry"


class MeasureLogError(EvidenceError):
    """The log, the WAL and the register disagree, or a file cannot be written."""


class Register(Protocol):
    """One measurement register (a PCR of the SHA-256 bank, an RTMR: its digest size)."""

    def read(self) -> bytes: ...

    def extend(self, digest: bytes) -> None: ...


# Tests set this to raise at a named point ("wal-written", "extended") to simulate a crash.
crash_hook: Callable[[str], None] | None = None


def _point(name: str) -> None:
    if crash_hook is not None:
        crash_hook(name)


def wal_path(log: Path) -> Path:
    """`<dir>/.<log name>.wal_event_entry` (the AA names its own `.wal_event_entry`)."""
    return log.with_name(f".{log.name}{WAL_SUFFIX}")


class DirectLog:
    """A file-backed AAEL log over one register, with the AA's write-ahead protocol."""

    def __init__(
        self,
        path: Path,
        register: Register,
        *,
        log_index: int,
        alg: int = ALG_SHA256,
        initial: bytes | None = None,
    ) -> None:
        if alg not in DIGEST_SIZES:
            raise MeasureLogError(f"digest algorithm {alg:#06x} is unknown")
        self.path = path
        self.wal = wal_path(path)
        self.register = register
        self.log_index = log_index
        self.alg = alg
        self.initial = initial if initial is not None else bytes(DIGEST_SIZES[alg])
        self._lock = threading.Lock()

    # -- files ---------------------------------------------------------------------------------

    def _read_log(self) -> bytes:
        try:
            with self.path.open("rb") as fh:
                data = fh.read(MAX_LOG_BYTES + 1)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise MeasureLogError(
                f"cannot read the event log {self.path} ({exc.strerror})"
            ) from None
        if len(data) > MAX_LOG_BYTES:
            raise MeasureLogError(f"the event log {self.path} is over {MAX_LOG_BYTES} bytes")
        return data

    def _write_entry(self, offset: int, entry: bytes) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            done = 0
            while done < len(entry):
                done += os.pwrite(fd, entry[done:], offset + done)
            os.ftruncate(fd, offset + len(entry))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_wal(self, data: bytes) -> None:
        tmp = self.wal.with_name(self.wal.name + ".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(self.wal)

    def _drop_wal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.wal.unlink()

    def _replayed(self, log: bytes) -> bytes:
        try:
            mine = [ev for ev in parse_log(log) if ev.register == self.log_index]
            if any(ev.alg != self.alg for ev in mine):
                raise MeasureLogError(
                    f"the event log {self.path} extends register {self.log_index} with another"
                    f" algorithm than {ALG_NAMES[self.alg]}"
                )
            return replay(mine, {self.log_index: self.initial}).get(self.log_index, self.initial)
        except EventLogError as exc:
            raise MeasureLogError(f"{self.path}: {exc.message}") from None

    def _check_explained(self, log: bytes) -> bytes:
        current = self.register.read()
        replayed = self._replayed(log)
        if not hmac.compare_digest(current, replayed):
            raise MeasureLogError(
                f"register {self.log_index} is {current.hex()} but the event log {self.path}"
                f" replays to {replayed.hex()}: another writer extended it or the log is not"
                " this boot's; keep both for inspection and restart the VM"
            )
        return current

    # -- the protocol --------------------------------------------------------------------------

    def recover(self) -> RecoveryAction | None:
        """Finish a measurement a crash interrupted, then check the log explains the register.
        Returns what was finished (None: there was no WAL)."""
        with self._lock, _flock(self.path):
            action: RecoveryAction | None = None
            try:
                raw = self.wal.read_bytes()
            except FileNotFoundError:
                raw = None
            except OSError as exc:
                raise MeasureLogError(f"cannot read the WAL {self.wal} ({exc.strerror})") from None
            if raw is not None:
                log = self._read_log()
                try:
                    wal = parse_wal(raw, self.alg)
                    before = register_before(
                        log, wal.offset, self.log_index, self.alg, self.initial
                    )
                    plan = plan_recovery(
                        wal,
                        register=self.log_index,
                        alg=self.alg,
                        current=self.register.read(),
                        before=before,
                    )
                except (WalError, EventLogError) as exc:
                    raise MeasureLogError(f"{self.wal}: {exc.message}") from None
                if plan.action is RecoveryAction.EXTEND_THEN_WRITE:
                    self.register.extend(plan.digest)
                self._write_entry(plan.offset, plan.entry)
                self._drop_wal()
                action = plan.action
            self._check_explained(self._read_log())
            return action

    def record(self, event: AaelEvent) -> bytes:
        """Measure one event (steps 1-5 of the module docstring); returns its digest."""
        with self._lock, _flock(self.path):
            if self.wal.exists():
                raise MeasureLogError(
                    f"an unfinished measurement is pending ({self.wal}); restart cva to recover it"
                )
            log = self._read_log()
            current = self._check_explained(log)
            entry = encode_entry(self.log_index, self.alg, event)
            digest = event_digest(self.alg, event.text)
            expected = extend(self.alg, current, digest)
            if len(log) + len(entry) > MAX_LOG_BYTES:
                raise MeasureLogError(f"the event log {self.path} is full ({MAX_LOG_BYTES} bytes)")
            self._write_wal(encode_wal(WalEntry(len(log), expected, event.text), self.alg))
            _point("wal-written")
            self.register.extend(digest)
            _point("extended")
            self._write_entry(len(log), entry)
            self._drop_wal()
            return digest


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
