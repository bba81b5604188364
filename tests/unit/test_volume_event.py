"""evidence.volume_event: the content cva records per volume, canonical and parseable."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence.errors import EvidenceError
from evidence.eventlog import ALG_SHA384, encode_entry, parse_aael_text, parse_log
from evidence.volume_event import (
    DOMAIN,
    VolumeEvent,
    VolumeEventError,
    VolumeOperation,
    parse_volume_content,
    parse_volume_event,
    volume_aael,
    volume_content,
)

UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
HDR = hashlib.sha256(b"header").digest()


def _event(**kw: Any) -> VolumeEvent:
    args: dict[str, Any] = {
        "operation": VolumeOperation.OPEN,
        "name": "data",
        "luks_uuid": UUID,
        "header_sha256": HDR,
        "filesystem": "ext4",
        "read_only": False,
        "sequence": 7,
    }
    args.update(kw)
    return VolumeEvent(**args)


def test_known_text() -> None:
    ev = _event()
    # RFC 8785 (JCS) by hand: keys in UTF-16 code-unit order, no white space
    assert volume_content(ev) == (
        f'{{"fs":"ext4","header-sha256":"{HDR.hex()}","name":"data","ro":false,"seq":7,'
        f'"uuid":"{UUID}","v":1}}'
    )
    aael = volume_aael(ev)
    assert (aael.domain, aael.operation) == ("cva", "volume-open")
    assert aael.text == "cva volume-open " + volume_content(ev)
    assert aael.text.count(" ") == 2  # Trustee's text-form parser: exactly three fields
    eph = _event(operation=VolumeOperation.CLOSE, sequence=None, read_only=True, name="a.b+c_d-e")
    assert '"ro":true,"uuid"' in volume_aael(eph).text
    assert parse_volume_event(volume_aael(eph)) == eph


def _ids(op: VolumeOperation) -> dict[str, bytes]:
    return {"new_key_id": b"\x02" * 32} if op is VolumeOperation.REKEY else {}


def test_through_a_log() -> None:
    events = [
        _event(operation=op, sequence=None if op.ephemeral else i, **_ids(op))
        for i, op in enumerate(VolumeOperation)
    ]
    log = b"".join(encode_entry(17, ALG_SHA384, volume_aael(e)) for e in events)
    log += encode_entry(17, ALG_SHA384, parse_aael_text("github.com/x PullImage {}"))
    parsed = [parse_volume_event(parse_aael_text(e.text)) for e in parse_log(log)]
    assert parsed == [*events, None]


@pytest.mark.parametrize(
    "kw",
    [
        {"name": ""},
        {"name": "a b"},
        {"name": "a=b"},
        {"name": "-x"},
        {"name": "x" * 129},
        {"name": "da\nta"},
        {"luks_uuid": UUID.upper()},
        {"luks_uuid": UUID[:-1]},
        {"luks_uuid": UUID.replace("-", "")},
        {"header_sha256": HDR[:31]},
        {"header_sha256": HDR.hex()},
        {"filesystem": "Ext4"},
        {"filesystem": "ext 4"},
        {"filesystem": ""},
        {"read_only": 1},
        {"sequence": -1},
        {"sequence": 2**64},
        {"sequence": True},
        {"sequence": "7"},
        {"operation": "volume-open"},
    ],
)
def test_construction_refuses(kw: dict[str, Any]) -> None:
    with pytest.raises(VolumeEventError):
        _event(**kw)
    assert issubclass(VolumeEventError, EvidenceError)


GOOD = volume_content(_event())


@pytest.mark.parametrize(
    "content",
    [
        "",
        GOOD + " ",
        " " + GOOD,
        GOOD.replace(",", ", ", 1),
        GOOD.replace(":", ": ", 1),
        GOOD[:-1] + ',"extra":1}',
        GOOD.replace('"v":1', '"v":2'),
        GOOD.replace('"v":1', '"v":1.0'),
        GOOD.replace('"v":1', '"v":true'),
        GOOD.replace('"name"', '"nom"'),
        GOOD.replace('"ro":false', '"ro":0'),
        GOOD.replace('"ro":false', '"ro":"false"'),
        GOOD.replace('"seq":7', '"seq":07'),
        GOOD.replace('"seq":7', '"seq":-7'),
        GOOD.replace('"seq":7', f'"seq":{2**64}'),
        GOOD.replace('"seq":7', '"seq":7.0'),
        GOOD.replace('"seq":7', '"seq":"7"'),
        GOOD.replace('"seq":7', '"seq":NaN'),
        GOOD.replace('"seq":7', '"seq":Infinity'),
        GOOD.replace(HDR.hex(), HDR.hex().upper()),
        GOOD.replace(HDR.hex(), HDR.hex()[:-2]),
        GOOD.replace('"fs":"ext4",', "") + "",
        '{"v":1,' + GOOD[1:].replace(',"v":1', ""),  # keys out of order
        GOOD.replace('"name":"data"', '"name":"data","name":"data"'),  # duplicate key
        GOOD.replace('"name":"data"', r'"name":"d\u0061ta"'),  # escaped, not canonical
        GOOD.replace('"seq":7', '"key":"00112233445566778899aabbccddeeff"'),
        "[" + GOOD + "]",
        '"' + GOOD + '"',
        "[" * 5000,
    ],
)
def test_parse_refuses_non_canonical(content: str) -> None:
    with pytest.raises(VolumeEventError):
        parse_volume_content(VolumeOperation.OPEN, content)


def test_parse_event_domain_and_operation() -> None:
    assert parse_volume_event(parse_aael_text("other volume-open " + GOOD)) is None
    with pytest.raises(VolumeEventError, match="not a volume operation"):
        parse_volume_event(parse_aael_text(f"{DOMAIN} volume-wipe {GOOD}"))


_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}", fullmatch=True)


@settings(max_examples=200)
@given(
    st.sampled_from(list(VolumeOperation)),
    _names,
    st.uuids().map(str),
    st.binary(min_size=32, max_size=32),
    st.from_regex(r"[a-z][a-z0-9]{0,15}", fullmatch=True),
    st.booleans(),
    st.none() | st.integers(0, 2**64 - 1),
)
def test_round_trip(
    op: VolumeOperation, name: str, uuid: str, hdr: bytes, fs: str, ro: bool, seq: int | None
) -> None:
    ev = VolumeEvent(op, name, uuid, hdr, fs, ro, None if op.ephemeral else seq, **_ids(op))
    assert parse_volume_event(parse_aael_text(volume_aael(ev).text)) == ev


def test_ephemeral_events_have_their_own_operations_and_no_seq() -> None:
    """Issue 21 #5c: an ephemeral volume named like a contract volume never reads as one."""
    ev = _event(operation=VolumeOperation.EPHEMERAL_CREATE, sequence=None, name="pgdata")
    aael = volume_aael(ev)
    assert aael.operation == "ephemeral-create" and parse_volume_event(aael) == ev
    close = _event(operation=VolumeOperation.EPHEMERAL_CLOSE, sequence=None)
    assert volume_aael(close).operation == "ephemeral-close"
    with pytest.raises(VolumeEventError, match="carries no seq"):
        _event(operation=VolumeOperation.EPHEMERAL_CREATE, sequence=1)
    content = volume_content(_event(sequence=3))
    with pytest.raises(VolumeEventError, match="carries no seq"):
        parse_volume_content(VolumeOperation.EPHEMERAL_CLOSE, content)


@given(st.binary(min_size=32, max_size=32), st.none() | st.binary(min_size=32, max_size=32))
def test_rekey_round_trip(new: bytes, old: bytes | None) -> None:
    ev = VolumeEvent(VolumeOperation.REKEY, "pg", UUID, HDR, "ext4", False, 7, new, old)
    text = volume_aael(ev).text
    assert text.startswith("cva volume-rekey {") and text.count(" ") == 2
    assert f'"new-key-id":"{new.hex()}"' in text
    assert ("old-key-id" in text) is (old is not None)
    assert parse_volume_event(parse_aael_text(text)) == ev


@pytest.mark.parametrize(
    ("op", "content"),
    [
        (VolumeOperation.OPEN, '"new-key-id":"' + "00" * 32 + '"'),
        (VolumeOperation.REKEY, None),
        (VolumeOperation.REKEY, '"new-key-id":"' + "0" * 63 + '"'),
        (VolumeOperation.REKEY, '"new-key-id":"' + "AB" * 32 + '"'),
        (VolumeOperation.REKEY, '"new-key-id":7'),
        (VolumeOperation.REKEY, '"old-key-id":"' + "00" * 32 + '"'),
    ],
)
def test_key_ids_only_on_rekey_and_well_formed(op: VolumeOperation, content: str | None) -> None:
    base = volume_content(_event())[1:-1]
    extra = "" if content is None else "," + content
    fields = json.loads("{" + base + extra + "}")
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    with pytest.raises(VolumeEventError):
        parse_volume_content(op, text)
    with pytest.raises(VolumeEventError):
        VolumeEvent(VolumeOperation.OPEN, "pg", UUID, HDR, "ext4", False, None, b"\x01" * 32)


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_parse_fuzz_only_typed_errors(content: str) -> None:
    try:
        ev = parse_volume_content(VolumeOperation.CREATE, content)
    except VolumeEventError:
        return
    assert volume_content(ev) == content
