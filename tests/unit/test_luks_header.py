"""luks.header: the LUKS2 parser and cva's allow-list, on hand-written hostile headers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from luks.header import (
    HEADER_AREA_BYTES,
    HeaderError,
    LuksHeader,
    allow_list_reasons,
    declares_integrity,
    parse_luks2,
    read_header_area,
)
from tests.luks_headers import (
    HDR_SIZE,
    UUID,
    binary_header,
    good_metadata,
    json_area,
    luks2_area,
    mutated,
)

GOOD_TOKEN = {"type": "cva", "keyslots": [], "state": "ready", "volume": "pgdata", "mac": "a" * 64}


def reasons_for(area: bytes, *, integrity: bool = False) -> list[str]:
    return allow_list_reasons(parse_luks2(area), integrity=integrity)


def rules(reasons: list[str]) -> set[str]:
    return {r.split(":", 1)[0] for r in reasons}


# --- the good profile ------------------------------------------------------------------------


def test_good_profile_passes() -> None:
    hdr = parse_luks2(luks2_area())
    assert hdr.uuid == UUID
    assert hdr.seqid == 1
    assert hdr.secondary is not None and hdr.secondary_error is None
    assert allow_list_reasons(hdr, integrity=False) == []
    assert not declares_integrity(hdr)


def test_good_integrity_profile_passes() -> None:
    hdr = parse_luks2(luks2_area(good_metadata(integrity=True)))
    assert allow_list_reasons(hdr, integrity=True) == []
    assert declares_integrity(hdr)


def test_good_profile_with_cva_token_passes() -> None:
    meta = mutated(lambda m: m["tokens"].update({"0": dict(GOOD_TOKEN)}))
    hdr = parse_luks2(luks2_area(meta))
    assert allow_list_reasons(hdr, integrity=False) == []
    assert [tid for tid, _ in hdr.cva_tokens()] == ["0"]


def test_allowed_config_flags_pass() -> None:
    meta = mutated(
        lambda m: m["config"].update({"flags": ["no-read-workqueue", "no-write-workqueue"]})
    )
    assert reasons_for(luks2_area(meta)) == []


# --- hostile headers: each refused with a reason naming the rule ------------------------------


def _ks(m: dict[str, Any]) -> dict[str, Any]:
    return m["keyslots"]["0"]  # type: ignore[no-any-return]


def _seg(m: dict[str, Any]) -> dict[str, Any]:
    return m["segments"]["0"]  # type: ignore[no-any-return]


def _dg(m: dict[str, Any]) -> dict[str, Any]:
    return m["digests"]["0"]  # type: ignore[no-any-return]


def _second_keyslot(m: dict[str, Any]) -> None:
    ks = json.loads(json.dumps(_ks(m)))
    ks["area"]["offset"] = str(32768 + 258048)
    m["keyslots"]["1"] = ks
    _dg(m)["keyslots"] = ["0", "1"]


HOSTILE: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    # json-c vs Python differentials: json-c reads numbers from strings, truncates at NUL
    ("iterations as a string", lambda m: _ks(m)["kdf"].update(iterations="1000"), "keyslot-kdf"),
    ("NUL inside a key", lambda m: m.update({"keyslots\u0000": {}}), "json-fields"),
    (
        "NUL inside the cipher",
        lambda m: _seg(m).update(encryption="aes-xts-plain64\u0000cipher_null"),
        "segment-cipher",
    ),
    ("sector size as a string", lambda m: _seg(m).update(sector_size="4096"), "sector-size"),
    # CVE-2025-59054 / -58356: null ciphers
    (
        "null keyslot cipher",
        lambda m: _ks(m)["area"].update(encryption="cipher_null-ecb"),
        "keyslot-cipher",
    ),
    (
        "null alias keyslot cipher",
        lambda m: _ks(m)["area"].update(encryption="null"),
        "keyslot-cipher",
    ),
    (
        "null segment cipher",
        lambda m: _seg(m).update(encryption="cipher_null-ecb"),
        "segment-cipher",
    ),
    ("null alias segment cipher", lambda m: _seg(m).update(encryption="null"), "segment-cipher"),
    ("weak segment cipher ecb", lambda m: _seg(m).update(encryption="aes-ecb"), "segment-cipher"),
    (
        "weak segment cipher cbc-plain",
        lambda m: _seg(m).update(encryption="aes-cbc-plain"),
        "segment-cipher",
    ),
    (
        "weak keyslot cipher des",
        lambda m: _ks(m)["area"].update(encryption="des-cbc-essiv:md5"),
        "keyslot-cipher",
    ),
    ("256-bit xts key", lambda m: _ks(m).update(key_size=32), "keyslot-key-size"),
    ("short keyslot area key", lambda m: _ks(m)["area"].update(key_size=16), "keyslot-cipher"),
    ("512-byte sectors", lambda m: _seg(m).update(sector_size=512), "sector-size"),
    (
        "segment offset 0 (skips layout check)",
        lambda m: _seg(m).update(offset="0"),
        "segment-offset",
    ),
    ("moved segment", lambda m: _seg(m).update(offset="33554432"), "segment-offset"),
    ("fixed-size segment", lambda m: _seg(m).update(size="1048576"), "segment-size"),
    ("iv tweak", lambda m: _seg(m).update(iv_tweak="8"), "segment-iv-tweak"),
    ("linear segment", lambda m: _seg(m).update(type="linear"), "segment-type"),
    ("second segment", lambda m: m["segments"].update({"1": dict(_seg(m))}), "segment-count"),
    ("second keyslot", _second_keyslot, "keyslot-count"),
    ("no keyslot", lambda m: m["keyslots"].clear(), "keyslot-count"),
    (
        "huge pbkdf2 iterations",
        lambda m: _ks(m)["kdf"].update(iterations=4_000_000_000),
        "keyslot-kdf",
    ),
    ("too few pbkdf2 iterations", lambda m: _ks(m)["kdf"].update(iterations=1), "keyslot-kdf"),
    ("bool iterations", lambda m: _ks(m)["kdf"].update(iterations=True), "keyslot-kdf"),
    (
        "argon2id huge memory",
        lambda m: _ks(m).update(
            kdf={"type": "argon2id", "time": 4000, "memory": 4194304, "cpus": 4, "salt": "AAAA"}
        ),
        "keyslot-kdf",
    ),
    (
        "argon2i",
        lambda m: _ks(m).update(
            kdf={"type": "argon2i", "time": 4, "memory": 1048576, "cpus": 4, "salt": "AAAA"}
        ),
        "keyslot-kdf",
    ),
    ("pbkdf2 sha1", lambda m: _ks(m)["kdf"].update(hash="sha1"), "keyslot-kdf"),
    ("huge digest iterations", lambda m: _dg(m).update(iterations=2**31), "digest-kdf"),
    ("af stripes 1", lambda m: _ks(m)["af"].update(stripes=1), "keyslot-af"),
    ("af hash sha1", lambda m: _ks(m)["af"].update(hash="sha1"), "keyslot-af"),
    ("keyslot area overlaps JSON", lambda m: _ks(m)["area"].update(offset="16384"), "keyslot-area"),
    (
        "keyslot area overlaps the data",
        lambda m: _ks(m)["area"].update(offset="16580608"),
        "keyslot-area",
    ),
    ("keyslot area oversized", lambda m: _ks(m)["area"].update(size="16744448"), "keyslot-area"),
    (
        "keyslot area offset not a uint64 string",
        lambda m: _ks(m)["area"].update(offset=32768),
        "keyslot-area",
    ),
    ("keyslot type reencrypt", lambda m: _ks(m).update(type="reencrypt"), "keyslot-type"),
    (
        "reencrypt requirements",
        lambda m: m["config"].update(requirements={"mandatory": ["online-reencrypt-v2"]}),
        "requirements",
    ),
    ("unknown config flag", lambda m: m["config"].update(flags=["allow-discards"]), "config-flags"),
    ("other json_size", lambda m: m["config"].update(json_size="28672"), "config"),
    ("unknown top-level field", lambda m: m.update(extra={}), "json-fields"),
    ("unknown keyslot field", lambda m: _ks(m).update(priority=2), "json-fields"),
    ("unknown segment field", lambda m: _seg(m).update(flags=["backup-previous"]), "json-fields"),
    ("unknown digest field", lambda m: _dg(m).update(x=1), "json-fields"),
    ("unknown config field", lambda m: m["config"].update(x="1"), "json-fields"),
    ("missing digests", lambda m: m.pop("digests"), "json-fields"),
    ("digest bound to another keyslot", lambda m: _dg(m).update(keyslots=["1"]), "digest-binding"),
    ("digest bound to no segment", lambda m: _dg(m).update(segments=[]), "digest-binding"),
    ("second digest", lambda m: m["digests"].update({"1": dict(_dg(m))}), "digest-count"),
    (
        "unknown token type",
        lambda m: m["tokens"].update({"0": {"type": "systemd-tpm2", "keyslots": ["0"]}}),
        "token-type",
    ),
    (
        "luks2-keyring token",
        lambda m: m["tokens"].update(
            {"0": {"type": "luks2-keyring", "keyslots": ["0"], "key_description": "x"}}
        ),
        "token-type",
    ),
    (
        "second cva token",
        lambda m: m["tokens"].update({"0": dict(GOOD_TOKEN), "1": dict(GOOD_TOKEN)}),
        "token-count",
    ),
    (
        "cva token with extra field",
        lambda m: m["tokens"].update({"0": {**GOOD_TOKEN, "extra": 1}}),
        "token-fields",
    ),
    (
        "cva token bound to a keyslot",
        lambda m: m["tokens"].update({"0": {**GOOD_TOKEN, "keyslots": ["0"]}}),
        "token-fields",
    ),
    (
        "cva token unknown state",
        lambda m: m["tokens"].update({"0": {**GOOD_TOKEN, "state": "formatted"}}),
        "token-fields",
    ),
    (
        "cva token bad mac shape",
        lambda m: m["tokens"].update({"0": {**GOOD_TOKEN, "mac": "zz"}}),
        "token-fields",
    ),
    (
        "integrity the contract did not ask for",
        lambda m: _seg(m).update(
            integrity={
                "type": "hmac(sha256)",
                "journal_encryption": "none",
                "journal_integrity": "none",
            }
        ),
        "segment-integrity",
    ),
]


@pytest.mark.parametrize(
    ("change", "rule"), [(c, r) for _, c, r in HOSTILE], ids=[n for n, _, _ in HOSTILE]
)
def test_hostile_metadata_refused_naming_the_rule(
    change: Callable[[dict[str, Any]], None], rule: str
) -> None:
    reasons = reasons_for(luks2_area(mutated(change)))
    assert rule in rules(reasons), reasons
    assert all(isinstance(r, str) and "\n" not in r for r in reasons)


def test_every_reason_is_listed_not_just_the_first() -> None:
    def change(m: dict[str, Any]) -> None:
        _ks(m)["area"]["encryption"] = "cipher_null-ecb"
        _seg(m)["encryption"] = "cipher_null-ecb"
        _seg(m)["sector_size"] = 512
        _ks(m)["kdf"]["iterations"] = 10**9

    got = rules(reasons_for(luks2_area(mutated(change))))
    assert {"keyslot-cipher", "segment-cipher", "sector-size", "keyslot-kdf"} <= got


def test_null_cipher_reason_says_why() -> None:
    reasons = reasons_for(luks2_area(mutated(lambda m: _seg(m).update(encryption="null"))))
    assert any("null cipher" in r for r in reasons)


def test_integrity_required_but_absent() -> None:
    reasons = reasons_for(luks2_area(), integrity=True)
    assert "segment-integrity" in rules(reasons)
    assert "keyslot-key-size" in rules(reasons)


def test_integrity_wrong_algorithm() -> None:
    meta = mutated(lambda m: _seg(m)["integrity"].update(type="crc32c"), integrity=True)
    assert "segment-integrity" in rules(reasons_for(luks2_area(meta), integrity=True))


# --- binary header level -------------------------------------------------------------------


def test_copies_with_different_json_refused() -> None:
    other = mutated(lambda m: _seg(m).update(encryption="cipher_null-ecb"))
    reasons = reasons_for(luks2_area(good_metadata(), secondary_metadata=other))
    assert "header-copies" in rules(reasons)


def test_copies_with_different_seqid_refused() -> None:
    reasons = reasons_for(luks2_area(secondary={"seqid": 7}))
    assert any(r.startswith("header-copies") and "seqid" in r for r in reasons)


def test_copies_with_different_uuid_refused() -> None:
    reasons = reasons_for(luks2_area(secondary={"uuid": "00000000-0000-4000-8000-000000000000"}))
    assert any(r.startswith("header-copies") and "uuid" in r for r in reasons)


def test_bad_secondary_checksum_refused() -> None:
    hdr = parse_luks2(luks2_area(secondary={"bad_checksum": True}))
    assert hdr.secondary is None and hdr.secondary_error
    assert "header-copies" in rules(allow_list_reasons(hdr, integrity=False))


def test_missing_secondary_refused() -> None:
    area = bytearray(luks2_area())
    area[HDR_SIZE : 2 * HDR_SIZE] = bytes(HDR_SIZE)
    assert "header-copies" in rules(reasons_for(bytes(area)))


def test_bad_primary_checksum_is_a_header_error() -> None:
    with pytest.raises(HeaderError, match="checksum"):
        parse_luks2(luks2_area(primary={"bad_checksum": True}))


def test_tampered_json_is_a_checksum_error() -> None:
    area = bytearray(luks2_area())
    pos = area.index(b"aes-xts-plain64", 4096)
    area[pos : pos + 15] = b"cipher_null-ecb"
    with pytest.raises(HeaderError, match="checksum"):
        parse_luks2(bytes(area))


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"version": 1}, "version"),
        ({"hdr_size": 12345}, "hdr_size"),
        ({"checksum_alg": "sha1"}, "checksum"),
        ({"offset": 4096}, "hdr_offset"),
    ],
)
def test_bad_binary_fields_are_header_errors(opts: dict[str, Any], match: str) -> None:
    with pytest.raises(HeaderError, match=match):
        parse_luks2(luks2_area(primary=opts, secondary={"hdr_size": HDR_SIZE}))


def test_not_luks() -> None:
    with pytest.raises(HeaderError, match="magic"):
        parse_luks2(bytes(HEADER_AREA_BYTES))
    with pytest.raises(HeaderError, match="truncated"):
        parse_luks2(b"LUKS\xba\xbe")


def test_luks1_header_refused() -> None:
    raw = bytearray(4096)
    raw[0:6] = b"LUKS\xba\xbe"
    raw[6:8] = (1).to_bytes(2, "big")
    with pytest.raises(HeaderError, match="version 1"):
        parse_luks2(bytes(raw))


def test_other_metadata_size_refused() -> None:
    area = luks2_area(
        mutated(lambda m: m["config"].update(json_size=str(32768 - 4096))),
        primary={"hdr_size": 32768},
    )
    assert {"metadata-size", "keyslot-area"} <= rules(reasons_for(area))


def test_label_and_subsystem_refused() -> None:
    area = luks2_area(primary={"label": "evil"}, secondary={"label": "evil"})
    assert "label" in rules(reasons_for(area))


def test_bad_uuid_refused() -> None:
    area = luks2_area(primary={"uuid": "../../x"}, secondary={"uuid": "../../x"})
    assert "uuid" in rules(reasons_for(area))


def test_json_padding_garbage_refused() -> None:
    assert "json-padding" in rules(reasons_for(luks2_area(padding=b"hidden")))


def test_short_area_refused() -> None:
    assert "header-area" in rules(reasons_for(luks2_area(full=False)))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b'{"a":1,"a":2}', "duplicate"),
        (b"[1,2]", "not an object"),
        (b'{"a":NaN}', "NaN"),
        (b"\xff\xfe", "UTF-8"),
        (b"{" * 50 + b"}" * 50, "nested"),
        (b'{"keyslots":', "invalid JSON"),
    ],
)
def test_bad_json_is_a_header_error(text: bytes, match: str) -> None:
    area = binary_header(json_area(text)) + binary_header(json_area(text), secondary=True)
    with pytest.raises(HeaderError, match=match):
        parse_luks2(area)


DEEP = b'{"a":' * 200_000 + b"1" + b"}" * 200_000


def _big_area(text: bytes) -> bytes:
    size = 4 * 1024 * 1024
    return binary_header(json_area(text), hdr_size=size) + binary_header(
        json_area(text), secondary=True, hdr_size=size
    )


def test_very_deep_json_refused_before_parsing() -> None:
    with pytest.raises(HeaderError, match="nested deeper"):
        parse_luks2(_big_area(DEEP))


def test_recursion_error_becomes_header_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import luks.header

    monkeypatch.setattr(luks.header, "MAX_JSON_DEPTH", 10**9)
    with pytest.raises(HeaderError, match="nested too deeply"):
        parse_luks2(_big_area(DEEP))


def test_json_without_terminator() -> None:
    area = binary_header(b"x" * (HDR_SIZE - 4096))
    with pytest.raises(HeaderError, match="NUL"):
        parse_luks2(area)


def test_deep_nesting_inside_strings_is_fine() -> None:
    meta = mutated(lambda m: _seg(m).update(encryption="[" * 100))
    assert "segment-cipher" in rules(reasons_for(luks2_area(meta)))


def test_read_header_area(tmp_path: Any) -> None:
    path = tmp_path / "img"
    path.write_bytes(b"x" * 100)
    assert read_header_area(str(path)) == b"x" * 100
    with path.open("wb") as f:
        f.truncate(HEADER_AREA_BYTES + 4096)
    assert len(read_header_area(str(path))) == HEADER_AREA_BYTES


# --- properties ----------------------------------------------------------------------------


def _parse_or_error(data: bytes) -> LuksHeader | None:
    try:
        return parse_luks2(data)
    except HeaderError as exc:
        assert exc.message and "\n" not in exc.message
        return None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=40000))
def test_any_bytes_parse_or_header_error(data: bytes) -> None:
    hdr = _parse_or_error(data)
    if hdr is not None:
        assert isinstance(allow_list_reasons(hdr, integrity=False), list)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_any_bytes_with_luks_magic_parse_or_header_error(tail: bytes) -> None:
    _parse_or_error(b"LUKS\xba\xbe\x00\x02" + tail)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=HDR_SIZE - 4096 - 1))
def test_any_json_area_with_valid_checksum(text: bytes) -> None:
    area = binary_header(json_area(text.replace(b"\x00", b""))) + binary_header(
        json_area(text.replace(b"\x00", b"")), secondary=True
    )
    hdr = _parse_or_error(area)
    if hdr is not None:
        assert isinstance(allow_list_reasons(hdr, integrity=True), list)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["keyslots", "segments", "digests", "tokens", "config"]),
    st.sampled_from(["0", "1", "x"]),
    _json_values,
)
def test_any_json_values_in_sections_never_crash(section: str, key: str, value: Any) -> None:
    meta = good_metadata()
    meta[section] = {key: value} if section != "config" else value
    text = json.dumps(meta, separators=(",", ":")).encode()
    if len(text) >= HDR_SIZE - 4096:
        return
    hdr = _parse_or_error(luks2_area(meta, full=False))
    if hdr is not None:
        reasons = allow_list_reasons(hdr, integrity=False)
        assert all(isinstance(r, str) for r in reasons)
        assert reasons  # a short area is always refused, and so is anything off-profile


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=2 * HDR_SIZE - 1), st.integers(1, 255))
def test_any_flipped_metadata_byte_is_refused(pos: int, xor: int) -> None:
    area = bytearray(luks2_area(full=False))
    area[pos] ^= xor
    hdr = _parse_or_error(bytes(area))
    if hdr is not None:
        assert pos >= HDR_SIZE  # only the secondary copy can break without a HeaderError
        assert "header-copies" in rules(allow_list_reasons(hdr, integrity=False))
