"""bench.vm_storage.convert: the guest's JSON becomes results with the issue's targets."""

from __future__ import annotations

from typing import Any

from bench.vm_storage import NOTES, convert


def _doc() -> dict[str, Any]:
    plain = {"size_gib": 1, "integrity": False, "variants": ["cva", "profile", "cdh"]}
    big_int = {"size_gib": 8, "integrity": True, "variants": ["cva", "profile"]}
    io_cols = {"seq_write_mib_s": 60.0, "seq_read_mib_s": 50.0}
    io_cols |= {"rand_write_iops": 2000.0, "rand_read_iops": 3000.0}
    return {
        "plan": {
            "cases": [plain, big_int],
            "io": {"mib": 64, "ops": 2000, "rounds": 3},
        },
        "items": {
            "1g-plain/cva/create": {"seconds": 4.0, "wall_seconds": 8.0, "rss_mib": 90.0},
            "1g-plain/cva/reopen": {"seconds": 1.0, "wall_seconds": 3.0, "rss_mib": 50.0},
            "1g-plain/profile/create": {"seconds": 4.0, "rss_mib": 12.0},
            "1g-plain/profile/reopen": {"seconds": 2.0, "rss_mib": 12.0},
            "1g-plain/cdh/create": {"seconds": 30.0, "rss_mib": 1030.0},
            "1g-plain/cdh/header": {
                "PBKDF": "argon2id",
                "Memory": "1048576",
                "sector": "512 [bytes]",
            },
            "8g-int/cva/create": {"seconds": 9.0, "wall_seconds": 12.0, "rss_mib": 95.0},
            "io/cva": io_cols,
            "io/cdh": {k: v / 2 for k, v in io_cols.items()},
            "io/raw-lv": {k: v * 4 for k, v in io_cols.items()},
        },
        "errors": {"1g-plain/cdh/reopen": "RuntimeError: cryptsetup open failed (rc 2)"},
    }


def test_targets_values_and_reasons() -> None:
    results = {r.name: r for r in convert(_doc())}
    create_b = results["ready 1 GiB, integrity off: create vs (b)"]
    assert create_b.ratio == 1.0
    assert create_b.met is True  # ≤ 1.1x (b)
    create_a = results["ready 1 GiB, integrity off: create vs (a)"]
    assert create_a.ratio is not None and abs(create_a.ratio - 4 / 30) < 1e-9
    assert create_a.met is True  # ≥ 3x faster
    reopen_a = results["ready 1 GiB, integrity off: reopen vs (a)"]
    assert not reopen_a.measured
    assert "cryptsetup open failed" in reopen_a.note
    rss = results["peak RSS 1 GiB, integrity off: create"]
    assert rss.value == 90.0
    assert rss.met is True  # under 96 MiB, whatever (a) used
    assert "argon2id" in rss.note
    # 8 GiB with integrity: (a) was skipped on purpose, and says why
    skipped = results["ready 8 GiB, integrity on: create vs (a)"]
    assert not skipped.measured
    assert "skipped" in skipped.note
    # ... and (b) never ran: not measured, never silently met
    assert results["ready 8 GiB, integrity on: create vs (b)"].met is None
    seq = results["I/O sequential write: dm-crypt, cva's flags"]
    assert seq.ratio == 2.0
    assert seq.met is True
    assert any("512-byte data sectors" in text for _, text in NOTES)
    integrity_io = results[
        "I/O sequential write: dm-crypt + dm-integrity, cva's flags vs dm-crypt, cva's flags"
    ]
    assert not integrity_io.measured


def test_no_document_content_gives_no_crash() -> None:
    assert convert({}) == []


def test_zero_scan_rows() -> None:
    """Issue 14 item 4: cva's zero scan against dd's read floor (>= 0.8x), and the hand tools,
    on the first read of fresh disks and with the host's page cache warm."""
    doc = {
        "plan": {"warmup_disk": "bwarm", "cases": []},
        "items": {"zero-scan": {"bytes": 1 << 30, "dd_null_mib_s": 4000.0, "cva_mib_s": 1600.0,
                                "tool:cmp_mib_s": 90.0, "tool:dd-direct|cmp_mib_s": 110.0,
                                "cold:dd_null_mib_s": 400.0, "cold:cva_mib_s": 380.0,
                                "cold:tool:cmp_mib_s": 95.0,
                                "cold:tool:dd-direct|cmp_mib_s": 70.0}},
    }  # fmt: skip
    rows = {r.name: r for r in convert(doc)}
    cold = rows["zero scan, 1 GiB blank disk, first read: cva vs dd of=/dev/null"]
    assert cold.value == 380.0 and cold.baseline == 400.0 and cold.met
    warm = rows["zero scan, 1 GiB blank disk, host cache warm: cva vs dd of=/dev/null"]
    assert warm.value == 1600.0 and warm.baseline == 4000.0 and warm.met is False
    assert "page cache" in warm.note
    # (b) uses the fastest tool on the first read (section 1 creates on fresh disks)
    assert "(b)'s zero check" in rows["zero check by hand, first read, cmp"].note
    assert rows["zero check by hand, first read, dd-direct|cmp"].note == ""
    assert rows["zero check by hand, host cache warm, dd-direct|cmp"].note == ""
    missing = convert({"plan": {"warmup_disk": "bwarm", "cases": []}, "items": {}})
    assert [r.value for r in missing] == [None, None]
