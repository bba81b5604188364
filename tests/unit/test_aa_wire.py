"""evidence.aa_wire against an independent encoder: the protobuf runtime, with a descriptor built
from the upstream field numbers (GC protos/attestation-agent.proto) in tests/fake_aa.py, not from
cva's code."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence import aa_wire
from evidence.aa_wire import (
    AaWireError,
    ExtendRuntimeMeasurementRequest,
    RuntimeMeasurementResult,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from evidence.errors import EvidenceError
from tests.fake_aa import upstream_classes

# The descriptor the fake AA decodes with: upstream field numbers, no cva code.
Req, Resp, _, _ = upstream_classes()


def _theirs(r: ExtendRuntimeMeasurementRequest) -> bytes:
    msg = Req(Domain=r.domain, Operation=r.operation, Content=r.content)
    if r.register_index is not None:
        msg.RegisterIndex = r.register_index
    return bytes(msg.SerializeToString(deterministic=True))


@pytest.mark.parametrize("register", [None, 0, 17, 2**64 - 1])
def test_request_bytes_match_the_runtime(register: int | None) -> None:
    r = ExtendRuntimeMeasurementRequest("cva", "volume-open", "v=1 name=data", register)
    ours = encode_request(r)
    assert ours == _theirs(r)
    parsed = Req.FromString(ours)
    assert parsed.HasField("RegisterIndex") == (register is not None)
    assert (parsed.Domain, parsed.Operation, parsed.Content) == ("cva", "volume-open", r.content)
    assert decode_request(ours) == r


def test_request_known_answer() -> None:
    ours = encode_request(ExtendRuntimeMeasurementRequest("d", "op", "", 0))
    # field 1 LEN "d", field 2 LEN "op", Content empty -> omitted, field 4 varint 0 (present).
    assert ours == b"\x0a\x01d" + b"\x12\x02op" + b"\x20\x00"
    assert encode_request(ExtendRuntimeMeasurementRequest("", "", "")) == b""


@settings(max_examples=200)
@given(
    st.text(max_size=40),
    st.text(max_size=40),
    st.text(max_size=300),
    st.none() | st.integers(0, 2**64 - 1),
)
def test_request_round_trip_fuzz(d: str, o: str, c: str, reg: int | None) -> None:
    r = ExtendRuntimeMeasurementRequest(d, o, c, reg)
    try:
        ours = encode_request(r)
    except AaWireError:
        assert any(0xD800 <= ord(ch) <= 0xDFFF for ch in d + o + c)
        return
    assert ours == _theirs(r)
    assert decode_request(ours) == r


@pytest.mark.parametrize("result", [0, 1, 2, 7, -1, 2**31 - 1, -(2**31)])
def test_response_bytes_match_the_runtime(result: int) -> None:
    theirs = bytes(Resp(Result=result).SerializeToString(deterministic=True))
    assert encode_response(result) == theirs
    assert decode_response(theirs) == result


def test_response_meaning() -> None:
    assert decode_response(b"") == RuntimeMeasurementResult.OK
    assert decode_response(b"\x08\x02") == RuntimeMeasurementResult.NOT_ENABLED
    assert decode_response(b"\x08\x01\x08\x00") == RuntimeMeasurementResult.OK  # last wins
    # Unknown fields of every wire type are skipped.
    unknown = b"\x10\x05" + b"\x19" + bytes(8) + b"\x22\x02ab" + b"\x2d" + bytes(4)
    assert decode_response(unknown + b"\x08\x01") == RuntimeMeasurementResult.NOT_SUPPORTED
    assert Resp.FromString(unknown + b"\x08\x01").Result == 1  # so does the runtime


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x08", "truncated varint"),
        (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10"),
        (b"\x08" + b"\xff" * 9 + b"\x02", "64 bits"),
        (b"\x0a\x05ab", "past the end"),
        (b"\x0a\x01", "past the end"),
        (b"\x0b", "wire type 3"),
        (b"\x0c", "wire type 4"),
        (b"\x0e", "wire type 6"),
        (b"\x00\x00", "field number 0"),
        (b"\x0a\x01\xff", "not UTF-8"),
        (b"\x08\x01", "length-delimited"),
        (b"\x22\x01x", "varint"),
        (b"\x19" + bytes(7), "past the end"),
    ],
)
def test_request_hostile(data: bytes, match: str) -> None:
    with pytest.raises(AaWireError, match=match):
        decode_request(data)
    assert issubclass(AaWireError, EvidenceError)


def test_response_hostile_and_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AaWireError, match="varint"):
        decode_response(b"\x0a\x00")
    with pytest.raises(AaWireError, match="int32"):
        encode_response(2**31)
    with pytest.raises(AaWireError, match="uint64"):
        encode_request(ExtendRuntimeMeasurementRequest("d", "o", "c", 2**64))
    monkeypatch.setattr(aa_wire, "MAX_MESSAGE", 8)
    with pytest.raises(AaWireError, match="limit"):
        decode_request(b"\x0a\x07abcdefg")
    with pytest.raises(AaWireError, match="limit"):
        encode_request(ExtendRuntimeMeasurementRequest("abcdefgh", "", ""))


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_decode_fuzz_only_typed_errors(data: bytes) -> None:
    try:
        r = decode_request(data)
    except AaWireError:
        pass
    else:
        # Whatever we accept, the runtime accepts with the same values.
        msg = Req.FromString(data)
        assert (msg.Domain, msg.Operation, msg.Content) == (r.domain, r.operation, r.content)
        assert (msg.RegisterIndex if msg.HasField("RegisterIndex") else None) == r.register_index
    with contextlib.suppress(AaWireError):
        decode_response(data)
