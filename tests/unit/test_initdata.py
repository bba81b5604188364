"""agent.initdata: kata/Trustee vectors, the block-device and annotation formats, hostile input."""

from __future__ import annotations

import base64
import gzip
import hashlib
import struct
import zlib
from pathlib import Path

import pytest

from agent.contract import ContractError
from agent.errors import InputError
from agent.initdata import (
    MAX_COMPRESSED,
    MAX_DOCUMENT,
    InitData,
    InitDataError,
    decode_annotation,
    detect_format,
    encode_annotation,
    encode_block_image,
    find_initdata,
    gunzip_capped,
    load_contract,
    parse_block_image,
    parse_initdata,
    read_initdata_block,
    reference_field,
    reference_value,
    unwrap_document,
)

KATA_DIGEST = "c6694bb7a29d6f37ec72a15582e004b9f3142159682db8509a304407419a49e5"
COMPLETE_SHA384 = (
    "6605c65e6ad90dc3e0a81f72ae126157f38685abd5f3ac9c43b0076fe69dd280"
    "de8bbd794eb05ab53ea584638c4ff5ce"
)
MINIMAL = b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n'


def doc(algorithm: str = "sha256", data: str = "") -> bytes:
    return f'version = "0.1.0"\nalgorithm = "{algorithm}"\n[data]\n{data}'.encode()


def image(payload: bytes, length: int | None = None, pad: int = 512) -> bytes:
    head = struct.pack("<8sQ", b"initdata", len(payload) if length is None else length)
    out = head + payload
    return out + b"\0" * (-len(out) % pad)


# --- upstream vectors ---------------------------------------------------------------------


def test_kata_runtime_annotation_digest(vectors: Path) -> None:
    b64 = (vectors / "initdata/kata_runtime_test_annotation.b64").read_text()
    raw = decode_annotation(b64)
    assert raw == (vectors / "initdata/kata_runtime_test_annotation.decoded.toml").read_bytes()
    initdata = parse_initdata(raw)
    assert initdata.algorithm == "sha256" and initdata.version == "0.1.0"
    assert initdata.digest().hex() == KATA_DIGEST
    assert dict(initdata.data) == {"aa.toml": "", "cdh.toml": "", "policy.rego": ""}


def test_annotation_round_trip_keeps_the_digest(vectors: Path) -> None:
    raw = (vectors / "initdata/kata_runtime_test_annotation.decoded.toml").read_bytes()
    again = decode_annotation(encode_annotation(raw))
    assert again == raw
    assert parse_initdata(again).digest().hex() == KATA_DIGEST


def test_kata_default_initdata(vectors: Path) -> None:
    initdata = parse_initdata((vectors / "initdata/kata_default-initdata.toml").read_bytes())
    assert initdata.digest().hex() == (
        "5fbba2d190b4c600dc48b80802559460ecae499f76f079e9ad2ebd4e3c7eb65f"
    )
    assert dict(initdata.data) == {}


def test_kata_types_complete_initdata_references(vectors: Path) -> None:
    initdata = parse_initdata(
        (vectors / "initdata/kata_types_test_complete_initdata.toml").read_bytes()
    )
    assert initdata.algorithm == "sha384"
    assert initdata.digest().hex() == COMPLETE_SHA384
    assert set(initdata.data) == {"aa.toml", "cdh.toml"}
    assert reference_value(initdata, "tdx").hex() == COMPLETE_SHA384
    assert reference_value(initdata, "snp").hex() == COMPLETE_SHA384[:64]
    with pytest.raises(InitDataError, match='needs algorithm = "sha256"'):
        reference_value(initdata, "tpm")


def test_kata_agent_block_image_is_a_container_but_not_initdata(vectors: Path) -> None:
    path = vectors / "initdata/kata_agent_testdata_initdata.img"
    payload = read_initdata_block(path)
    assert payload == b"some content"
    assert parse_block_image(path.read_bytes()) == b"some content"
    with pytest.raises(InitDataError, match="initdata is not a TOML document"):
        parse_initdata(payload)


# --- the document -------------------------------------------------------------------------


def test_digest_is_over_the_exact_bytes() -> None:
    a = parse_initdata(MINIMAL)
    b = parse_initdata(MINIMAL.replace(b"\n[data]", b"\n\n[data]"))
    assert a.data == b.data
    assert a.digest() == hashlib.sha256(MINIMAL).digest() != b.digest()
    assert a.text() == MINIMAL.decode()


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_algorithms(algorithm: str) -> None:
    raw = doc(algorithm)
    assert parse_initdata(raw).digest() == hashlib.new(algorithm, raw).digest()


def test_raw_is_hidden_from_repr() -> None:
    assert "raw" not in repr(parse_initdata(MINIMAL))


def test_data_is_read_only() -> None:
    initdata = parse_initdata(doc(data='"x" = "y"\n'))
    with pytest.raises(TypeError):
        initdata.data["x"] = "z"  # type: ignore[index]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"version = ", "not a TOML document"),
        (b'version = "0.1.0"\nversion = "0.1.0"\n', "not a TOML document"),  # duplicate key
        (b"a = " + b"[" * 5000, "not a TOML document"),
        (
            b"a = " + b"1" * 5000,
            "not a TOML document",
        ),  # int() digit limit (a ValueError)  # nested deeper than the recursion limit
        (b'algorithm = "sha256"\n[data]\n', 'version must be "0.1.0"'),
        (doc().replace(b'"0.1.0"', b'"0.2.0"'), 'version must be "0.1.0"'),
        (doc().replace(b'"0.1.0"', b"1"), 'version must be "0.1.0"'),
        (doc("sm3"), "algorithm must be one of"),
        (doc("SHA256"), "algorithm must be one of"),
        (doc("md5"), "algorithm must be one of"),
        (b'version = "0.1.0"\nalgorithm = "sha256"\n', r"\[data\] must be a table"),
        (b'version = "0.1.0"\nalgorithm = "sha256"\ndata = "x"\n', r"\[data\] must be a table"),
        (doc(data='"aa.toml" = 1\n'), "must be a string"),
        (doc(data="x.y = 'nested'\n"), "must be a string"),
        (doc(data="[data.sub]\n"), "must be a string"),
        (b"extra = 1\n" + doc(), "key 'extra' is unknown"),
        (b" " * (MAX_DOCUMENT + 1), "limit is"),
    ],
)
def test_hostile_documents(raw: bytes, message: str) -> None:
    with pytest.raises(InitDataError, match=message) as info:
        parse_initdata(raw)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, InputError)


# --- gzip caps ----------------------------------------------------------------------------


def test_gzip_bomb_is_refused_before_it_grows() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), 9)
    assert len(bomb) < MAX_COMPRESSED
    with pytest.raises(InitDataError, match="more than"):
        gunzip_capped(bomb, what="t")


def test_document_at_the_limit_decompresses() -> None:
    assert len(gunzip_capped(gzip.compress(b"\0" * MAX_DOCUMENT), what="t")) == MAX_DOCUMENT


def test_oversized_compressed_stream_is_refused() -> None:
    with pytest.raises(InitDataError, match="gzip stream is"):
        gunzip_capped(b"\x1f\x8b" + b"\0" * MAX_COMPRESSED, what="t")


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (gzip.compress(MINIMAL)[:-9], "truncated"),
        (gzip.compress(MINIMAL)[:5], "truncated|not a valid gzip"),
        (b"", "truncated"),
        (b"not gzip at all", "not a valid gzip"),
        (gzip.compress(MINIMAL) + b"junk", "follow the gzip stream"),
        (gzip.compress(MINIMAL) + gzip.compress(MINIMAL), "follow the gzip stream"),
        (zlib.compress(MINIMAL), "not a valid gzip"),
    ],
)
def test_broken_gzip(blob: bytes, message: str) -> None:
    with pytest.raises(InitDataError, match=message):
        gunzip_capped(blob, what="t")


def test_gzip_crc_is_checked() -> None:
    blob = bytearray(gzip.compress(MINIMAL))
    blob[-8] ^= 0xFF  # CRC32 in the trailer
    with pytest.raises(InitDataError, match="not a valid gzip"):
        gunzip_capped(bytes(blob), what="t")


# --- annotation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("not base64!", "not standard base64"),
        ("abc", "not standard base64"),  # missing padding
        ("ümlaut==", "not standard base64"),
        (base64.urlsafe_b64encode(b"\xfb\xff" * 30).decode(), "not standard base64"),
        (base64.b64encode(b"plain text, not gzip").decode(), "not a valid gzip"),
        ("A" * (4 * MAX_COMPRESSED), "limit is"),
    ],
)
def test_hostile_annotations(value: str, message: str) -> None:
    with pytest.raises(InitDataError, match=message):
        decode_annotation(value)


def test_annotation_is_standard_padded_base64_of_gzip() -> None:
    value = encode_annotation(MINIMAL)
    assert gzip.decompress(base64.b64decode(value, validate=True)) == MINIMAL
    assert encode_annotation(MINIMAL) == value  # reproducible (mtime 0)


# --- block image --------------------------------------------------------------------------


def test_block_image_round_trip(tmp_path: Path) -> None:
    img = encode_block_image(MINIMAL)
    assert img[:8] == b"initdata" and len(img) % 512 == 0
    assert struct.unpack_from("<Q", img, 8)[0] == len(gzip.compress(MINIMAL, mtime=0))
    path = tmp_path / "data.img"
    path.write_bytes(img)
    assert read_initdata_block(path) == MINIMAL
    assert parse_block_image(img) == MINIMAL


def test_block_image_written_by_python_gzip_defaults(tmp_path: Path) -> None:
    # Go's runtime uses default compression and sets no name; both must read the same
    path = tmp_path / "go.img"
    path.write_bytes(image(gzip.compress(MINIMAL)))
    assert read_initdata_block(path) == MINIMAL


@pytest.mark.parametrize(
    ("img", "message"),
    [
        (b"", "shorter than the 16-byte header"),
        (b"initdata\x01", "shorter than the 16-byte header"),
        (b"INITDATA" + b"\0" * 504, "no 'initdata' magic"),
        (image(b"", length=0), "length field is 0"),
        (image(gzip.compress(MINIMAL), length=10_000), "runs past the end"),
        (image(gzip.compress(MINIMAL), length=2**64 - 1), "exceeds the limit"),
        (image(gzip.compress(MINIMAL), length=MAX_COMPRESSED + 1), "exceeds the limit"),
        (image(gzip.compress(MINIMAL), length=20), "truncated"),
        (image(b"\x1f\x8b\x08" + b"\xff" * 40), "not a valid gzip"),
        (image(gzip.compress(b"\0" * (8 << 20))), "more than"),
    ],
)
def test_hostile_block_images(tmp_path: Path, img: bytes, message: str) -> None:
    path = tmp_path / "hostile.img"
    path.write_bytes(img)
    with pytest.raises(InitDataError, match=message):
        read_initdata_block(path)
    with pytest.raises(InitDataError, match=message):
        parse_block_image(img)


def test_length_field_larger_than_the_device_is_not_allocated(tmp_path: Path) -> None:
    path = tmp_path / "small.img"
    path.write_bytes(image(b"x" * 100, length=200_000))  # under the cap, past the end
    with pytest.raises(InitDataError, match="runs past the end"):
        read_initdata_block(path)


def test_unreadable_and_odd_paths(tmp_path: Path) -> None:
    with pytest.raises(InitDataError, match="cannot open"):
        read_initdata_block(tmp_path / "missing")
    with pytest.raises(InitDataError, match="not a block device or regular file"):
        read_initdata_block(tmp_path)
    link = tmp_path / "link"
    target = tmp_path / "t.img"
    target.write_bytes(encode_block_image(MINIMAL))
    link.symlink_to(target)
    with pytest.raises(InitDataError, match="cannot open"):
        read_initdata_block(link)  # O_NOFOLLOW: the scan never follows links


# --- find_initdata ------------------------------------------------------------------------


def test_find_prefers_the_toml_written_by_kata_agent(tmp_path: Path) -> None:
    toml = tmp_path / "initdata.toml"
    toml.write_bytes(MINIMAL)
    assert find_initdata([], toml_path=toml) == MINIMAL


def test_find_scans_devices_for_the_magic(tmp_path: Path) -> None:
    other = tmp_path / "vda"
    other.write_bytes(b"\0" * 1024)
    ours = tmp_path / "vdb"
    ours.write_bytes(encode_block_image(MINIMAL))
    assert find_initdata([other, tmp_path / "gone", ours], toml_path=tmp_path / "no") == MINIMAL


def test_find_refuses_two_initdata_devices(tmp_path: Path) -> None:
    devs = []
    for name in ("vdb", "vdc"):
        dev = tmp_path / name
        dev.write_bytes(encode_block_image(MINIMAL))
        devs.append(dev)
    with pytest.raises(InitDataError, match="several devices"):
        find_initdata(devs, toml_path=tmp_path / "no")


def test_find_nothing(tmp_path: Path) -> None:
    with pytest.raises(InitDataError, match=r"no initdata.*cc_init_data"):
        find_initdata([], toml_path=tmp_path / "no")


def test_find_refuses_an_oversized_toml(tmp_path: Path) -> None:
    toml = tmp_path / "initdata.toml"
    toml.write_bytes(b"#" * (MAX_DOCUMENT + 1))
    with pytest.raises(InitDataError, match="larger than"):
        find_initdata([], toml_path=toml)


# --- reference values ---------------------------------------------------------------------


def test_reference_values_pad_truncate_and_extend() -> None:
    for algorithm, size in (("sha256", 32), ("sha384", 48), ("sha512", 64)):
        initdata = parse_initdata(doc(algorithm))
        digest = initdata.digest()
        assert len(digest) == size
        tdx = reference_value(initdata, "tdx")
        snp = reference_value(initdata, "snp")
        assert len(tdx) == 48 and len(snp) == 32
        assert tdx == (digest + bytes(48))[:48]
        assert snp == digest[:32]
    sha256 = parse_initdata(doc("sha256"))
    pcr8 = hashlib.sha256(bytes(32) + sha256.digest()).digest()
    assert reference_value(sha256, "tpm") == pcr8
    assert reference_field("tpm") == "PCR8"
    assert reference_field("tdx") == "MRCONFIGID"
    assert reference_field("snp") == "HOST_DATA"


@pytest.mark.parametrize("tee", ["sample", "sgx", "", "TDX", "az-snp-vtpm", "az-tdx-vtpm"])
def test_reference_value_unknown_tee(tee: str) -> None:
    with pytest.raises(InitDataError, match="no initdata reference"):
        reference_value(parse_initdata(MINIMAL), tee)


def test_tpm_refuses_sha512() -> None:
    with pytest.raises(InitDataError, match="PCR8"):
        reference_value(parse_initdata(doc("sha512")), "tpm")


# --- the contract inside ------------------------------------------------------------------

CONTRACT = """version = 1
[kbs]
url = "https://kbs.example"
[[volumes]]
name = "data"
key = "kbs:///default/data/luks"
disk = "serial:d1"
mount = "/data"
"""


def test_load_contract() -> None:
    initdata = parse_initdata(doc(data=f"\"cva.toml\" = '''\n{CONTRACT}'''\n"))
    contract = load_contract(initdata)
    assert contract.volumes[0].name == "data"


def test_load_contract_missing_or_invalid() -> None:
    with pytest.raises(ContractError, match=r'data\."cva.toml".*missing'):
        load_contract(parse_initdata(MINIMAL))
    bad = doc(data="\"cva.toml\" = '''\nversion = 2\n'''\n")
    with pytest.raises(ContractError, match="version"):
        load_contract(parse_initdata(bad))


def test_initdata_type() -> None:
    initdata = InitData(raw=MINIMAL, version="0.1.0", algorithm="sha256", data={})
    assert initdata.digest() == hashlib.sha256(MINIMAL).digest()


# --- detection of the shapes the document travels in --------------------------------------


def test_detect_and_unwrap_every_shape(vectors: Path) -> None:
    raw = (vectors / "initdata/kata_runtime_test_annotation.decoded.toml").read_bytes()
    shapes = {
        "toml": raw,
        "annotation": encode_annotation(raw).encode() + b"\n",
        "gzip": gzip.compress(raw),
        "image": encode_block_image(raw),
    }
    for fmt, blob in shapes.items():
        assert detect_format(blob) == fmt
        assert unwrap_document(blob) == raw
        assert unwrap_document(blob, fmt) == raw


@pytest.mark.parametrize("blob", [b"nonsense", b"QUJD", b"abcd" * 10, b"H4sI\xff"])
def test_base64_looking_text_that_is_not_gzip_is_toml(blob: bytes) -> None:
    assert detect_format(blob) == "toml"


def test_unwrap_refuses_unknown_format_and_non_ascii_annotation() -> None:
    with pytest.raises(InitDataError, match="unknown initdata format"):
        unwrap_document(MINIMAL, "yaml")
    with pytest.raises(InitDataError, match="not standard base64"):
        unwrap_document("ü".encode(), "annotation")
    with pytest.raises(InitDataError, match="limit"):
        unwrap_document(b"#" * (MAX_DOCUMENT + 1), "toml")
