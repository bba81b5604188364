"""luks.dmtable: parsing live dm tables and comparing them with the contract."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from luks import dmtable
from luks.dmtable import DmTableError
from luks.errors import StorageError

KEYREF = ":64:logon:cryptsetup:6b1f2a52-1b8a-4d6e-9a3c-0c2f0e6f9d11-d0"
PLAIN = (
    f"0 2064384 crypt aes-xts-plain64 {KEYREF} 0 254:0 32768 3 "
    "no_read_workqueue no_write_workqueue sector_size:4096\n"
)
INTEG_CRYPT = (
    "0 1900000 crypt capi:authenc(hmac(sha256),xts(aes))-plain64 "
    ":96:logon:cryptsetup:6b1f2a52-1b8a-4d6e-9a3c-0c2f0e6f9d11-d0 0 254:1 0 4 "
    "no_read_workqueue no_write_workqueue integrity:32:aead sector_size:4096\n"
)
INTEG_LOWER = (
    "0 1900000 integrity 254:0 32768 32 J 6 journal_sectors:15680 interleave_sectors:32768 "
    "buffer_sectors:128 journal_watermark:50 commit_time:10000 block_size:4096\n"
)
EXPECT = dmtable.Expected(integrity=False, device="254:0", offset_sectors=32768)
EXPECT_I = dmtable.Expected(integrity=True, device="254:0", offset_sectors=32768)


def crypt(text: str) -> dmtable.CryptTarget:
    return dmtable.parse_crypt(dmtable.single_line(text, "t"))


def test_plain_table_matches() -> None:
    c = crypt(PLAIN)
    assert c.key_bytes == 64 and c.key_in_keyring and c.sector_size == 4096
    assert dmtable.compare(EXPECT, c, None) == []


def test_integrity_table_matches() -> None:
    c = crypt(INTEG_CRYPT)
    i = dmtable.parse_integrity(dmtable.single_line(INTEG_LOWER, "t"))
    assert i.block_size == 4096 and i.tag_size == 32
    assert dmtable.compare(EXPECT_I, c, i) == []


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("aes-xts-plain64", "cipher_null-ecb", "cipher"),
        (":64:logon", ":32:logon", "key size"),
        ("sector_size:4096", "sector_size:512", "sector size"),
        (" 32768 3", " 0 3", "data offset"),
        ("254:0", "8:16", "backing device"),
        ("no_read_workqueue no_write", "allow_discards no_write", "flags"),
    ],
)
def test_plain_differences_are_named(old: str, new: str, reason: str) -> None:
    diffs = dmtable.compare(EXPECT, crypt(PLAIN.replace(old, new)), None)
    assert any(reason in d for d in diffs), diffs


def test_hex_masked_key_counts_bytes() -> None:
    line = PLAIN.replace(KEYREF, "0" * 128)
    c = crypt(line)
    assert c.key_bytes == 64 and not c.key_in_keyring


def test_integrity_missing_layer_or_wrong_contract() -> None:
    assert any(
        "no integrity layer" in d for d in dmtable.compare(EXPECT_I, crypt(INTEG_CRYPT), None)
    )
    diffs = dmtable.compare(EXPECT, crypt(INTEG_CRYPT), None)
    assert any("integrity" in d for d in diffs)
    diffs = dmtable.compare(EXPECT_I, crypt(PLAIN), None)
    assert diffs


def test_option_count_mismatch_and_bad_numbers() -> None:
    with pytest.raises(DmTableError, match="announces"):
        crypt(PLAIN.replace(" 3 no_read", " 4 no_read"))
    with pytest.raises(DmTableError):
        crypt(PLAIN.replace("0 2064384", "0 x"))
    with pytest.raises(DmTableError, match="expected a crypt"):
        crypt("0 10 linear 8:0 0\n")
    with pytest.raises(DmTableError, match="2 table lines"):
        dmtable.single_line(PLAIN + PLAIN, "t")


@given(st.text(max_size=400))
def test_any_text_parses_or_fails_cleanly(text: str) -> None:
    try:
        line = dmtable.single_line(text, "t")
        if line.target == "crypt":
            dmtable.compare(EXPECT, dmtable.parse_crypt(line), None)
        elif line.target == "integrity":
            dmtable.parse_integrity(line)
    except StorageError:
        pass
