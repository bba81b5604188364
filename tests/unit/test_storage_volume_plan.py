"""luks.volume_plan: the state machine's decisions, with no device in sight."""

from __future__ import annotations

import pytest

from luks import blank
from luks.errors import StorageError, StorageInputError
from luks.volume_plan import (
    CrashWindow,
    HeaderObservation,
    classify,
    decide,
    expected_table,
    fs_complete,
    fs_size_bytes,
    initializing_action,
    mapper_name,
)

BLANK = blank.BlankVerdict(True, "")
NOT_BLANK = blank.BlankVerdict(False, "non-zero data in first MiB of the data area")


def test_blank_and_create_formats() -> None:
    assert decide(HeaderObservation("zero"), BLANK, create=True).action == "create"


def test_create_false_forbids_formatting() -> None:
    d = decide(HeaderObservation("zero"), BLANK, create=False)
    assert d.action == "refuse" and "create = false" in d.reason


def test_wiped_header_over_data_is_refused_with_hint() -> None:
    d = decide(HeaderObservation("zero"), NOT_BLANK, create=True)
    assert d.action == "refuse" and "not blank" in d.reason and "blkdiscard" in d.reason


@pytest.mark.parametrize("create", [True, False])
def test_invalid_header_never_formats(create: bool) -> None:
    obs = HeaderObservation("invalid", ("keyslot 0 cipher cipher_null is not allowed",))
    d = decide(obs, None, create=create)
    assert d.action == "refuse" and "cipher_null" in d.reason


def test_states() -> None:
    assert (
        decide(HeaderObservation("cva", token_state="initializing"), None, create=False).action
        == "finish"
    )
    assert decide(HeaderObservation("cva", token_state="ready"), None, create=True).action == "open"
    assert (
        decide(HeaderObservation("cva", token_state="weird"), None, create=True).action == "refuse"
    )
    with pytest.raises(ValueError):
        decide(HeaderObservation("zero"), None, create=True)


def _raise(msg: str) -> object:
    raise StorageInputError(msg)


def test_classify_paths() -> None:
    ok = {"parse": lambda a: "hdr", "allow_reasons": lambda h: [], "verify": lambda h: "ready"}
    assert classify(bytes(4096), **ok).kind == "zero"  # type: ignore[arg-type]
    assert classify(b"\x01" + bytes(10), **ok) == HeaderObservation("cva", token_state="ready")  # type: ignore[arg-type]
    bad_parse = dict(ok, parse=lambda a: _raise("bad magic"))
    assert classify(b"\x01", **bad_parse).reasons == ("bad magic",)  # type: ignore[arg-type]
    bad_allow = dict(ok, allow_reasons=lambda h: ["two keyslots", "weak cipher"])
    assert classify(b"\x01", **bad_allow).reasons == ("two keyslots", "weak cipher")  # type: ignore[arg-type]
    bad_mac = dict(ok, verify=lambda h: _raise("MAC does not verify"))
    obs = classify(b"\x01", **bad_mac)  # type: ignore[arg-type]
    assert obs.kind == "invalid" and "MAC" in obs.reasons[0]
    # a bad MAC (wrong key or forged token) is never "blank", whatever create says
    assert decide(obs, None, create=True).action == "refuse"


def test_classify_lets_programming_errors_through() -> None:
    def boom(area: bytes) -> object:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        classify(b"\x01", parse=boom, allow_reasons=lambda h: [], verify=lambda h: "ready")
    assert issubclass(StorageInputError, StorageError)


def test_expected_table_and_names() -> None:
    e = expected_table(integrity=True, backing_devno="253:4")
    assert e.offset_sectors == 32768 and e.sector_size == 4096 and e.integrity
    assert mapper_name("pgdata") == "cva_pgdata"
    assert mapper_name("pg-data") == "cva_pg_data"


def test_mapper_names_never_equal_an_lvm_dm_name() -> None:
    # vg "cva" + lv "pgdata" is "cva-pgdata" in device-mapper: the DESIGN example must work
    from luks import lvm

    for vg, lv, vol in [
        ("cva", "pgdata", "pgdata"),
        ("cva", "pg-data", "pg-data"),
        ("cva_pg", "data", "pg-data"),
    ]:
        assert mapper_name(vol) != lvm.dm_path(vg, lv).name
    assert len({w.value for w in CrashWindow}) == len(CrashWindow)


def _init(**kw: object) -> str:
    facts: dict[str, object] = {
        "filesystem": "ext4",
        "superblock_readable": True,
        "filesystem_complete": False,
        "formatted_now": False,
        "create": True,
        "integrity": False,
    }
    facts.update(kw)
    d = initializing_action(**facts)  # type: ignore[arg-type]
    if d.action == "refuse":
        assert "initializing-needs-blank-data" in d.reason and "blkdiscard" in d.reason
        assert "\n" not in d.reason
    return d.action


def test_initializing_never_formats_over_a_complete_filesystem() -> None:
    for create in (True, False):
        assert _init(filesystem_complete=True, create=create) == "mark-ready"
    assert _init(formatted_now=True) == "mkfs"  # this run proved the disk blank


def test_replayed_initializing_header_never_means_mkfs_with_create_false() -> None:
    # issue 13 item 3: "initializing", first block damaged, contract create = false
    assert _init(create=False) == "refuse"
    assert _init(create=False, data_area_zero=True) == "refuse"
    d = initializing_action(
        filesystem="xfs", superblock_readable=True, filesystem_complete=False,
        formatted_now=False, create=False, integrity=False,
    )  # fmt: skip
    assert "create = false" in d.reason and "xfs" in d.reason


def test_initializing_with_unreadable_or_nonzero_data_is_refused() -> None:
    for create in (True, False):
        assert _init(superblock_readable=False, create=create) == "refuse"
    assert _init(superblock_readable=False, formatted_now=True) == "refuse"
    d = initializing_action(
        filesystem="ext4", superblock_readable=True, filesystem_complete=False,
        formatted_now=False, create=True, integrity=False, data_area_zero=False,
        first_nonzero=16 << 20,
    )  # fmt: skip
    assert d.action == "refuse" and str(16 << 20) in d.reason


def test_initializing_recovery_formats_only_a_proven_zero_data_area() -> None:
    assert _init() == "prove-zero"  # the caller scans the raw data area first
    assert _init(data_area_zero=True) == "mkfs"
    assert _init(data_area_zero=False) == "refuse"
    # with integrity the raw area holds dm-integrity's own metadata: no proof possible
    assert _init(integrity=True) == "refuse"
    assert _init(integrity=True, data_area_zero=True) == "refuse"
    assert _init(integrity=True, formatted_now=True) == "mkfs"


def test_fs_complete_needs_magic_and_xfs_not_in_progress() -> None:
    ext = bytearray(4096)
    ext[1024 + 56 : 1024 + 58] = b"\x53\xef"
    ext[1024 + 4 : 1024 + 8] = (1000).to_bytes(4, "little")
    ext[1024 + 24 : 1024 + 28] = (2).to_bytes(4, "little")
    assert fs_complete("ext4", bytes(ext)) and not fs_complete("xfs", bytes(ext))
    assert fs_size_bytes("ext4", bytes(ext)) == 1000 * 4096
    xfs = bytearray(4096)
    xfs[0:4] = b"XFSB"
    xfs[4:8] = (4096).to_bytes(4, "big")
    xfs[8:16] = (77824).to_bytes(8, "big")
    assert fs_complete("xfs", bytes(xfs))
    xfs[126] = 1  # sb_inprogress: mkfs.xfs was interrupted
    assert not fs_complete("xfs", bytes(xfs))
    assert not fs_complete("ext4", bytes(4096))
