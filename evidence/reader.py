"""A bounded little/big-endian cursor over hostile bytes: every read is checked against the end.

Parsers use it so that a length field pointing past the end becomes a clean `EvidenceError`
naming the structure and the field, never an IndexError or a short slice.
"""

from __future__ import annotations

import struct

from evidence.errors import EvidenceError


class Reader:
    """Sequential reads from `data[start:end]`; `what` names the structure in errors."""

    def __init__(self, data: bytes, what: str, *, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self._end = len(data) if end is None else end
        if not 0 <= start <= self._end <= len(data):
            raise EvidenceError(f"{what}: bounds {start}..{end} outside {len(data)} bytes")
        self.pos = start
        self.what = what

    @property
    def remaining(self) -> int:
        return self._end - self.pos

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or size > self.remaining:
            raise EvidenceError(
                f"{self.what}: {field} needs {size} bytes at offset {self.pos},"
                f" only {self.remaining} left (truncated or a length points past the end)"
            )
        out = self._data[self.pos : self.pos + size]
        self.pos += size
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16le(self, field: str) -> int:
        return int(struct.unpack("<H", self.take(2, field))[0])

    def u32le(self, field: str) -> int:
        return int(struct.unpack("<I", self.take(4, field))[0])

    def u64le(self, field: str) -> int:
        return int(struct.unpack("<Q", self.take(8, field))[0])

    def u16be(self, field: str) -> int:
        return int(struct.unpack(">H", self.take(2, field))[0])

    def u32be(self, field: str) -> int:
        return int(struct.unpack(">I", self.take(4, field))[0])

    def u64be(self, field: str) -> int:
        return int(struct.unpack(">Q", self.take(8, field))[0])

    def sized16be(self, field: str) -> bytes:
        """A TPM2B: u16 big-endian size, then that many bytes."""
        return self.take(self.u16be(f"{field} size"), field)
