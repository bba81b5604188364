"""luks.mapping_record: the identity a mapping was activated from (issue 21 item 1)."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from luks import mapping_record as mr

UUID = "0b5e4c1a-9d1f-4a8e-8c3b-2f6d7e8a9b0c"
MAPPER = "cva_pgdata"
RECORD = mr.MappingRecord(UUID, bytes(range(32)), 7, "253:4", complete=True)


def test_round_trip_and_private_atomic_file(tmp_path: Path) -> None:
    mr.save(tmp_path, "pgdata", RECORD)
    path = tmp_path / "mappings" / "pgdata.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not path.with_name("pgdata.json.tmp").exists()
    assert mr.load(tmp_path, "pgdata") == RECORD
    mr.drop(tmp_path, "pgdata")
    mr.drop(tmp_path, "pgdata")  # idempotent
    assert mr.load(tmp_path, "pgdata") is None


def test_a_symlinked_record_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "mappings").mkdir()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(RECORD.to_json())
    (tmp_path / "mappings" / "pgdata.json").symlink_to(elsewhere)
    with pytest.raises(mr.MappingRecordError, match="cannot read"):
        mr.load(tmp_path, "pgdata")


def test_names_that_are_not_volume_names_are_refused(tmp_path: Path) -> None:
    for bad in ("../x", "a/b", "", "A", "-x"):
        with pytest.raises(mr.MappingRecordError, match="not a contract volume name"):
            mr.record_path(tmp_path, bad)


def test_dm_uuid_is_libcryptsetups_form() -> None:
    assert mr.dm_uuid(UUID, MAPPER) == ("CRYPT-LUKS2-0b5e4c1a9d1f4a8e8c3b2f6d7e8a9b0c-cva_pgdata")
    assert mr.luks_uuid_of_dm(mr.dm_uuid(UUID, MAPPER), MAPPER) == UUID
    assert mr.luks_uuid_of_dm(mr.dm_uuid(UUID, MAPPER), "cva_other") is None
    assert mr.luks_uuid_of_dm("CRYPT-PLAIN-cva_pgdata", MAPPER) is None
    assert mr.luks_uuid_of_dm("", MAPPER) is None


@pytest.mark.parametrize(
    ("record", "live", "device", "reason"),
    [
        (None, mr.dm_uuid(UUID, MAPPER), "253:4", "no record"),
        (
            dataclasses.replace(RECORD, complete=False),
            mr.dm_uuid(UUID, MAPPER),
            "253:4",
            "did not finish",
        ),
        (RECORD, mr.dm_uuid(UUID, MAPPER), "253:5", "recorded on device 253:4"),
        (
            RECORD,
            mr.dm_uuid("11111111-2222-4333-8444-555555555555", MAPPER),
            "253:4",
            "is not the recorded header's",
        ),
        (RECORD, "", "253:4", "'none'"),
        (RECORD, mr.dm_uuid(UUID, "cva_other"), "253:4", "is not the recorded header's"),
    ],
)
def test_reuse_needs_a_complete_record_naming_the_live_dm_uuid(
    record: mr.MappingRecord | None, live: str, device: str, reason: str
) -> None:
    why = mr.reuse_refusal(record, live_dm_uuid=live, mapper=MAPPER, device=device)
    assert why is not None
    assert reason in why


def test_reuse_with_the_matching_record() -> None:
    live = mr.dm_uuid(UUID, MAPPER)
    assert mr.reuse_refusal(RECORD, live_dm_uuid=live, mapper=MAPPER, device="253:4") is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{}",
        RECORD.to_json().replace('"v": 1', '"v": 2'),
        RECORD.to_json().replace(UUID, UUID.upper()),
        RECORD.to_json().replace('"seq": 7', '"seq": -1'),
        RECORD.to_json().replace('"seq": 7', '"seq": true'),
        RECORD.to_json().replace('"seq": 7', '"seq": 7.0'),
        RECORD.to_json().replace('"complete": true', '"complete": 1'),
        RECORD.to_json().replace('"253:4"', '"sda"'),
        RECORD.to_json().replace(bytes(range(32)).hex(), "00"),
        RECORD.to_json()[:-1] + ', "extra": 1}',
        "[" * 100000,
    ],
)
def test_anything_but_a_record_reads_as_no_record(text: str) -> None:
    assert mr.parse_record(text) is None


def test_an_oversized_file_reads_as_no_record(tmp_path: Path) -> None:
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "pgdata.json").write_text(" " * 5000 + RECORD.to_json())
    assert mr.load(tmp_path, "pgdata") is None


@given(st.binary(max_size=512))
def test_parse_never_raises_on_bytes(data: bytes) -> None:
    result = mr.parse_record(data.decode("utf-8", "replace"))
    assert result is None or isinstance(result, mr.MappingRecord)


@given(
    st.uuids(version=4).map(str),
    st.binary(min_size=32, max_size=32),
    st.integers(0, (1 << 63) - 1),
    st.booleans(),
)
def test_every_record_round_trips(uuid: str, digest: bytes, seq: int, complete: bool) -> None:
    record = mr.MappingRecord(uuid, digest, seq, "8:16", complete)
    assert mr.parse_record(record.to_json()) == record
