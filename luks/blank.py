"""Is a device provably blank? (DESIGN §4)

Blank means all three of:
1. no signature of any kind: `blkid -p` finds nothing, and none of the magics cva knows
   (LUKS, LVM2 label, ext2/3/4, xfs) is present;
2. the whole header region (the first 16 MiB, where a LUKS2 header and its keyslots live) reads
   as zeros;
3. sampled blocks of the data area read as zeros: the first and last MiB after the header region
   plus evenly spread samples in between.

Anything cva ever wrote through dm-crypt is ciphertext and never reads back as a zero block, so
a header wiped over old data is *not* blank. The plan of what to read and the verdict are pure
functions; `probe_blank` is the thin shell that reads the device.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from luks.errors import StorageError
from luks.run import run

HEADER_REGION_BYTES = 16 * 1024 * 1024
MIB = 1024 * 1024
EDGE_SAMPLE_BYTES = MIB
SPREAD_SAMPLE_BYTES = 64 * 1024
SPREAD_SAMPLES = 32
MIN_DEVICE_BYTES = HEADER_REGION_BYTES + 2 * MIB
READ_CHUNK = MIB
SCAN_CHUNK = 4 * MIB  # one O_DIRECT read of the full zero scan
SCAN_ALIGN = 4096  # O_DIRECT: offsets, lengths and the buffer aligned to this
# A constant zero buffer: calloc'd by CPython, so its pages are the kernel's shared zero page
# (no RSS, always in cache). memcmp against it is the zero test.
_ZEROS = bytes(SCAN_CHUNK)

# (offset, magic, what) for the signatures cva checks itself, whatever blkid says
KNOWN_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"LUKS\xba\xbe", "LUKS header"),
    (0x4000, b"SKUL\xba\xbe", "LUKS2 secondary header"),
    (0, b"XFSB", "xfs superblock"),
    (1024 + 56, b"\x53\xef", "ext2/3/4 superblock"),
    (512, b"LABELONE", "LVM2 physical volume label"),
    (0, b"LABELONE", "LVM2 physical volume label"),
    (1024, b"LABELONE", "LVM2 physical volume label"),
    (1536, b"LABELONE", "LVM2 physical volume label"),
)


@dataclass(frozen=True)
class Sample:
    """A byte range of the device to read and require zero."""

    offset: int
    length: int
    what: str


@dataclass(frozen=True)
class BlankEvidence:
    """What was observed on a device; `verdict` turns it into a decision."""

    size_bytes: int
    signatures: tuple[str, ...]  # blkid TYPE values and known magics found
    nonzero_samples: tuple[Sample, ...]  # samples (header region included) that held data


@dataclass(frozen=True)
class BlankVerdict:
    blank: bool
    reason: str  # why not blank ("" when blank)


def sample_plan(size_bytes: int) -> tuple[Sample, ...]:
    """The ranges to read: the whole header region, first/last MiB of data, spread samples."""
    if size_bytes < MIN_DEVICE_BYTES:
        raise StorageError(
            f"device is {size_bytes} bytes, smaller than the {MIN_DEVICE_BYTES} bytes a cva volume "
            "needs; give the volume a bigger disk or LV"
        )
    plan = [
        Sample(0, HEADER_REGION_BYTES, "header region"),
        Sample(HEADER_REGION_BYTES, EDGE_SAMPLE_BYTES, "first MiB of the data area"),
    ]
    last = _align_down(size_bytes - EDGE_SAMPLE_BYTES, 4096)
    plan.append(Sample(last, size_bytes - last, "last MiB of the data area"))
    data_start = HEADER_REGION_BYTES + EDGE_SAMPLE_BYTES
    span = last - data_start
    if span > SPREAD_SAMPLE_BYTES:
        step = span // (SPREAD_SAMPLES + 1)
        for i in range(1, SPREAD_SAMPLES + 1):
            off = _align_down(data_start + i * step, 4096)
            if off + SPREAD_SAMPLE_BYTES <= last and off >= data_start:
                plan.append(Sample(off, SPREAD_SAMPLE_BYTES, f"data sample at {off}"))
    return tuple(_dedupe(plan))


def _dedupe(plan: list[Sample]) -> list[Sample]:
    seen: set[int] = set()
    out = []
    for s in plan:
        if s.offset not in seen:
            seen.add(s.offset)
            out.append(s)
    return out


def _align_down(value: int, unit: int) -> int:
    return value - value % unit


def magics_in(head: bytes) -> tuple[str, ...]:
    """Names of the known signatures present in the first bytes of a device."""
    found = []
    for offset, magic, what in KNOWN_MAGICS:
        if head[offset : offset + len(magic)] == magic and what not in found:
            found.append(what)
    return tuple(found)


def parse_blkid_types(export_text: str) -> tuple[str, ...]:
    """TYPE/PTTYPE values from `blkid -p -o export` output (KEY=VALUE lines)."""
    types = []
    for line in export_text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("TYPE", "PTTYPE", "SEC_TYPE") and value:
            types.append(f"{key.lower()} {value}")
    return tuple(types)


def verdict(evidence: BlankEvidence) -> BlankVerdict:
    """The decision: blank only if no signature and every sample is zeros."""
    reasons = []
    if evidence.signatures:
        reasons.append("signature found: " + ", ".join(evidence.signatures))
    if evidence.nonzero_samples:
        where = ", ".join(s.what for s in evidence.nonzero_samples[:3])
        more = len(evidence.nonzero_samples) - 3
        reasons.append("non-zero data in " + where + (f" and {more} more" if more > 0 else ""))
    if reasons:
        return BlankVerdict(False, "; ".join(reasons))
    return BlankVerdict(True, "")


def is_zero(buf: bytes | bytearray | memoryview) -> bool:
    """Every byte zero: memcmp against the constant zero buffer, a chunk at a time (no copy)."""
    view = memoryview(buf).cast("B")
    return all(
        _ZEROS.startswith(view[at : at + SCAN_CHUNK]) for at in range(0, len(view), SCAN_CHUNK)
    )


def range_is_zero(fd: int, offset: int, length: int) -> bool:
    """Read `length` bytes at `offset` chunk by chunk; False at the first non-zero or short read."""
    done = 0
    while done < length:
        chunk = os.pread(fd, min(READ_CHUNK, length - done), offset + done)
        if not chunk or not is_zero(chunk):
            return False
        done += len(chunk)
    return True


def range_equals(fd: int, offset: int, expected: bytes | bytearray | memoryview) -> bool:
    """Whether the device holds exactly `expected` at `offset`, read and compared chunk by
    chunk (never a second copy of a large area in memory)."""
    want = expected if isinstance(expected, (bytes, bytearray)) else bytes(expected)
    buf = bytearray(min(READ_CHUNK, len(want)))  # one reused buffer
    view = memoryview(buf)
    done = 0
    while done < len(want):
        got = os.preadv(fd, [view[: min(READ_CHUNK, len(want) - done)]], offset + done)
        # startswith at an offset is a memcmp (a memoryview `!=` compares byte by byte)
        if got <= 0 or not want.startswith(view[:got], done):
            return False
        done += got
    return True


def device_size(path: Path) -> int:
    """Size of a block device or a regular file, in bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def read_range(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` (fewer at the end of the file): one read into one buffer
    when the kernel gives it all at once (a memfd, a file), else chunk by chunk."""
    first = os.pread(fd, length, offset)
    if len(first) == length or not first:
        return first
    chunks = [first]
    done = len(first)
    while done < length:
        chunk = os.pread(fd, min(READ_CHUNK, length - done), offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (read_range's counterpart: pwrite until done)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def probe_blank(device: Path, *, timeout: float = 30.0) -> BlankVerdict:
    """Read the device per `sample_plan`, run blkid, and decide."""
    size = device_size(device)
    plan = sample_plan(size)
    nonzero: list[Sample] = []
    signatures: list[str] = []
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        signatures.extend(magics_in(os.pread(fd, 8192, 0)))
        for s in plan:
            if not range_is_zero(fd, s.offset, s.length):
                nonzero.append(s)
    finally:
        os.close(fd)
    signatures.extend(blkid_signatures(device, timeout=timeout))
    return verdict(BlankEvidence(size, tuple(dict.fromkeys(signatures)), tuple(nonzero)))


def blkid_signatures(device: Path, *, timeout: float) -> tuple[str, ...]:
    """Signatures libblkid's low-level probe finds (exit 2 = none)."""
    result = run(["blkid", "-p", "-o", "export", "--", str(device)], timeout=timeout, check=False)
    if result.returncode == 2:
        return ()
    if result.returncode != 0:
        # ambivalent probes (two signatures) exit 8; anything else is a failure to look
        if result.returncode == 8:
            return ("ambivalent signatures (blkid exit 8)",)
        raise StorageError(
            f"blkid could not probe {device} (exit {result.returncode}); check the device"
        )
    return parse_blkid_types(result.text)


def zero_samples_required(plan: Sequence[Sample]) -> int:
    """Total bytes a blank check reads (for logs and the benchmark)."""
    return sum(s.length for s in plan)


# ---- the full zero scan ---------------------------------------------------------------------

SCAN_WORKERS = 4  # reads in flight; each worker reads, then tests, both without the GIL


def _libc_memcmp() -> Callable[[int, bytes, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc (glibc or musl)
    fn = libc.memcmp
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    return cast(Callable[[int, bytes, int], int], fn)


_memcmp = _libc_memcmp()  # a foreign call: the GIL is released while it runs


@dataclass(frozen=True)
class ZeroScan:
    """Result of `scan_zeros`: `first_nonzero` is None when every byte read as zero."""

    offset: int
    length: int
    bytes_scanned: int
    first_nonzero: int | None  # absolute offset of the first non-zero byte

    @property
    def zero(self) -> bool:
        return self.first_nonzero is None and self.bytes_scanned == self.length


# progress(bytes_scanned, length): called at most every `progress_every` s, and at the end
ScanProgress = Callable[[int, int], None]


class _Buffer:
    """One page-aligned read buffer (pre-faulted: one syscall, not a fault per page) and its
    address for memcmp."""

    def __init__(self, size: int) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        self.map = mmap.mmap(-1, size, flags=flags)
        self.view = memoryview(self.map)
        self._cbuf = (ctypes.c_char * size).from_buffer(self.map)
        self.address = ctypes.addressof(self._cbuf)

    def close(self) -> None:
        del self._cbuf
        self.view.release()
        self.map.close()


def _first_nonzero(buf: _Buffer, length: int) -> int:
    """Index of the first non-zero byte of buf[:length] (memcmp per 4 KiB, then bytes)."""
    for block in range(0, length, SCAN_ALIGN):
        n = min(SCAN_ALIGN, length - block)
        if _memcmp(buf.address + block, _ZEROS, n):
            data = bytes(buf.view[block : block + n])
            return block + n - len(data.lstrip(b"\0"))
    raise AssertionError("memcmp said non-zero, no byte is")  # pragma: no cover


@dataclass
class _ScanState:
    """What the workers share (under `cond`): the next chunk to claim, the chunks done, and
    the lowest failing chunk (non-zero data or a read error)."""

    fd: int
    path: Path
    offset: int
    length: int
    chunk: int
    chunks: int
    cond: threading.Condition = field(default_factory=threading.Condition)
    next_chunk: int = 0
    done: set[int] = field(default_factory=set)
    prefix: int = 0  # chunks 0..prefix-1 are all proven zero
    failed: dict[int, int | BaseException] = field(default_factory=dict)  # chunk -> offset/error
    running: int = 0

    def claim(self) -> int | None:
        with self.cond:
            if self.failed or self.next_chunk >= self.chunks:
                return None  # after a failure no later chunk matters
            self.next_chunk += 1
            return self.next_chunk - 1

    def finish(self, chunk: int, failure: int | BaseException | None) -> None:
        with self.cond:
            if failure is None:
                self.done.add(chunk)
                while self.prefix in self.done:
                    self.done.discard(self.prefix)
                    self.prefix += 1
            else:
                self.failed[chunk] = failure
            self.cond.notify_all()

    def exit(self) -> None:
        with self.cond:
            self.running -= 1
            self.cond.notify_all()


def scan_zeros(
    path: Path,
    offset: int,
    length: int,
    *,
    progress: ScanProgress | None = None,
    progress_every: float = 2.0,
    workers: int = SCAN_WORKERS,
    chunk: int = SCAN_CHUNK,
) -> ZeroScan:
    """Prove that `length` bytes of `path` from `offset` all read as zeros (every byte, no
    sampling); stops at the first non-zero byte.

    O_DIRECT (no page cache: it reads what is on the medium, not what a cache remembers, and
    does not evict the guest's cache), `chunk`-sized reads by `workers` threads, each with its
    own pre-faulted page-aligned buffer, so reads stay in flight while other chunks are tested;
    the test is libc's memcmp against a constant zero buffer (a foreign call: it runs without
    the GIL, on every CPU). Chunks are claimed in order, so when a chunk fails every chunk
    before it has been claimed and is finished before the result is known: the result is the
    lowest failure, and `first_nonzero` is the true first non-zero byte. Progress reports the
    proven prefix (what a resume cursor may keep). A file system without O_DIRECT (tmpfs image
    files in tests) falls back to buffered reads. A short read before `offset + length` (the
    device is smaller than asked) or a read error raises OSError: it is never "zero".
    `offset` must be SCAN_ALIGN-aligned; `length` may end anywhere.
    """
    if offset < 0 or length < 0 or offset % SCAN_ALIGN:
        raise ValueError(f"scan range {offset}+{length} must be non-negative and aligned")
    if chunk <= 0 or chunk % SCAN_ALIGN or chunk > SCAN_CHUNK or workers < 1:
        raise ValueError(f"scan chunk {chunk} / workers {workers} out of range")
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fd = os.open(path, flags)
    state = _ScanState(fd, path, offset, length, chunk, -(-length // chunk))
    threads: list[threading.Thread] = []
    try:
        for _ in range(min(workers, max(state.chunks, 1))):
            state.running += 1
            t = threading.Thread(
                target=_scan_worker,
                args=(state,),
                name="cva-zero-scan",
                daemon=True,
            )
            threads.append(t)
            t.start()
        last_report = time.monotonic()
        while True:
            with state.cond:
                if not state.running:
                    break
                state.cond.wait(timeout=max(progress_every, 0.05))
                proven = min(state.prefix * chunk, length)
            now = time.monotonic()
            if progress is not None and now - last_report >= progress_every:
                last_report = now
                progress(proven, length)  # outside the lock: the workers go on meanwhile
    except BaseException:
        with state.cond:
            state.failed.setdefault(-1, RuntimeError("scan abandoned"))  # stop claiming
        raise
    finally:
        for t in threads:
            t.join()
        os.close(fd)
    if state.failed:
        first = min(state.failed)
        failure = state.failed[first]
        if isinstance(failure, BaseException):
            raise failure
        return ZeroScan(offset, length, failure - offset, failure)
    if progress is not None:
        progress(length, length)
    return ZeroScan(offset, length, length, None)


def _scan_worker(state: _ScanState) -> None:
    buf: _Buffer | None = None
    try:
        buf = _Buffer(state.chunk)
        while (index := state.claim()) is not None:
            start = index * state.chunk
            want = min(state.chunk, state.length - start)
            try:
                _read_chunk(state.fd, buf, state.offset + start, want, state.path)
                failure: int | BaseException | None = None
                if _memcmp(buf.address, _ZEROS, want):
                    failure = state.offset + start + _first_nonzero(buf, want)
            except OSError as exc:
                failure = exc
            state.finish(index, failure)
    except Exception as exc:  # noqa: BLE001  (e.g. MemoryError for the buffer: never hang)
        state.finish(-1, exc)
    finally:
        if buf is not None:
            buf.close()
        state.exit()


def _read_chunk(fd: int, buf: _Buffer, at: int, want: int, path: Path) -> None:
    """Fill buf[:want] from `at`; O_DIRECT reads whole blocks and may return fewer."""
    got = 0
    while got < want:
        aligned = -(-(want - got) // SCAN_ALIGN) * SCAN_ALIGN
        n = os.preadv(fd, [buf.view[got : got + aligned]], at + got)
        if n <= 0 or (n < aligned and n % SCAN_ALIGN and got + n < want):
            raise OSError(
                errno.EIO, f"short read at {at + got} of {path} (device smaller than expected)"
            )
        got += n
