"""A small LUKS2 header writer for tests: cva's good profile, and hostile variants of it.

Written from the LUKS2 on-disk layout (see luks/header.py's docstring); it produces the bytes
of a header area (both binary headers + JSON areas, with correct checksums unless asked not
to), so tests can hand-craft what a hostile host could plant on a disk.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from typing import Any

HDR_SIZE = 16384
AREA_BYTES = 16 * 1024 * 1024
UUID = "3f1c2b9e-5d4a-4e8f-9a7b-1c2d3e4f5a6b"


def _b64(n: int, fill: int) -> str:
    return base64.b64encode(bytes([fill]) * n).decode()


def good_metadata(*, integrity: bool = False) -> dict[str, Any]:
    """The JSON metadata of a header in cva's profile (no token)."""
    key_size = 96 if integrity else 64
    area_size = -(-key_size * 4000 // 4096) * 4096
    segment: dict[str, Any] = {
        "type": "crypt",
        "offset": "16777216",
        "size": "dynamic",
        "iv_tweak": "0",
        "encryption": "aes-xts-plain64",
        "sector_size": 4096,
    }
    if integrity:
        segment["integrity"] = {
            "type": "hmac(sha256)",
            "journal_encryption": "none",
            "journal_integrity": "none",
        }
    return {
        "keyslots": {
            "0": {
                "type": "luks2",
                "key_size": key_size,
                "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
                "area": {
                    "type": "raw",
                    "offset": "32768",
                    "size": str(area_size),
                    "encryption": "aes-xts-plain64",
                    "key_size": 64,
                },
                "kdf": {
                    "type": "pbkdf2",
                    "hash": "sha256",
                    "iterations": 1000,
                    "salt": _b64(32, 1),
                },
            }
        },
        "tokens": {},
        "segments": {"0": segment},
        "digests": {
            "0": {
                "type": "pbkdf2",
                "keyslots": ["0"],
                "segments": ["0"],
                "hash": "sha256",
                "iterations": 1000,
                "salt": _b64(32, 2),
                "digest": _b64(32, 3),
            }
        },
        "config": {"json_size": "12288", "keyslots_size": "16744448"},
    }


def binary_header(
    json_area: bytes,
    *,
    secondary: bool = False,
    hdr_size: int = HDR_SIZE,
    seqid: int = 1,
    uuid: str = UUID,
    label: str = "",
    subsystem: str = "",
    version: int = 2,
    checksum_alg: str = "sha256",
    offset: int | None = None,
    salt_fill: int = 0x5A,
    bad_checksum: bool = False,
) -> bytes:
    """One copy: 4096-byte binary header + the JSON area (json_area padded to hdr_size-4096)."""
    if offset is None:
        offset = hdr_size if secondary else 0
    hdr = bytearray(4096)
    hdr[0:6] = b"SKUL\xba\xbe" if secondary else b"LUKS\xba\xbe"
    hdr[6:8] = version.to_bytes(2, "big")
    hdr[8:16] = hdr_size.to_bytes(8, "big")
    hdr[16:24] = seqid.to_bytes(8, "big")
    hdr[24 : 24 + len(label)] = label.encode()
    hdr[72 : 72 + len(checksum_alg)] = checksum_alg.encode()
    hdr[104:168] = bytes([salt_fill + (1 if secondary else 0)]) * 64
    hdr[168 : 168 + len(uuid)] = uuid.encode()
    hdr[208 : 208 + len(subsystem)] = subsystem.encode()
    hdr[256:264] = offset.to_bytes(8, "big")
    area = bytes(json_area[: hdr_size - 4096]).ljust(hdr_size - 4096, b"\x00")
    digest = hashlib.sha256(bytes(hdr) + area).digest()
    if bad_checksum:
        digest = bytes(b ^ 0xFF for b in digest)
    hdr[448:480] = digest
    return bytes(hdr) + area


def json_area(metadata: Any, *, padding: bytes = b"") -> bytes:
    """JSON text (a dict is serialised like libcryptsetup does: compact) + NUL + padding."""
    if isinstance(metadata, bytes):
        text = metadata
    elif isinstance(metadata, str):
        text = metadata.encode()
    else:
        text = json.dumps(metadata, separators=(",", ":")).encode()
    return text + b"\x00" + padding


def luks2_area(
    metadata: Any = None,
    *,
    secondary_metadata: Any = None,
    full: bool = True,
    primary: dict[str, Any] | None = None,
    secondary: dict[str, Any] | None = None,
    padding: bytes = b"",
) -> bytes:
    """A header area: both copies (same JSON unless `secondary_metadata`), zero keyslots area.

    `primary`/`secondary` are keyword overrides for `binary_header`; `full` pads the area to
    16 MiB (what cva copies), else it is just the two copies.
    """
    if metadata is None:
        metadata = good_metadata()
    p_json = json_area(metadata, padding=padding)
    s_json = p_json if secondary_metadata is None else json_area(secondary_metadata)
    p_opts = dict(primary or {})
    s_opts = dict(secondary or {})
    hdr_size = p_opts.get("hdr_size", HDR_SIZE)
    s_opts.setdefault("hdr_size", hdr_size)
    s_opts.setdefault("offset", hdr_size)
    data = binary_header(p_json, **p_opts) + binary_header(s_json, secondary=True, **s_opts)
    if full:
        data = data.ljust(AREA_BYTES, b"\x00")
    return data


def mutated(change: Any, *, integrity: bool = False) -> dict[str, Any]:
    """good_metadata() after `change(metadata)` (which edits it in place)."""
    meta = copy.deepcopy(good_metadata(integrity=integrity))
    change(meta)
    return meta


def write_image(path: Any, area: bytes, size: int = 32 * 1024 * 1024) -> None:
    """A sparse image file holding `area` at offset 0."""
    with open(path, "wb") as f:
        f.write(area)
        f.truncate(size)
