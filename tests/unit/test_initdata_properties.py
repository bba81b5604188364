"""Property tests: any input to the initdata/contract parsers yields a value or a clean error;
encode/decode round trips are exact."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import struct
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.contract import Contract, ContractError, parse_contract
from agent.initdata import (
    ALGORITHMS,
    MAGIC,
    InitData,
    InitDataError,
    decode_annotation,
    encode_annotation,
    encode_block_image,
    gunzip_capped,
    parse_block_image,
    parse_initdata,
    read_initdata_block,
    unwrap_document,
)
from agent.log import configure_logging, get_logger

SETTINGS = settings(max_examples=300, deadline=None)


def toml_string(text: str) -> str:
    """A TOML basic string for `text` (JSON escapes, plus DEL which TOML wants escaped)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def initdata_doc(algorithm: str, data: dict[str, str]) -> bytes:
    lines = ['version = "0.1.0"', f'algorithm = "{algorithm}"', "[data]"]
    lines += [f"{toml_string(k)} = {toml_string(v)}" for k, v in data.items()]
    return ("\n".join(lines) + "\n").encode()


# --- any bytes -> value or clean error ----------------------------------------------------


@SETTINGS
@given(st.binary(max_size=2048))
def test_parse_initdata_any_bytes(raw: bytes) -> None:
    try:
        result = parse_initdata(raw)
    except InitDataError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(result, InitData) and result.raw == raw


@SETTINGS
@given(st.text(max_size=2048))
def test_parse_initdata_any_text(text: str) -> None:
    with contextlib.suppress(InitDataError):
        parse_initdata(text.encode())


@SETTINGS
@given(st.binary(max_size=1024))
def test_gunzip_any_bytes(blob: bytes) -> None:
    with contextlib.suppress(InitDataError):
        gunzip_capped(blob, what="t")


@SETTINGS
@given(st.binary(max_size=512), st.integers(min_value=0, max_value=2**64 - 1))
def test_block_image_any_bytes(payload: bytes, length: int) -> None:
    for img in (payload, MAGIC + struct.pack("<Q", length) + payload):
        with contextlib.suppress(InitDataError):
            parse_block_image(img)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=512), length=st.integers(min_value=0, max_value=2**64 - 1))
def test_read_block_any_bytes(tmp_path: Path, payload: bytes, length: int) -> None:
    path = tmp_path / "img"
    path.write_bytes(MAGIC + struct.pack("<Q", length) + payload)
    with contextlib.suppress(InitDataError):
        read_initdata_block(path)


@SETTINGS
@given(st.text(max_size=1024))
def test_decode_annotation_any_text(value: str) -> None:
    with contextlib.suppress(InitDataError):
        decode_annotation(value)


@SETTINGS
@given(st.binary(max_size=1024), st.sampled_from(["auto", "toml", "annotation", "gzip", "image"]))
def test_unwrap_any_bytes(blob: bytes, fmt: str) -> None:
    with contextlib.suppress(InitDataError):
        unwrap_document(blob, fmt)


@SETTINGS
@given(st.text(max_size=2048))
def test_parse_contract_any_text(text: str) -> None:
    try:
        result = parse_contract(text)
    except ContractError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(result, Contract)


FIELD_VALUES = st.one_of(
    st.text(max_size=40),
    st.integers(),
    st.booleans(),
    st.lists(st.text(max_size=10), max_size=3),
    st.sampled_from(
        ["serial:d1", "8G", "/data", "kbs:///a/b/c", "ext4", "xfs", "pci:0000:00:05.0"]
    ),
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


@SETTINGS
@given(
    st.sampled_from(
        ["name", "key", "disk", "filesystem", "mount", "containers", "create", "integrity",
         "read_only", "lvm", "bogus"]
    ),
    FIELD_VALUES,
)  # fmt: skip
def test_contract_any_field_value(field: str, value: Any) -> None:
    vol = {"name": "data", "key": "kbs:///a/b/c", "disk": "serial:d1", "mount": "/data"}
    lines = [f"{k} = {toml_value(v)}" for k, v in vol.items() if k != field]
    if field == "lvm":
        lines.append(f'lvm = {{ vg = "cva", lv = "x", size = {toml_value(value)} }}')
    else:
        lines.append(f"{field} = {toml_value(value)}")
    text = 'version = 1\n[kbs]\nurl = "https://k"\n[[volumes]]\n' + "\n".join(lines) + "\n"
    try:
        parse_contract(text)
    except ContractError as exc:
        assert field in exc.field, exc


# --- round trips --------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=4096))
def test_annotation_round_trip(raw: bytes) -> None:
    value = encode_annotation(raw)
    assert value.isascii()
    assert decode_annotation(value) == raw


@SETTINGS
@given(st.binary(max_size=4096))
def test_block_image_round_trip(raw: bytes) -> None:
    img = encode_block_image(raw)
    assert len(img) % 512 == 0
    assert parse_block_image(img) == raw
    assert unwrap_document(img) == raw
    assert unwrap_document(gzip.compress(raw)) == raw


DATA = st.dictionaries(st.text(max_size=20), st.text(max_size=200), max_size=5)


@SETTINGS
@given(st.sampled_from(ALGORITHMS), DATA)
def test_valid_documents_parse_and_hash_exactly(algorithm: str, data: dict[str, str]) -> None:
    raw = initdata_doc(algorithm, data)
    initdata = parse_initdata(raw)
    assert dict(initdata.data) == data
    assert initdata.digest() == hashlib.new(algorithm, raw).digest()
    assert initdata.text().encode() == raw
    for shaped in (encode_annotation(raw).encode(), encode_block_image(raw), raw):
        assert parse_initdata(unwrap_document(shaped)).digest() == initdata.digest()


# --- logging never prints bytes -----------------------------------------------------------

NESTED = st.recursive(
    st.one_of(st.binary(min_size=16, max_size=48), st.integers(), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=16, max_size=48), NESTED)
def test_logging_never_prints_bytes(key: bytes, other: Any) -> None:
    buf = io.StringIO()
    configure_logging("debug", buf)
    try:
        get_logger("p").info("event", payload={"k": [key], "o": other}, raw=key)
    finally:
        configure_logging("info")
    out = buf.getvalue()
    assert key.hex() not in out
    json.loads(out)


# --- the CLI in-process: any file -> exit 0 with JSON, or exit 1 with one line ------------


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    blob=st.one_of(
        st.binary(max_size=1024),
        st.binary(max_size=512).map(encode_block_image),
        st.binary(max_size=512).map(lambda b: encode_annotation(b).encode()),
        st.builds(initdata_doc, st.sampled_from(ALGORITHMS), DATA),
    ),
    action=st.sampled_from(["digest", "check", "encode", "reference"]),
)
def test_cli_any_file(tmp_path: Path, capsys: Any, blob: bytes, action: str) -> None:
    from agent.cli import main

    path = tmp_path / "input"
    path.write_bytes(blob)
    argv = ["initdata", action, str(path)]
    if action == "reference":
        argv += ["--tee", "tdx"]
    code = main(argv)
    out, err = capsys.readouterr()
    if code == 0:
        assert err == "" and isinstance(json.loads(out), dict)
    else:
        assert code == 1 and out == ""
        assert err.startswith("cva: ") and err.count("\n") == 1
        assert "internal error" not in err
