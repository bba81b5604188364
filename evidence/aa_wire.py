"""The Attestation Agent's ExtendRuntimeMeasurement messages, hand-encoded protobuf, pure.

Upstream (GC `protos/attestation-agent.proto`, SPEC.md §e.6), proto3:
    message ExtendRuntimeMeasurementRequest {
        string Domain = 1; string Operation = 2; string Content = 3;
        optional uint64 RegisterIndex = 4;
    }
    enum RuntimeMeasurementResult { OK = 0; NOT_SUPPORTED = 1; NOT_ENABLED = 2; }
    message ExtendRuntimeMeasurementResponse { RuntimeMeasurementResult Result = 1; }
called as ttRPC method `attestation_agent.AttestationAgentService/ExtendRuntimeMeasurement` on
`/run/confidential-containers/attestation-agent/attestation-agent.sock`.

Intended use (the lead wires it into the AA client later): cva builds the event with
`evidence.volume_event`, sends `encode_request(...)` as the ttRPC payload, and accepts only a
response that `decode_response` maps to `RuntimeMeasurementResult.OK`; NOT_SUPPORTED /
NOT_ENABLED (the AA's `[eventlog_config] enable_eventlog = false`) and unknown values are
failures to measure. Omit RegisterIndex to let the AA use its configured `init_pcr`.

Encoding is canonical (what protobuf runtimes write): fields in number order, proto3 implicit
presence (an empty string / zero enum is not written), RegisterIndex written whenever present,
also as 0. Decoding takes any valid protobuf: unknown fields skipped, a repeated scalar field's
last value wins, non-minimal varints accepted; it refuses truncation, group wire types, a known
field with the wrong wire type, varints over 64 bits, field number 0, invalid UTF-8, and
messages over MAX_MESSAGE bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from evidence.errors import EvidenceError

SERVICE = "attestation_agent.AttestationAgentService"
METHOD = "ExtendRuntimeMeasurement"
SOCKET = "/run/confidential-containers/attestation-agent/attestation-agent.sock"

MAX_MESSAGE = 4 * 1024 * 1024  # ttRPC's frame limit
_U64 = (1 << 64) - 1

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5


class AaWireError(EvidenceError):
    """A malformed ExtendRuntimeMeasurement request or response."""


class RuntimeMeasurementResult(enum.IntEnum):
    OK = 0
    NOT_SUPPORTED = 1
    NOT_ENABLED = 2


@dataclass(frozen=True)
class ExtendRuntimeMeasurementRequest:
    domain: str
    operation: str
    content: str
    register_index: int | None = None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _string(field: int, value: str) -> bytes:
    if not value:
        return b""
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise AaWireError(f"field {field} is not valid Unicode (lone surrogate)") from None
    return _key(field, _LEN) + _varint(len(raw)) + raw


def encode_request(req: ExtendRuntimeMeasurementRequest) -> bytes:
    """Serialise a request exactly as a protobuf runtime does."""
    out = _string(1, req.domain) + _string(2, req.operation) + _string(3, req.content)
    if req.register_index is not None:
        if not 0 <= req.register_index <= _U64:
            raise AaWireError(f"RegisterIndex {req.register_index} does not fit a uint64")
        out += _key(4, _VARINT) + _varint(req.register_index)
    if len(out) > MAX_MESSAGE:
        raise AaWireError(f"request is {len(out)} bytes; the limit is {MAX_MESSAGE}")
    return out


def encode_response(result: int) -> bytes:
    """Serialise a response (for tests and a fake AA); `result` is any int32 enum value."""
    if not -(1 << 31) <= result < 1 << 31:
        raise AaWireError(f"Result {result} does not fit an int32 enum")
    if result == 0:
        return b""
    return _key(1, _VARINT) + _varint(result & _U64)


class _Cursor:
    def __init__(self, data: bytes, what: str) -> None:
        if len(data) > MAX_MESSAGE:
            raise AaWireError(f"{what} is {len(data)} bytes; the limit is {MAX_MESSAGE}")
        self.data, self.pos, self.what = data, 0, what

    def fail(self, message: str) -> AaWireError:
        return AaWireError(f"{self.what} at byte {self.pos}: {message}")

    def varint(self) -> int:
        value = 0
        for shift in range(0, 70, 7):
            if self.pos >= len(self.data):
                raise self.fail("truncated varint")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > _U64:
                    raise self.fail("varint exceeds 64 bits")
                return value
        raise self.fail("varint longer than 10 bytes")

    def take(self, size: int) -> bytes:
        if size > len(self.data) - self.pos:
            raise self.fail(f"length {size} runs past the end")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def fields(self) -> list[tuple[int, int, int | bytes]]:
        """(field number, wire type, value) for every field, in order."""
        out: list[tuple[int, int, int | bytes]] = []
        while self.pos < len(self.data):
            key = self.varint()
            field, wire = key >> 3, key & 7
            if field == 0 or field > (1 << 29) - 1:
                raise self.fail(f"invalid field number {field}")
            value: int | bytes
            if wire == _VARINT:
                value = self.varint()
            elif wire == _I64:
                value = self.take(8)
            elif wire == _LEN:
                value = self.take(self.varint())
            elif wire == _I32:
                value = self.take(4)
            else:
                raise self.fail(f"wire type {wire} (groups or invalid) is not accepted")
            out.append((field, wire, value))
        return out


def _text(cur: _Cursor, field: int, value: bytes) -> str:
    try:
        return value.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise cur.fail(f"field {field} is not UTF-8") from None


def decode_request(data: bytes) -> ExtendRuntimeMeasurementRequest:
    """Parse a request (the fake AA in tests, and any peer that must be checked)."""
    cur = _Cursor(data, "ExtendRuntimeMeasurementRequest")
    texts = {1: "", 2: "", 3: ""}
    register: int | None = None
    for field, wire, value in cur.fields():
        if field in texts:
            if wire != _LEN or not isinstance(value, bytes):
                raise cur.fail(f"field {field} must be length-delimited (string)")
            texts[field] = _text(cur, field, value)
        elif field == 4:
            if wire != _VARINT or not isinstance(value, int):
                raise cur.fail("RegisterIndex (4) must be a varint")
            register = value
    return ExtendRuntimeMeasurementRequest(texts[1], texts[2], texts[3], register)


def decode_response(data: bytes) -> int:
    """The Result of a response as a signed int32 (proto3 enums are open: compare with
    `RuntimeMeasurementResult.OK`; anything else, known or not, means not measured)."""
    cur = _Cursor(data, "ExtendRuntimeMeasurementResponse")
    result = 0
    for field, wire, value in cur.fields():
        if field == 1:
            if wire != _VARINT or not isinstance(value, int):
                raise cur.fail("Result (1) must be a varint")
            low = value & 0xFFFFFFFF
            result = low - (1 << 32) if low & 0x80000000 else low
    return result
