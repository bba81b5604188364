"""A pure parser of LUKS2 headers and cva's allow-list (DESIGN §5, §6).

The host hands us the disk, so the header is hostile input. `parse_luks2` reads both binary
headers (magic, version, sizes, seqid, checksum over header + JSON area) and the JSON metadata
of an in-memory copy of the header area; `allow_list_reasons` then lists EVERY reason the
header is not exactly cva's profile. Nothing here touches a device except `read_header_area`,
and nothing here calls libcryptsetup: only a copy that passed these checks is handed to it.

Binary header layout (4096 bytes, integers big-endian), per the LUKS2 on-disk format:
  0 magic[6] | 6 version u16 | 8 hdr_size u64 | 16 seqid u64 | 24 label[48]
  72 checksum_alg[32] | 104 salt[64] | 168 uuid[40] | 208 subsystem[48] | 256 hdr_offset u64
  264 padding[184] | 448 csum[64] | 512 padding[3584]
The JSON area follows (hdr_size - 4096 bytes, NUL-terminated, zero padded). The secondary
copy starts at offset hdr_size with magic "SKUL\\xba\\xbe". The checksum is sha256 over the
hdr_size bytes of a copy with the csum field zeroed.

Reasons are "<rule>: <what is wrong>", the rule being a stable name tests and users can grep:
  header-copies    the secondary copy is broken, or differs (seqid, uuid, JSON, ...)
  metadata-size, config, header-area, uuid, label, json-padding   binary/config profile
  json-fields      an unknown or missing field anywhere (top level, keyslot, segment, ...)
  keyslot-count/-type/-key-size/-cipher/-af/-kdf/-area   exactly one keyslot, '0' (or '1' after
                   a key rotation; both only while the cva token's state is "rotating",
                   luks.rotation, their areas disjoint), luks2, pbkdf2
                   sha256 1000..10000 iterations, AF luks1/sha256/4000, raw aes-xts-plain64
                   64-byte area inside the keyslots region (not the JSON, not the data)
  segment-count/-type/-cipher/-offset/-size/-iv-tweak, sector-size, segment-integrity
  digest-count/-binding/-kdf   exactly digest 0 binding the keyslot(s) to segment 0
  token-count/-type/-fields    at most token 0, of type cva, with exactly cva's fields
  requirements, config-flags   none; only no-read/no-write-workqueue
Any JSON parser differential with libcryptsetup's json-c (duplicate keys, NUL inside strings,
numbers as strings, trailing data) ends in a refusal here: every value must equal cva's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from luks.errors import StorageInputError

HEADER_AREA_BYTES: Final = 16 * 1024 * 1024  # data segment offset; the area copied into memory
BINARY_HEADER_BYTES: Final = 4096
MAGIC_PRIMARY: Final = b"LUKS\xba\xbe"
MAGIC_SECONDARY: Final = b"SKUL\xba\xbe"
VALID_HDR_SIZES: Final = frozenset(1024 * k for k in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
MAX_JSON_DEPTH: Final = 12

# cva's profile (DESIGN §5)
PROFILE_HDR_SIZE: Final = 16 * 1024
PROFILE_KEYSLOTS_SIZE: Final = 16352 * 1024
PROFILE_SEGMENT_OFFSET: Final = HEADER_AREA_BYTES
PROFILE_CIPHER: Final = "aes-xts-plain64"
PROFILE_KEY_BYTES: Final = 64
PROFILE_INTEGRITY: Final = "hmac(sha256)"
PROFILE_INTEGRITY_KEY_BYTES: Final = 32
PROFILE_SECTOR_SIZE: Final = 4096
PROFILE_AF_STRIPES: Final = 4000
PBKDF2_MIN_ITERATIONS: Final = 1000
PBKDF2_MAX_ITERATIONS: Final = 10_000  # cva writes 1000; anything above is a cost attack
ALLOWED_CONFIG_FLAGS: Final = frozenset({"no-read-workqueue", "no-write-workqueue"})
TOKEN_TYPE: Final = "cva"  # noqa: S105 - a token type name, not a password
TOKEN_STATES: Final = ("initializing", "ready", "rotating")
TOKEN_STATE_ROTATING: Final = "rotating"  # noqa: S105 - a state name; two keyslots (luks.rotation)
TOKEN_FIELDS: Final = frozenset({"type", "keyslots", "state", "volume", "mac"})
TOKEN_OPTIONAL_FIELDS: Final = frozenset({"seq"})  # absent in tokens made before it existed
TOKEN_SEQ_MAX: Final = (1 << 64) - 1
VOLUME_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")
_UUID_RE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_U64_RE: Final = re.compile(r"0|[1-9][0-9]{0,19}")
_NULL_CIPHERS: Final = frozenset({"cipher_null", "null"})  # "null" is an alias (DESIGN §7)


class HeaderError(StorageInputError):
    """The bytes are not a readable LUKS2 header (names the broken part)."""


Json = object  # a value from json.loads: dict | list | str | int | float | bool | None


@dataclass(frozen=True)
class BinaryHeader:
    """One of the two binary headers, with its checksum verified."""

    magic: bytes
    version: int
    hdr_size: int
    seqid: int
    label: str
    checksum_alg: str
    salt: bytes
    uuid: str
    subsystem: str
    hdr_offset: int
    json_area: bytes  # the hdr_size - 4096 bytes after the binary header


@dataclass(frozen=True)
class LuksHeader:
    """A parsed LUKS2 header area. `metadata` is the primary copy's JSON object."""

    primary: BinaryHeader
    secondary: BinaryHeader | None
    secondary_error: str | None  # why the secondary copy is unusable, if it is
    metadata: Mapping[str, Json]
    json_text: str
    json_padding_clean: bool  # everything after the JSON's NUL terminator is zero
    area_bytes: int  # length of the area the header was parsed from

    @property
    def uuid(self) -> str:
        return self.primary.uuid

    @property
    def seqid(self) -> int:
        return self.primary.seqid

    def section(self, name: str) -> Mapping[str, Json]:
        """A top-level object ("keyslots", "segments", ...), {} if absent or not an object."""
        value = self.metadata.get(name)
        return value if isinstance(value, dict) else {}

    def cva_tokens(self) -> list[tuple[str, Mapping[str, Json]]]:
        """(token id, token object) for every token of type `cva`."""
        return [
            (tid, tok)
            for tid, tok in self.section("tokens").items()
            if isinstance(tok, dict) and tok.get("type") == TOKEN_TYPE
        ]


# --- parsing ------------------------------------------------------------------------------


def _cstr(raw: bytes, field: str, where: str) -> str:
    text = raw.split(b"\x00", 1)[0]
    try:
        value = text.decode("ascii")
    except UnicodeDecodeError:
        raise HeaderError(f"{where}: {field} is not ASCII") from None
    if not value.isprintable():
        raise HeaderError(f"{where}: {field} has control characters")
    return value


def _parse_binary(area: bytes, offset: int, magic: bytes, where: str) -> BinaryHeader:
    if len(area) < offset + BINARY_HEADER_BYTES:
        raise HeaderError(f"{where}: truncated (the area ends at {len(area)} bytes)")
    hdr = area[offset : offset + BINARY_HEADER_BYTES]
    if hdr[0:6] != magic:
        raise HeaderError(f"{where}: bad magic {hdr[0:6].hex()} (not a LUKS2 header)")
    version = int.from_bytes(hdr[6:8], "big")
    if version != 2:
        raise HeaderError(f"{where}: version {version}, only LUKS2 is supported")
    hdr_size = int.from_bytes(hdr[8:16], "big")
    if hdr_size not in VALID_HDR_SIZES:
        raise HeaderError(f"{where}: hdr_size {hdr_size} is not a valid LUKS2 metadata size")
    hdr_offset = int.from_bytes(hdr[256:264], "big")
    if hdr_offset != offset:
        raise HeaderError(f"{where}: hdr_offset {hdr_offset} but the copy sits at {offset}")
    checksum_alg = _cstr(hdr[72:104], "checksum_alg", where)
    if checksum_alg != "sha256":
        raise HeaderError(f"{where}: checksum algorithm {checksum_alg!r}, only sha256 accepted")
    if len(area) < offset + hdr_size:
        raise HeaderError(f"{where}: JSON area truncated (needs {offset + hdr_size} bytes)")
    copy = bytearray(area[offset : offset + hdr_size])
    stored = bytes(copy[448:512])
    copy[448:512] = bytes(64)
    computed = hashlib.sha256(copy).digest()
    if not hmac.compare_digest(stored[:32], computed) or any(stored[32:]):
        raise HeaderError(f"{where}: checksum mismatch (header or JSON area modified)")
    return BinaryHeader(
        magic=magic,
        version=version,
        hdr_size=hdr_size,
        seqid=int.from_bytes(hdr[16:24], "big"),
        label=_cstr(hdr[24:72], "label", where),
        checksum_alg=checksum_alg,
        salt=bytes(hdr[104:168]),
        uuid=_cstr(hdr[168:208], "uuid", where),
        subsystem=_cstr(hdr[208:256], "subsystem", where),
        hdr_offset=hdr_offset,
        json_area=bytes(copy[BINARY_HEADER_BYTES:]),
    )


def _json_depth_ok(text: str) -> bool:
    """Bracket depth <= MAX_JSON_DEPTH (counting outside strings), checked before json.loads."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _no_duplicates(pairs: list[tuple[str, Json]]) -> dict[str, Json]:
    out: dict[str, Json] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Json:
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_json(json_area: bytes, where: str) -> tuple[dict[str, Json], str, bool]:
    raw, sep, rest = json_area.partition(b"\x00")
    if not sep:
        raise HeaderError(f"{where}: JSON area is not NUL-terminated")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError(f"{where}: JSON is not UTF-8") from None
    if not _json_depth_ok(text):
        raise HeaderError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise HeaderError(f"{where}: JSON nested too deeply") from None
    except ValueError as exc:
        raise HeaderError(f"{where}: invalid JSON ({str(exc)[:120]})") from None
    if not isinstance(value, dict):
        raise HeaderError(f"{where}: JSON metadata is not an object")
    return value, text, not any(rest)


def parse_luks2(area: bytes | bytearray | memoryview) -> LuksHeader:
    """Parse both header copies of a LUKS2 header area; HeaderError if the primary is unusable.

    A broken or missing secondary copy does not raise: it is recorded (`secondary_error`) and
    refused by `allow_list_reasons`, so the verdict can list every reason.
    """
    data = bytes(area[:HEADER_AREA_BYTES])
    primary = _parse_binary(data, 0, MAGIC_PRIMARY, "primary header")
    metadata, text, clean = _parse_json(primary.json_area, "primary header")
    secondary: BinaryHeader | None = None
    secondary_error: str | None = None
    try:
        secondary = _parse_binary(data, primary.hdr_size, MAGIC_SECONDARY, "secondary header")
        _parse_json(secondary.json_area, "secondary header")
    except HeaderError as exc:
        secondary, secondary_error = None, exc.message
    return LuksHeader(
        primary=primary,
        secondary=secondary,
        secondary_error=secondary_error,
        metadata=metadata,
        json_text=text,
        json_padding_clean=clean,
        area_bytes=len(data),
    )


def read_header_area(device: str) -> bytes:
    """A copy of the first HEADER_AREA_BYTES of `device` (less if the device is smaller)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageInputError(f"{device}: cannot open ({exc.strerror}); check the path") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
            raise StorageInputError(f"{device}: not a block device or image file")
        chunks: list[bytes] = []
        got = 0
        while got < HEADER_AREA_BYTES:
            chunk = os.pread(fd, HEADER_AREA_BYTES - got, got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise StorageInputError(f"{device}: read failed ({exc.strerror})") from None
    finally:
        os.close(fd)


# --- the allow-list -----------------------------------------------------------------------


def _desc(value: Json) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _u64(value: Json) -> int | None:
    """A LUKS2 uint64 (a decimal string), or None if it is not one."""
    if isinstance(value, str) and _U64_RE.fullmatch(value):
        number = int(value)
        return number if number < 2**64 else None
    return None


def _int(value: Json) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _b64_len(value: Json) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        return len(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        return None


class _Reasons:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, rule: str, text: str) -> None:
        self.items.append(f"{rule}: {text}")

    def fields(self, rule: str, where: str, obj: Mapping[str, Json], allowed: set[str]) -> None:
        unknown = sorted(set(obj) - allowed)
        if unknown:
            self.add(rule, f"{where} has unknown fields {', '.join(map(repr, unknown))}")
        missing = sorted(allowed - set(obj))
        if missing:
            self.add(rule, f"{where} lacks {', '.join(map(repr, missing))}")

    def equal(self, rule: str, where: str, value: Json, expected: Json) -> None:
        if value != expected or type(value) is not type(expected):
            self.add(rule, f"{where} is {_desc(value)}, cva requires {_desc(expected)}")


def _cipher_reason(rule: str, where: str, value: Json, r: _Reasons) -> None:
    if value == PROFILE_CIPHER:
        return
    if isinstance(value, str) and value.lower().split("-")[0] in _NULL_CIPHERS:
        r.add(rule, f"{where} is {_desc(value)}: a null cipher stores keys or data in clear")
    else:
        r.add(rule, f"{where} is {_desc(value)}, cva requires {PROFILE_CIPHER!r}")


def _obj(r: _Reasons, rule: str, where: str, value: Json) -> Mapping[str, Json] | None:
    if isinstance(value, dict):
        return value
    r.add(rule, f"{where} is {_desc(value)}, not an object")
    return None


def _check_copies(hdr: LuksHeader, r: _Reasons) -> None:
    if hdr.secondary is None:
        r.add("header-copies", f"the secondary copy is unusable ({hdr.secondary_error})")
        return
    p, s = hdr.primary, hdr.secondary
    for field in ("hdr_size", "seqid", "uuid", "label", "subsystem", "checksum_alg"):
        if getattr(p, field) != getattr(s, field):
            r.add("header-copies", f"the two copies disagree on {field}")
    if p.json_area != s.json_area:
        r.add("header-copies", "the two copies hold different JSON metadata")


def _check_binary(hdr: LuksHeader, r: _Reasons) -> None:
    p = hdr.primary
    if p.hdr_size != PROFILE_HDR_SIZE:
        r.add("metadata-size", f"hdr_size {p.hdr_size}, cva formats {PROFILE_HDR_SIZE}")
    if not _UUID_RE.fullmatch(p.uuid):
        r.add("uuid", f"{p.uuid!r} is not a lower-case UUID")
    if p.label:
        r.add("label", f"label {p.label!r} set; cva writes none")
    if p.subsystem:
        r.add("label", f"subsystem {p.subsystem!r} set; cva writes none")
    if not hdr.json_padding_clean:
        r.add("json-padding", "bytes after the JSON terminator are not zero")
    if hdr.area_bytes < HEADER_AREA_BYTES:
        r.add(
            "header-area",
            f"only {hdr.area_bytes} bytes; the header area is {HEADER_AREA_BYTES} bytes",
        )


def _check_config(hdr: LuksHeader, r: _Reasons) -> None:
    config = _obj(r, "config", "config", hdr.metadata.get("config"))
    if config is None:
        return
    unknown = sorted(set(config) - {"json_size", "keyslots_size", "flags", "requirements"})
    if unknown:
        r.add("json-fields", f"config has unknown fields {', '.join(map(repr, unknown))}")
    r.equal("config", "config.json_size", config.get("json_size"), str(PROFILE_HDR_SIZE - 4096))
    r.equal(
        "config", "config.keyslots_size", config.get("keyslots_size"), str(PROFILE_KEYSLOTS_SIZE)
    )
    if "requirements" in config:
        r.add(
            "requirements",
            f"config.requirements {_desc(config['requirements'])} present (e.g. an unfinished "
            "reencryption); cva opens no header with requirements",
        )
    if "flags" in config:
        flags = config["flags"]
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            r.add("config-flags", f"config.flags {_desc(flags)} is not a list of names")
        else:
            bad = sorted(set(flags) - ALLOWED_CONFIG_FLAGS)
            if bad:
                r.add("config-flags", f"config.flags {', '.join(map(repr, bad))} not allowed")


def _check_kdf(where: str, kdf: Mapping[str, Json], r: _Reasons, rule: str) -> None:
    kdf_type = kdf.get("type")
    if kdf_type != "pbkdf2":
        costs = ", ".join(
            f"{k}={_desc(kdf[k])}" for k in ("time", "memory", "cpus", "iterations") if k in kdf
        )
        r.add(
            rule,
            f"{where} type {_desc(kdf_type)}{' (' + costs + ')' if costs else ''}; "
            "cva accepts only pbkdf2",
        )
        return
    iterations = _int(kdf.get("iterations"))
    if iterations is None:
        r.add(rule, f"{where}.iterations {_desc(kdf.get('iterations'))} is not an integer")
    elif not PBKDF2_MIN_ITERATIONS <= iterations <= PBKDF2_MAX_ITERATIONS:
        r.add(
            rule,
            f"{where}.iterations {iterations} outside {PBKDF2_MIN_ITERATIONS}.."
            f"{PBKDF2_MAX_ITERATIONS} (a huge count is a denial-of-service)",
        )
    r.equal(rule, f"{where}.hash", kdf.get("hash"), "sha256")
    if _b64_len(kdf.get("salt")) != 32:
        r.add(rule, f"{where}.salt is not 32 base64 bytes")


def _token_state(hdr: LuksHeader) -> object:
    """The (unverified) state of the header's one cva token, else None: the allow-list is
    structural; the MAC that makes the state count is checked with the key (luks.token)."""
    tokens = hdr.cva_tokens()
    return tokens[0][1].get("state") if len(tokens) == 1 else None


def keyslot_ids_allowed(ids: list[str], token_state: object) -> bool:
    """Exactly one keyslot, '0' or '1' (a rotated volume keeps its new key in the slot the old
    one did not use); both exactly while the token says "rotating"."""
    if token_state == TOKEN_STATE_ROTATING:
        return sorted(ids) == ["0", "1"]
    return ids in (["0"], ["1"])


def _check_keyslots(hdr: LuksHeader, key_bytes: int, r: _Reasons) -> None:
    keyslots = _obj(r, "keyslot-count", "keyslots", hdr.metadata.get("keyslots"))
    if keyslots is None:
        return
    if not keyslot_ids_allowed(list(keyslots), _token_state(hdr)):
        r.add(
            "keyslot-count",
            f"keyslots {sorted(keyslots)}; cva requires exactly keyslot '0' (or '1' after a key "
            "rotation; '0' and '1' only while its token says rotating)",
        )
    spans: list[tuple[int, int]] = []
    for ks_id, raw in keyslots.items():
        where = f"keyslot {ks_id}"
        ks = _obj(r, "keyslot-type", where, raw)
        if ks is None:
            continue
        r.fields("json-fields", where, ks, {"type", "key_size", "af", "area", "kdf"})
        r.equal("keyslot-type", f"{where}.type", ks.get("type"), "luks2")
        r.equal("keyslot-key-size", f"{where}.key_size", ks.get("key_size"), key_bytes)
        af = _obj(r, "keyslot-af", f"{where}.af", ks.get("af", {}))
        if af is not None:
            r.fields("json-fields", f"{where}.af", af, {"type", "stripes", "hash"})
            r.equal("keyslot-af", f"{where}.af.type", af.get("type"), "luks1")
            r.equal("keyslot-af", f"{where}.af.stripes", af.get("stripes"), PROFILE_AF_STRIPES)
            r.equal("keyslot-af", f"{where}.af.hash", af.get("hash"), "sha256")
        kdf = _obj(r, "keyslot-kdf", f"{where}.kdf", ks.get("kdf", {}))
        if kdf is not None:
            allowed = {"type", "hash", "iterations", "salt"}
            if kdf.get("type") == "pbkdf2":
                r.fields("json-fields", f"{where}.kdf", kdf, allowed)
            _check_kdf(f"{where}.kdf", kdf, r, "keyslot-kdf")
        area = _obj(r, "keyslot-area", f"{where}.area", ks.get("area", {}))
        if area is not None:
            _check_area(where, area, key_bytes, hdr.primary.hdr_size, r)
            offset, size = _u64(area.get("offset")), _u64(area.get("size"))
            if offset is not None and size is not None:
                spans.append((offset, offset + size))
    spans.sort()
    if any(a_end > b_start for (_a, a_end), (b_start, _b) in itertools.pairwise(spans)):
        r.add("keyslot-area", "keyslot areas overlap")


def _check_area(
    where: str, area: Mapping[str, Json], key_bytes: int, hdr_size: int, r: _Reasons
) -> None:
    r.fields(
        "json-fields", f"{where}.area", area, {"type", "offset", "size", "encryption", "key_size"}
    )
    r.equal("keyslot-area", f"{where}.area.type", area.get("type"), "raw")
    _cipher_reason("keyslot-cipher", f"{where}.area.encryption", area.get("encryption"), r)
    r.equal("keyslot-cipher", f"{where}.area.key_size", area.get("key_size"), PROFILE_KEY_BYTES)
    offset, size = _u64(area.get("offset")), _u64(area.get("size"))
    if offset is None or size is None:
        r.add("keyslot-area", f"{where}.area offset/size are not LUKS2 uint64 strings")
        return
    region_start = 2 * max(hdr_size, PROFILE_HDR_SIZE)  # after both header + JSON copies
    region_end = region_start + PROFILE_KEYSLOTS_SIZE
    if offset < region_start:
        r.add(
            "keyslot-area",
            f"{where}.area starts at {offset}, inside the JSON metadata (before {region_start})",
        )
    if offset + size > region_end or offset + size > PROFILE_SEGMENT_OFFSET:
        r.add(
            "keyslot-area",
            f"{where}.area ends at {offset + size}, past the keyslots region ({region_end}) "
            "into the data",
        )
    if offset % 4096:
        r.add("keyslot-area", f"{where}.area offset {offset} is not 4096-aligned")
    expected = -(-key_bytes * PROFILE_AF_STRIPES // 4096) * 4096  # AF material, 4 KiB aligned
    if size != expected:
        r.add("keyslot-area", f"{where}.area size {size}, cva's profile has {expected}")


def _check_segments(hdr: LuksHeader, integrity: bool, r: _Reasons) -> None:
    segments = _obj(r, "segment-count", "segments", hdr.metadata.get("segments"))
    if segments is None:
        return
    if list(segments) != ["0"]:
        r.add("segment-count", f"segments {sorted(segments)}; cva requires exactly segment '0'")
    for seg_id, raw in segments.items():
        where = f"segment {seg_id}"
        seg = _obj(r, "segment-type", where, raw)
        if seg is None:
            continue
        allowed = {"type", "offset", "size", "iv_tweak", "encryption", "sector_size", "integrity"}
        unknown = sorted(set(seg) - allowed)
        if unknown:
            r.add("json-fields", f"{where} has unknown fields {', '.join(map(repr, unknown))}")
        r.equal("segment-type", f"{where}.type", seg.get("type"), "crypt")
        _cipher_reason("segment-cipher", f"{where}.encryption", seg.get("encryption"), r)
        offset = seg.get("offset")
        if offset != str(PROFILE_SEGMENT_OFFSET):
            r.add(
                "segment-offset",
                f"{where}.offset is {_desc(offset)}, cva requires exactly "
                f"'{PROFILE_SEGMENT_OFFSET}' (moved data, or offset 0 skipping layout checks)",
            )
        size = seg.get("size")
        if size != "dynamic":
            r.add("segment-size", f"{where}.size is {_desc(size)}, cva requires 'dynamic'")
        r.equal("segment-iv-tweak", f"{where}.iv_tweak", seg.get("iv_tweak"), "0")
        r.equal("sector-size", f"{where}.sector_size", seg.get("sector_size"), PROFILE_SECTOR_SIZE)
        _check_integrity(where, seg, integrity, r)


def _check_integrity(where: str, seg: Mapping[str, Json], integrity: bool, r: _Reasons) -> None:
    if not integrity:
        if "integrity" in seg:
            r.add(
                "segment-integrity",
                f"{where}.integrity {_desc(seg['integrity'])} set but the contract says none",
            )
        return
    value = seg.get("integrity")
    expected = {
        "type": PROFILE_INTEGRITY,
        "journal_encryption": "none",
        "journal_integrity": "none",
    }
    if value != expected:
        r.add(
            "segment-integrity",
            f"{where}.integrity is {_desc(value)}, the contract requires {PROFILE_INTEGRITY!r}",
        )


def _check_digests(hdr: LuksHeader, r: _Reasons) -> None:
    digests = _obj(r, "digest-count", "digests", hdr.metadata.get("digests"))
    if digests is None:
        return
    if list(digests) != ["0"]:
        r.add("digest-count", f"digests {sorted(digests)}; cva requires exactly digest '0'")
    for dg_id, raw in digests.items():
        where = f"digest {dg_id}"
        dg = _obj(r, "digest-type", where, raw)
        if dg is None:
            continue
        r.fields(
            "json-fields",
            where,
            dg,
            {"type", "keyslots", "segments", "hash", "iterations", "salt", "digest"},
        )
        keyslots = hdr.metadata.get("keyslots")
        bound = sorted(keyslots) if isinstance(keyslots, dict) and keyslots else ["0"]
        listed = dg.get("keyslots")
        if isinstance(listed, list) and all(isinstance(k, str) for k in listed):
            listed = sorted(listed)  # libcryptsetup lists them in the order they were added
        r.equal("digest-binding", f"{where}.keyslots", listed, bound)
        r.equal("digest-binding", f"{where}.segments", dg.get("segments"), ["0"])
        _check_kdf(where, dg, r, "digest-kdf")
        if dg.get("type") == "pbkdf2" and _b64_len(dg.get("digest")) != 32:
            r.add("digest-kdf", f"{where}.digest is not 32 base64 bytes")


def _check_tokens(hdr: LuksHeader, r: _Reasons) -> None:
    tokens = _obj(r, "token-type", "tokens", hdr.metadata.get("tokens"))
    if tokens is None:
        return
    if len(tokens) > 1 or (tokens and list(tokens) != ["0"]):
        r.add("token-count", f"tokens {sorted(tokens)}; cva allows only its token '0'")
    for tok_id, raw in tokens.items():
        where = f"token {tok_id}"
        tok = _obj(r, "token-type", where, raw)
        if tok is None:
            continue
        if tok.get("type") != TOKEN_TYPE:
            r.add("token-type", f"{where} has type {_desc(tok.get('type'))}; only 'cva' allowed")
            continue
        token_shape_reasons(where, tok, r.add)


def token_shape_reasons(
    where: str, tok: Mapping[str, Json], add: Callable[[str, str], None]
) -> None:
    """Structural checks of a `cva` token (the MAC needs the key: see luks.token)."""
    unknown = sorted(set(tok) - TOKEN_FIELDS - TOKEN_OPTIONAL_FIELDS)
    if unknown:
        add("token-fields", f"{where} has unknown fields {', '.join(map(repr, unknown))}")
    missing = sorted(TOKEN_FIELDS - set(tok))
    if missing:
        add("token-fields", f"{where} lacks {', '.join(map(repr, missing))}")
    if tok.get("keyslots", []) != []:
        add("token-fields", f"{where}.keyslots must be [] (cva tokens unlock nothing)")
    if "state" in tok and tok["state"] not in TOKEN_STATES:
        add("token-fields", f"{where}.state {_desc(tok['state'])} is not one of {TOKEN_STATES}")
    volume = tok.get("volume")
    if "volume" in tok and not (isinstance(volume, str) and VOLUME_NAME_RE.fullmatch(volume)):
        add("token-fields", f"{where}.volume {_desc(volume)} is not a volume name")
    mac = tok.get("mac")
    if "mac" in tok and not (isinstance(mac, str) and re.fullmatch(r"[0-9a-f]{64}", mac)):
        add("token-fields", f"{where}.mac is not 64 lower-case hex digits")
    seq = tok.get("seq")
    if "seq" in tok and not (
        type(seq) is int and 0 <= seq <= TOKEN_SEQ_MAX  # not bool, float or text
    ):
        add("token-fields", f"{where}.seq {_desc(seq)} is not an integer 0..2^64-1")


def allow_list_reasons(hdr: LuksHeader, *, integrity: bool) -> list[str]:
    """Every reason `hdr` is not exactly cva's profile (DESIGN §6); [] = acceptable.

    `integrity` is what the contract says. Zero tokens pass here (a header formatted but not
    yet marked); the open path still requires a `cva` token with a valid MAC (luks.token).
    """
    r = _Reasons()
    _check_copies(hdr, r)
    _check_binary(hdr, r)
    top = set(hdr.metadata)
    expected = {"keyslots", "tokens", "segments", "digests", "config"}
    if top != expected:
        extra, missing = sorted(top - expected), sorted(expected - top)
        if extra:
            r.add("json-fields", f"unknown top-level fields {', '.join(map(repr, extra))}")
        if missing:
            r.add("json-fields", f"missing top-level fields {', '.join(map(repr, missing))}")
    key_bytes = PROFILE_KEY_BYTES + (PROFILE_INTEGRITY_KEY_BYTES if integrity else 0)
    _check_config(hdr, r)
    _check_keyslots(hdr, key_bytes, r)
    _check_segments(hdr, integrity, r)
    _check_digests(hdr, r)
    _check_tokens(hdr, r)
    return r.items


def declares_integrity(hdr: LuksHeader) -> bool:
    """Whether segment 0 says it has integrity (for `cva luks inspect` without a contract)."""
    seg = hdr.section("segments").get("0")
    return isinstance(seg, dict) and "integrity" in seg
