"""CoCo initdata: the measured TOML document the host hands the guest (SPEC §b).

Byte-exact with kata and Trustee: the digest is the hash named by `algorithm` over the exact
document bytes (no canonicalisation); the pod annotation is standard base64 of gzip(TOML); the
block device is `initdata` | u64 LE length | gzip | zero padding. Everything here is hostile input
until its digest has been checked against the hardware, so sizes are capped before anything is
read, allocated or decompressed.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import os
import stat
import struct
import tomllib
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from agent.contract import CONTRACT_KEY, Contract, ContractError, parse_contract
from agent.errors import InputError

VERSION = "0.1.0"
ALGORITHMS = ("sha256", "sha384", "sha512")
ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"
TOML_PATH = Path("/run/confidential-containers/initdata/initdata.toml")
DEVICE_GLOBS = ("vd*", "sd*")

MAGIC = b"initdata"
HEADER = struct.Struct("<8sQ")  # magic, gzip length (u64 little-endian)
SECTOR = 512
MAX_COMPRESSED = 256 * 1024  # the gzip stream (block device or annotation)
MAX_DOCUMENT = 1024 * 1024  # the TOML document after decompression
MAX_ANNOTATION = 4 * ((MAX_COMPRESSED + 2) // 3)

# digest -> hardware field (SPEC §b.3); TPM platforms extend PCR8 once from zero
REFERENCE_FIELDS = {
    "tdx": ("MRCONFIGID", 48),
    "snp": ("HOST_DATA", 32),
    "tpm": ("PCR8", 32),
}


class InitDataError(InputError):
    """Malformed, oversized or unsupported initdata."""


@dataclass(frozen=True)
class InitData:
    """A validated initdata document; `raw` is exactly what was measured."""

    raw: bytes = field(repr=False)
    version: str
    algorithm: str
    data: Mapping[str, str]

    def digest(self) -> bytes:
        """The hash named by `algorithm` over exactly `raw` (what MRCONFIGID etc. hold)."""
        return hashlib.new(self.algorithm, self.raw).digest()

    def text(self) -> str:
        """The document as text, byte-identical to `raw` (the KBS `init-data` body)."""
        return self.raw.decode("utf-8")


def parse_initdata(raw: bytes) -> InitData:
    """Validate an initdata TOML document (kata's rules: version 0.1.0, kata's algorithms)."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise InitDataError(f"initdata must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) > MAX_DOCUMENT:
        raise InitDataError(f"initdata is {len(raw)} bytes; the limit is {MAX_DOCUMENT}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InitDataError(
            f"initdata is not UTF-8 (byte {exc.start}); TOML must be UTF-8"
        ) from None
    try:
        doc = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or int() refusing a 5000-digit number
        raise InitDataError(f"initdata is not a TOML document ({_first_line(exc)})") from None
    except RecursionError:
        raise InitDataError("initdata is not a TOML document (nested too deeply)") from None
    for key in doc:
        if key not in ("version", "algorithm", "data"):
            raise InitDataError(
                f"initdata key {key!r} is unknown (allowed: version, algorithm, data)"
            )
    version = doc.get("version")
    if version != VERSION:
        raise InitDataError(f'initdata version must be "{VERSION}", got {_show(version)}')
    algorithm = doc.get("algorithm")
    if algorithm not in ALGORITHMS:
        raise InitDataError(
            f"initdata algorithm must be one of {', '.join(ALGORITHMS)}, got {_show(algorithm)}"
        )
    data = doc.get("data")
    if not isinstance(data, dict):
        raise InitDataError(f"initdata [data] must be a table of strings, got {_show(data)}")
    for key, value in data.items():
        if not isinstance(value, str):
            raise InitDataError(
                f"initdata data.{key!r} must be a string, got {type(value).__name__}"
            )
    return InitData(raw=raw, version=version, algorithm=algorithm, data=MappingProxyType(data))


def load_contract(initdata: InitData) -> Contract:
    """The contract in `data."cva.toml"`; ContractError when it is missing or invalid."""
    text = initdata.data.get(CONTRACT_KEY)
    if text is None:
        raise ContractError(
            f'initdata data."{CONTRACT_KEY}"', "is missing; the initdata carries no cva contract"
        )
    return parse_contract(text)


def _first_line(exc: Exception) -> str:
    text = str(exc).split("\n", 1)[0]
    return text if len(text) <= 120 else text[:117] + "..."


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------
# gzip with caps


def gunzip_capped(blob: bytes, *, what: str, limit: int = MAX_DOCUMENT) -> bytes:
    """Decompress one gzip member, never producing more than `limit` bytes."""
    if len(blob) > MAX_COMPRESSED:
        raise InitDataError(
            f"{what}: gzip stream is {len(blob)} bytes; the limit is {MAX_COMPRESSED}"
        )
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(blob, limit + 1)
    except zlib.error as exc:
        raise InitDataError(f"{what}: not a valid gzip stream ({exc})") from None
    if len(out) > limit:
        raise InitDataError(f"{what}: decompresses to more than {limit} bytes; refused")
    if not inflater.eof:
        raise InitDataError(f"{what}: gzip stream is truncated")
    if inflater.unused_data:
        raise InitDataError(f"{what}: {len(inflater.unused_data)} bytes follow the gzip stream")
    return out


def gzip_document(raw: bytes) -> bytes:
    """gzip(raw), reproducible (mtime 0)."""
    return gzip.compress(raw, compresslevel=9, mtime=0)


# ---------------------------------------------------------------------------------------------
# pod annotation


def encode_annotation(raw: bytes) -> str:
    """The value of the `cc_init_data` annotation: standard base64 of gzip(raw)."""
    return base64.b64encode(gzip_document(raw)).decode("ascii")


def decode_annotation(value: str) -> bytes:
    """The document bytes inside an annotation value (not validated as initdata)."""
    if not isinstance(value, str):
        raise InitDataError(f"annotation must be text, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise InitDataError("annotation is empty (an empty value means: no initdata)")
    if len(value) > MAX_ANNOTATION:
        raise InitDataError(f"annotation is {len(value)} characters; the limit is {MAX_ANNOTATION}")
    try:
        blob = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InitDataError("annotation is not standard base64 (with padding)") from None
    return gunzip_capped(blob, what="annotation")


# ---------------------------------------------------------------------------------------------
# kata block device image


def encode_block_image(raw: bytes) -> bytes:
    """The image kata's runtime attaches: magic | u64 LE length | gzip | zero padding to 512."""
    blob = gzip_document(raw)
    image = HEADER.pack(MAGIC, len(blob)) + blob
    return image + b"\0" * (-len(image) % SECTOR)


def parse_block_image(image: bytes, *, what: str = "initdata image") -> bytes:
    """The document inside an in-memory block image (see `read_initdata_block`)."""
    if len(image) < HEADER.size:
        raise InitDataError(f"{what}: {len(image)} bytes is shorter than the 16-byte header")
    magic, length = HEADER.unpack_from(image)
    if magic != MAGIC:
        raise InitDataError(f"{what}: no 'initdata' magic at offset 0")
    _check_length(length, len(image), what)
    return gunzip_capped(image[HEADER.size : HEADER.size + length], what=what)


def _check_length(length: int, size: int, what: str) -> None:
    if length == 0:
        raise InitDataError(f"{what}: the length field is 0")
    if length > MAX_COMPRESSED:
        raise InitDataError(f"{what}: length field {length} exceeds the limit {MAX_COMPRESSED}")
    if HEADER.size + length > size:
        raise InitDataError(f"{what}: length field {length} runs past the end ({size} bytes)")


def read_initdata_block(path: str | Path) -> bytes:
    """Read the kata initdata block device (or image file) at `path` -> the TOML bytes."""
    what = f"initdata device {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise InitDataError(f"{what}: cannot open ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
            raise InitDataError(f"{what}: not a block device or regular file")
        size = os.lseek(fd, 0, os.SEEK_END)
        header = os.pread(fd, HEADER.size, 0)
        if len(header) < HEADER.size:
            raise InitDataError(f"{what}: {len(header)} bytes is shorter than the 16-byte header")
        magic, length = HEADER.unpack(header)
        if magic != MAGIC:
            raise InitDataError(f"{what}: no 'initdata' magic at offset 0")
        _check_length(length, size, what)
        blob = _pread_exact(fd, length, HEADER.size, what)
    except OSError as exc:
        raise InitDataError(f"{what}: read failed ({exc.strerror})") from None
    finally:
        os.close(fd)
    return gunzip_capped(blob, what=what)


def _pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            raise InitDataError(f"{what}: ended after {got} of {length} gzip bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def has_magic(path: Path) -> bool:
    """True when the first 8 bytes of `path` are the initdata magic (errors -> False)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return os.pread(fd, len(MAGIC), 0) == MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def candidate_devices(dev: Path = Path("/dev")) -> list[Path]:
    """Whole block devices kata's agent would scan (/dev/vd*, /dev/sd*), sorted."""
    found: list[Path] = []
    for pattern in DEVICE_GLOBS:
        for path in sorted(dev.glob(pattern)):
            if path.name[-1].isdigit():  # partitions (vda1, sdb2) are not candidates
                continue
            try:
                if stat.S_ISBLK(path.lstat().st_mode):
                    found.append(path)
            except OSError:
                continue
    return found


def read_toml_file(path: Path) -> bytes:
    """Read an initdata TOML file with the size cap applied before reading it all."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_DOCUMENT + 1)
    except OSError as exc:
        raise InitDataError(f"initdata file {path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_DOCUMENT:
        raise InitDataError(f"initdata file {path}: larger than {MAX_DOCUMENT} bytes")
    return raw


def find_initdata(devices: Iterable[Path] | None = None, toml_path: Path = TOML_PATH) -> bytes:
    """The initdata document bytes: kata-agent's copy at `toml_path` if present, else the one
    block device carrying the `initdata` magic (two such devices are refused as ambiguous)."""
    if toml_path.exists():
        return read_toml_file(toml_path)
    candidates = list(devices) if devices is not None else candidate_devices()
    with_magic = [dev for dev in candidates if has_magic(dev)]
    if len(with_magic) > 1:
        names = ", ".join(str(d) for d in with_magic)
        raise InitDataError(f"initdata found on several devices ({names}); refusing to choose")
    if not with_magic:
        raise InitDataError(
            f"no initdata: neither {toml_path} nor a block device with the 'initdata' magic;"
            f" set the pod annotation {ANNOTATION}"
        )
    return read_initdata_block(with_magic[0])


# ---------------------------------------------------------------------------------------------
# hardware reference values


def reference_value(initdata: InitData, tee: str) -> bytes:
    """What the hardware field holds for this initdata: TDX MRCONFIGID (48 bytes, digest zero-
    padded or truncated), SNP HOST_DATA (32 bytes, likewise), TPM PCR8 = SHA-256(0^32 || digest)."""
    if tee not in REFERENCE_FIELDS:
        raise InitDataError(
            f"no initdata reference value for tee {tee!r} (known: {', '.join(REFERENCE_FIELDS)})"
        )
    name, size = REFERENCE_FIELDS[tee]
    digest = initdata.digest()
    if name == "PCR8":
        if initdata.algorithm != "sha256":
            raise InitDataError(
                f"tee {tee} binds initdata through PCR8 (SHA-256 bank), which needs"
                f' algorithm = "sha256", not {initdata.algorithm!r}'
            )
        return hashlib.sha256(bytes(32) + digest).digest()
    return digest[:size].ljust(size, b"\0")


def reference_field(tee: str) -> str:
    """MRCONFIGID, HOST_DATA or PCR8."""
    if tee not in REFERENCE_FIELDS:
        raise InitDataError(f"no initdata reference field for tee {tee!r}")
    return REFERENCE_FIELDS[tee][0]


# ---------------------------------------------------------------------------------------------
# host-side input in any of the shapes the document travels in

FORMATS = ("auto", "toml", "annotation", "gzip", "image")
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def detect_format(blob: bytes) -> str:
    """image (magic), gzip (1f 8b), annotation (base64 text of a gzip stream: `H4sI...`), or
    toml."""
    if blob.startswith(MAGIC):
        return "image"
    if blob.startswith(b"\x1f\x8b"):
        return "gzip"
    stripped = blob.strip()
    if stripped.startswith(b"H4sI") and set(stripped) <= _B64_ALPHABET:
        return "annotation"
    return "toml"


def unwrap_document(blob: bytes, fmt: str = "auto") -> bytes:
    """The initdata document bytes inside `blob` given as TOML, annotation, gzip or block image."""
    if fmt not in FORMATS:
        raise InitDataError(f"unknown initdata format {fmt!r} (known: {', '.join(FORMATS)})")
    if fmt == "auto":
        fmt = detect_format(blob)
    if fmt == "image":
        return parse_block_image(blob)
    if fmt == "gzip":
        return gunzip_capped(blob, what="gzip initdata")
    if fmt == "annotation":
        try:
            text = blob.decode("ascii")
        except UnicodeDecodeError:
            raise InitDataError("annotation is not standard base64 (with padding)") from None
        return decode_annotation(text)
    if len(blob) > MAX_DOCUMENT:
        raise InitDataError(f"initdata is {len(blob)} bytes; the limit is {MAX_DOCUMENT}")
    return blob
