"""configfs-tsm reports (`/sys/kernel/config/tsm/report`, SPEC §d.1), provider-generic.

One request: make a uniquely named report directory, check the provider, (SNP) write
`privlevel`, write exactly 64 bytes of `inblob` (committed on close), check `generation` equals
the number of writes made (another writer in the same directory would show up here), read
`outblob` (and `auxblob`) to EOF, check `generation` did not move, and always remove the
directory. A race or EBUSY is retried a bounded number of times; every other kernel error is a
clean AttesterUnavailable naming the errno. The filesystem calls go through `ConfigFs` so tests
can run the same code against a fake of the kernel ABI rooted in a temp dir.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from evidence.errors import AttesterUnavailable, EvidenceError

REPORT_DIR = Path("sys/kernel/config/tsm/report")
INBLOB_SIZE = 64
MAX_BLOB = 16 * 1024 * 1024
MAX_TEXT = 64


class ConfigFs(Protocol):
    """The four operations the report flow needs (the real one is plain os calls)."""

    def mkdir(self, path: Path) -> None: ...
    def rmdir(self, path: Path) -> None: ...
    def read(self, path: Path, limit: int) -> bytes: ...
    def write(self, path: Path, data: bytes) -> None: ...


class RealConfigFs:
    def mkdir(self, path: Path) -> None:
        path.mkdir(mode=0o700)

    def rmdir(self, path: Path) -> None:
        path.rmdir()

    def read(self, path: Path, limit: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks: list[bytes] = []
            total = 0
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return b"".join(chunks)
                total += len(chunk)
                if total > limit:
                    raise OSError(errno.EFBIG, f"more than {limit} bytes")
                chunks.append(chunk)
        finally:
            os.close(fd)

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)  # configfs commits a binary attribute here


@dataclass(frozen=True)
class TsmReport:
    provider: str
    outblob: bytes
    auxblob: bytes | None
    generation: int


class TsmRace(Exception):
    """Another writer touched the report directory; the caller retries."""


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


class TsmClient:
    """Reports from configfs-tsm under `root` (default the real one)."""

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        fs: ConfigFs | None = None,
        attempts: int = 3,
        busy_wait: float = 1.0,
        deadline: float = 120.0,
    ) -> None:
        self.base = root / REPORT_DIR
        self.fs: ConfigFs = fs if fs is not None else RealConfigFs()
        self.attempts = attempts
        self.busy_wait = busy_wait
        self.deadline = deadline

    def available(self) -> bool:
        return self.base.is_dir()

    def _text(self, path: Path) -> str:
        return self.fs.read(path, MAX_TEXT).decode("ascii", errors="replace").strip()

    def _generation(self, path: Path) -> int:
        text = self._text(path / "generation")
        if not text.isdigit():
            raise AttesterUnavailable(f"configfs-tsm generation {text[:20]!r} is not a number")
        return int(text)

    def provider(self) -> str | None:
        """The registered provider (`tdx_guest`, `sev_guest`, ...), or None if there is none."""
        if not self.available():
            return None
        entry = self._new_entry()
        try:
            return self._text(entry / "provider") or None
        except OSError:
            return None  # ENXIO: no provider registered
        finally:
            self._remove(entry)

    def _new_entry(self) -> Path:
        for _ in range(8):
            entry = self.base / f"cva-{secrets.token_hex(8)}"
            try:
                self.fs.mkdir(entry)
            except FileExistsError:
                continue
            except OSError as exc:
                raise AttesterUnavailable(
                    f"cannot create a configfs-tsm report at {self.base}: {_errname(exc)}"
                ) from None
            return entry
        raise AttesterUnavailable(f"cannot find a free report name under {self.base}")

    def _remove(self, entry: Path) -> None:
        try:
            self.fs.rmdir(entry)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise AttesterUnavailable(
                f"cannot remove configfs-tsm report {entry.name}: {_errname(exc)}"
            ) from None

    def report(
        self,
        inblob: bytes,
        *,
        provider: str,
        privlevel: int | None = None,
        auxblob: bool = False,
    ) -> TsmReport:
        """One report for exactly 64 bytes of inblob from `provider`; bounded retries."""
        if len(inblob) != INBLOB_SIZE:
            raise EvidenceError(
                f"configfs-tsm inblob must be exactly {INBLOB_SIZE} bytes, got {len(inblob)}"
            )
        if not self.available():
            raise AttesterUnavailable(f"configfs-tsm is not available ({self.base} missing)")
        stop = time.monotonic() + self.deadline
        last = "no attempt"
        for _ in range(max(1, self.attempts)):
            if time.monotonic() > stop:
                break
            entry = self._new_entry()
            try:
                return self._attempt(entry, bytes(inblob), provider, privlevel, auxblob)
            except TsmRace as exc:
                last = str(exc)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise AttesterUnavailable(
                        f"configfs-tsm {provider} report failed: {_errname(exc)}"
                        f" ({exc.strerror or exc})"
                    ) from None
                last = "the TEE is busy (EBUSY)"
                time.sleep(self.busy_wait)
            finally:
                self._remove(entry)
        raise AttesterUnavailable(
            f"configfs-tsm report failed after {self.attempts} attempts: {last}"
        )

    def _attempt(
        self, entry: Path, inblob: bytes, provider: str, privlevel: int | None, aux: bool
    ) -> TsmReport:
        try:
            actual = self._text(entry / "provider")
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENODEV, errno.ENOENT):
                raise AttesterUnavailable(
                    f"configfs-tsm has no provider registered (expected {provider})"
                ) from None
            raise
        if actual != provider:
            raise AttesterUnavailable(f"configfs-tsm provider is {actual!r}, expected {provider!r}")
        writes = 0
        if privlevel is not None:
            self.fs.write(entry / "privlevel", f"{privlevel}\n".encode())
            writes += 1
        self.fs.write(entry / "inblob", inblob)
        writes += 1
        before = self._generation(entry)
        if before != writes:
            raise TsmRace(f"inblob write conflict (generation {before}, expected {writes})")
        outblob = self.fs.read(entry / "outblob", MAX_BLOB)
        aux_data: bytes | None = None
        if aux:
            try:
                aux_data = self.fs.read(entry / "auxblob", MAX_BLOB) or None
            except FileNotFoundError:
                aux_data = None
        after = self._generation(entry)
        if after != before:
            raise TsmRace(f"report changed while reading (generation {before} -> {after})")
        if not outblob:
            raise AttesterUnavailable(f"configfs-tsm {provider} returned an empty report")
        return TsmReport(actual, outblob, aux_data, after)


def probe_provider(root: Path = Path("/"), *, fs: ConfigFs | None = None) -> str | None:
    """The configfs-tsm provider under `root`, or None (no configfs-tsm or no provider)."""
    try:
        return TsmClient(root, fs=fs).provider()
    except AttesterUnavailable:
        return None
