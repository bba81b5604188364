"""TDX runtime measurement registers (RTMR0-3) through the kernel's TSM measurement sysfs.

The ABI (Linux >= 6.16, drivers/virt/coco/tsm-mr.c + tdx-guest.c,
Documentation/ABI/testing/sysfs-devices-virtual-misc-tdx_guest):
`/sys/devices/virtual/misc/tdx_guest/measurements/rtmr<N>:sha384`, a binary attribute of 48
bytes. A read returns the register's raw 48-byte value (refreshed from a TDREPORT after an
extend); a write of exactly 48 bytes at offset 0 is one TDG.MR.RTMR.EXTEND:
RTMR := SHA-384(RTMR || data). Any other size or offset is EINVAL. Older kernels have no such
directory (nor does mainline configfs-tsm have an `rtmrs` interface: that RFC was never merged,
the sysfs above replaced it), so then the register is unavailable.

`pcr_to_ccmr` is the Attestation Agent's TDX mapping (guest-components, attester/src/tdx): a
PCR index to the CC measurement-register index of the UEFI CC spec (0 = MRTD, 1..4 = RTMR0..3),
the index the AA writes into its event-log entries. The file system calls go through `MrFs` so
tests run the same code against a fake of the ABI (tests/fake_kernel.py).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Protocol

from evidence.errors import AttesterUnavailable, EvidenceError

MEASUREMENTS = Path("sys/devices/virtual/misc/tdx_guest/measurements")
RTMR_SIZE = 48
RTMR_COUNT = 4
KERNEL_NEXT_STEP = "boot a guest kernel >= 6.16 with the tdx_guest driver, or use the AA sink"


class MrFs(Protocol):
    """The two operations on a measurement attribute (the real one is plain os calls)."""

    def read(self, path: Path, limit: int) -> bytes: ...
    def write(self, path: Path, data: bytes) -> None: ...


class RealMrFs:
    def read(self, path: Path, limit: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            out = b""
            while True:
                chunk = os.read(fd, limit + 1 - len(out))
                if not chunk or len(out) + len(chunk) > limit:
                    return out + chunk
                out += chunk
        finally:
            os.close(fd)

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            done = os.write(fd, data)  # one write at offset 0: a partial one would be EINVAL
        finally:
            os.close(fd)
        if done != len(data):
            raise OSError(errno.EIO, f"short write ({done} of {len(data)} bytes)")


def pcr_to_ccmr(pcr: int) -> int:
    """The AA's TDX mapping of a PCR index to a CC MR index (RTMR n = CC MR n + 1)."""
    if pcr in (1, 7):
        return 1
    if 2 <= pcr <= 6:
        return 2
    if 8 <= pcr <= 15:
        return 3
    return 4


def rtmr_path(index: int, root: Path = Path("/")) -> Path:
    return root / MEASUREMENTS / f"rtmr{index}:sha384"


def _errno(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


class TdxRtmr:
    """One RTMR as an `evidence.measure_log.Register` (48-byte values, SHA-384 extends)."""

    def __init__(self, index: int, *, root: Path = Path("/"), fs: MrFs | None = None) -> None:
        if not 0 <= index < RTMR_COUNT:
            raise EvidenceError(f"RTMR index {index} does not exist (TDX has RTMR0..3)")
        self.index = index
        self.path = rtmr_path(index, root)
        self._fs: MrFs = fs or RealMrFs()

    def available(self) -> bool:
        """The kernel exposes this RTMR (Linux >= 6.16 in a TDX guest)."""
        return self.path.is_file()

    def _failed(self, action: str, exc: OSError) -> AttesterUnavailable:
        if isinstance(exc, FileNotFoundError):
            return AttesterUnavailable(
                f"cannot {action} RTMR{self.index}: {self.path} is missing (the kernel has no"
                f" TDX measurement sysfs); {KERNEL_NEXT_STEP}"
            )
        return AttesterUnavailable(
            f"cannot {action} RTMR{self.index} through {self.path}: {_errno(exc)}"
        )

    def read(self) -> bytes:
        try:
            value = self._fs.read(self.path, RTMR_SIZE)
        except OSError as exc:
            raise self._failed("read", exc) from None
        if len(value) != RTMR_SIZE:
            raise AttesterUnavailable(
                f"{self.path} holds {len(value)}{'+' if len(value) > RTMR_SIZE else ''} bytes,"
                f" an RTMR has {RTMR_SIZE}; it is not the kernel's TDX measurement attribute"
            )
        return value

    def extend(self, digest: bytes) -> None:
        """RTMR := SHA-384(RTMR || digest); `digest` must be exactly 48 bytes (no padding)."""
        if len(digest) != RTMR_SIZE:
            raise EvidenceError(
                f"an RTMR{self.index} extend needs a {RTMR_SIZE}-byte (SHA-384) digest,"
                f" got {len(digest)} bytes"
            )
        try:
            self._fs.write(self.path, bytes(digest))
        except OSError as exc:
            raise self._failed("extend", exc) from None
