"""The live device-mapper table after activation, checked against the contract (DESIGN §6.4).

libcryptsetup activated the volume from cva's validated in-memory header copy; this module reads
back what the kernel actually runs (`dmsetup table`, key masked) and compares cipher, key size,
sector size, data offset, the backing device and integrity with what the contract demands. Any
difference means: deactivate and refuse.

Table line formats (kernel dm-crypt / dm-integrity `STATUSTYPE_TABLE`):
  crypt:     start len crypt CIPHER KEY IV_OFFSET DEV OFFSET [N OPT...]
             KEY is `:SIZE:TYPE:DESC` for a kernel-keyring key, hex (or masked) otherwise
  integrity: start len integrity DEV OFFSET TAG_SIZE MODE [N OPT...]
Offsets and lengths are in 512-byte sectors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from luks.errors import StorageError
from luks.run import run

SECTOR = 512
PLAIN_CIPHER = "aes-xts-plain64"
PLAIN_KEY_BYTES = 64
INTEGRITY_CIPHERS = frozenset({"capi:authenc(hmac(sha256),xts(aes))-plain64"})
INTEGRITY_KEY_BYTES = 64 + 32
INTEGRITY_TAG_BYTES = 32
REQUIRED_FLAGS = frozenset({"no_read_workqueue", "no_write_workqueue"})
FORBIDDEN_FLAGS = frozenset({"allow_discards"})


class DmTableError(StorageError):
    """The live table is not what the contract asked for, or could not be read."""


@dataclass(frozen=True)
class TableLine:
    start: int
    length: int
    target: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class CryptTarget:
    length: int
    cipher: str
    key_bytes: int
    key_in_keyring: bool
    iv_offset: int
    device: str  # "major:minor"
    offset: int  # sectors
    options: tuple[str, ...]

    @property
    def sector_size(self) -> int:
        for opt in self.options:
            if opt.startswith("sector_size:"):
                return _int(opt.split(":", 1)[1], "sector_size")
        return SECTOR

    @property
    def integrity(self) -> str | None:
        for opt in self.options:
            if opt.startswith("integrity:"):
                return opt.split(":", 1)[1]
        return None


@dataclass(frozen=True)
class IntegrityTarget:
    length: int
    device: str
    offset: int
    tag_size: int
    mode: str
    options: tuple[str, ...]

    @property
    def block_size(self) -> int:
        for opt in self.options:
            if opt.startswith("block_size:"):
                return _int(opt.split(":", 1)[1], "block_size")
        return SECTOR


@dataclass(frozen=True)
class Expected:
    """What the contract and cva's profile demand of the live mapping."""

    integrity: bool
    device: str  # "major:minor" of the disk or LV holding the volume
    offset_sectors: int  # data segment offset (16 MiB = 32768)
    sector_size: int = 4096


def _int(text: str, what: str) -> int:
    if not text.isdigit() or len(text) > 20:
        raise DmTableError(f"dm table field {what} is not a number: {text[:40]!r}")
    return int(text)


def parse_table(text: str) -> tuple[TableLine, ...]:
    """Split `dmsetup table` output into lines: start length target args."""
    lines = []
    for raw in text.splitlines():
        parts = raw.split()
        if not parts:
            continue
        if len(parts) < 3:
            raise DmTableError(f"dm table line too short: {raw[:80]!r}")
        lines.append(
            TableLine(_int(parts[0], "start"), _int(parts[1], "length"), parts[2], tuple(parts[3:]))
        )
    return tuple(lines)


def _options(args: tuple[str, ...], fixed: int, target: str) -> tuple[str, ...]:
    if len(args) == fixed:
        return ()
    count = _int(args[fixed], f"{target} option count")
    opts = args[fixed + 1 :]
    if len(opts) != count:
        raise DmTableError(f"{target} table announces {count} options but has {len(opts)}")
    return opts


def _key_bytes(key: str) -> tuple[int, bool]:
    if key == "-":
        return 0, False
    if key.startswith(":"):
        fields = key.split(":")
        if len(fields) < 4:
            raise DmTableError("crypt table key reference is malformed")
        return _int(fields[1], "key size"), True
    if len(key) % 2 or any(c not in "0123456789abcdefABCDEF" for c in key):
        raise DmTableError("crypt table key field is neither hex nor a keyring reference")
    return len(key) // 2, False


def parse_crypt(line: TableLine) -> CryptTarget:
    if line.target != "crypt":
        raise DmTableError(f"expected a crypt target, the kernel runs {line.target!r}")
    if len(line.args) < 5:
        raise DmTableError("crypt table line has fewer than 5 arguments")
    cipher, key, iv_offset, device, offset = line.args[:5]
    key_bytes, keyring = _key_bytes(key)
    return CryptTarget(
        length=line.length,
        cipher=cipher,
        key_bytes=key_bytes,
        key_in_keyring=keyring,
        iv_offset=_int(iv_offset, "iv_offset"),
        device=device,
        offset=_int(offset, "offset"),
        options=_options(line.args, 5, "crypt"),
    )


def parse_integrity(line: TableLine) -> IntegrityTarget:
    if line.target != "integrity":
        raise DmTableError(f"expected an integrity target, the kernel runs {line.target!r}")
    if len(line.args) < 4:
        raise DmTableError("integrity table line has fewer than 4 arguments")
    device, offset, tag_size, mode = line.args[:4]
    return IntegrityTarget(
        length=line.length,
        device=device,
        offset=_int(offset, "offset"),
        tag_size=_int(tag_size, "tag_size"),
        mode=mode,
        options=_options(line.args, 4, "integrity"),
    )


def single_line(text: str, what: str) -> TableLine:
    lines = parse_table(text)
    if len(lines) != 1:
        raise DmTableError(f"{what} has {len(lines)} table lines, expected exactly 1")
    if lines[0].start != 0:
        raise DmTableError(f"{what} table does not start at sector 0")
    return lines[0]


def compare(expected: Expected, crypt: CryptTarget, integrity: IntegrityTarget | None) -> list[str]:
    """Every difference between the live mapping and the contract ([] = matches)."""
    diffs = []
    flags = set(crypt.options)
    if crypt.sector_size != expected.sector_size:
        diffs.append(f"sector size {crypt.sector_size}, expected {expected.sector_size}")
    if crypt.iv_offset != 0:
        diffs.append(f"iv offset {crypt.iv_offset}, expected 0")
    missing = REQUIRED_FLAGS - flags
    if missing:
        diffs.append("missing flags " + ",".join(sorted(missing)))
    bad = FORBIDDEN_FLAGS & flags
    if bad:
        diffs.append("unexpected flags " + ",".join(sorted(bad)))
    if not expected.integrity:
        if crypt.cipher != PLAIN_CIPHER:
            diffs.append(f"cipher {crypt.cipher}, expected {PLAIN_CIPHER}")
        if crypt.key_bytes != PLAIN_KEY_BYTES:
            diffs.append(f"key size {crypt.key_bytes * 8} bits, expected {PLAIN_KEY_BYTES * 8}")
        if crypt.integrity is not None:
            diffs.append(f"integrity {crypt.integrity} active, the contract says none")
        if integrity is not None:
            diffs.append("an integrity layer is present, the contract says none")
        if crypt.device != expected.device:
            diffs.append(f"backing device {crypt.device}, expected {expected.device}")
        if crypt.offset != expected.offset_sectors:
            diffs.append(f"data offset {crypt.offset} sectors, expected {expected.offset_sectors}")
        return diffs
    if crypt.cipher not in INTEGRITY_CIPHERS:
        diffs.append(f"cipher {crypt.cipher}, expected one of {sorted(INTEGRITY_CIPHERS)}")
    if crypt.key_bytes != INTEGRITY_KEY_BYTES:
        diffs.append(f"key size {crypt.key_bytes * 8} bits, expected {INTEGRITY_KEY_BYTES * 8}")
    if crypt.integrity != f"{INTEGRITY_TAG_BYTES}:aead":
        diffs.append(f"crypt integrity {crypt.integrity}, expected {INTEGRITY_TAG_BYTES}:aead")
    if crypt.offset != 0:
        diffs.append(f"crypt offset {crypt.offset} on the integrity device, expected 0")
    if integrity is None:
        diffs.append("no integrity layer under the crypt target, the contract asks for one")
        return diffs
    if integrity.device != expected.device:
        diffs.append(f"integrity backing device {integrity.device}, expected {expected.device}")
    if integrity.offset != expected.offset_sectors:
        diffs.append(
            f"integrity data offset {integrity.offset} sectors, expected {expected.offset_sectors}"
        )
    if integrity.tag_size != INTEGRITY_TAG_BYTES:
        diffs.append(f"integrity tag size {integrity.tag_size}, expected {INTEGRITY_TAG_BYTES}")
    if integrity.block_size != expected.sector_size:
        diffs.append(f"integrity block size {integrity.block_size}, expected 4096")
    return diffs


def device_number(path: Path) -> str:
    """`major:minor` of a block device, as dm tables print it."""
    st = path.stat()
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _split_devno(devno: str) -> tuple[str, str]:
    major, sep, minor = devno.partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        raise DmTableError(f"dm table device {devno[:40]!r} is not major:minor")
    return major, minor


def read_live(
    mapper_name: str, *, integrity: bool, timeout: float = 10.0
) -> tuple[CryptTarget, IntegrityTarget | None]:
    """Read the live tables (keys stay masked: no --showkeys)."""
    text = run(["dmsetup", "table", "--", mapper_name], timeout=timeout).text
    crypt = parse_crypt(single_line(text, f"mapping {mapper_name}"))
    if not integrity and crypt.integrity is None:
        return crypt, None
    major, minor = _split_devno(crypt.device)
    below = run(["dmsetup", "table", "-j", major, "-m", minor], timeout=timeout, check=False)
    if below.returncode != 0:
        return crypt, None
    line = single_line(below.text, f"device {crypt.device} below {mapper_name}")
    return crypt, (parse_integrity(line) if line.target == "integrity" else None)


def check_live(mapper_name: str, expected: Expected, *, timeout: float = 10.0) -> None:
    """Raise DmTableError naming every difference between the live mapping and `expected`."""
    crypt, integ = read_live(mapper_name, integrity=expected.integrity, timeout=timeout)
    diffs = compare(expected, crypt, integ)
    if diffs:
        raise DmTableError(
            f"volume mapping {mapper_name} differs from the contract: {'; '.join(diffs)}; "
            "it was deactivated, check the disk's LUKS header"
        )
