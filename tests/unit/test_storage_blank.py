"""luks.blank: the sampling plan, the verdict, and the real probe on image files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luks import blank
from luks.errors import StorageError

MIB = 1024 * 1024


def test_plan_covers_header_edges_and_spread() -> None:
    size = 1024 * MIB
    plan = blank.sample_plan(size)
    assert plan[0] == blank.Sample(0, 16 * MIB, "header region")
    assert plan[1].offset == 16 * MIB
    assert any(s.offset + s.length == size for s in plan)
    spread = [s for s in plan if s.what.startswith("data sample")]
    assert len(spread) == blank.SPREAD_SAMPLES
    for s in plan:
        assert s.offset % 4096 == 0
        assert s.offset >= 0 and s.offset + s.length <= size


@given(st.integers(min_value=blank.MIN_DEVICE_BYTES, max_value=1 << 44))
def test_plan_stays_inside_device(size: int) -> None:
    size -= size % 512
    if size < blank.MIN_DEVICE_BYTES:
        return
    plan = blank.sample_plan(size)
    offsets = [s.offset for s in plan]
    assert len(offsets) == len(set(offsets))
    for s in plan:
        assert s.length > 0 and s.offset + s.length <= size


def test_too_small_device_is_refused() -> None:
    with pytest.raises(StorageError, match="smaller than"):
        blank.sample_plan(blank.MIN_DEVICE_BYTES - 1)


def test_verdict_needs_no_signature_and_zero_samples() -> None:
    assert blank.verdict(blank.BlankEvidence(100, (), ())).blank
    v = blank.verdict(blank.BlankEvidence(100, ("type crypto_LUKS",), ()))
    assert not v.blank and "crypto_LUKS" in v.reason
    s = blank.Sample(16 * MIB, MIB, "first MiB of the data area")
    v = blank.verdict(blank.BlankEvidence(100, (), (s,)))
    assert not v.blank and "first MiB" in v.reason


def test_magics_and_blkid_export() -> None:
    head = bytearray(8192)
    head[0:6] = b"LUKS\xba\xbe"
    head[512:520] = b"LABELONE"
    found = blank.magics_in(bytes(head))
    assert "LUKS header" in found and "LVM2 physical volume label" in found
    assert blank.magics_in(bytes(8192)) == ()
    assert blank.parse_blkid_types("DEVNAME=x\nTYPE=ext4\nPTTYPE=gpt\n") == (
        "type ext4",
        "pttype gpt",
    )


def _image(tmp_path: Path, size: int = 64 * MIB) -> Path:
    p = tmp_path / "disk.img"
    with p.open("wb") as f:
        f.truncate(size)
    return p


def test_probe_blank_sparse_image(tmp_path: Path) -> None:
    assert blank.probe_blank(_image(tmp_path)).blank


def test_wiped_header_over_ciphertext_is_not_blank(tmp_path: Path) -> None:
    img = _image(tmp_path)
    with img.open("r+b") as f:  # "old ciphertext" in the middle of the data area, header zeroed
        f.seek(40 * MIB)
        f.write(os.urandom(MIB))
    v = blank.probe_blank(img)
    assert not v.blank and "non-zero" in v.reason


def test_data_in_last_mib_is_not_blank(tmp_path: Path) -> None:
    img = _image(tmp_path)
    with img.open("r+b") as f:
        f.seek(64 * MIB - 4096)
        f.write(b"\x01")
    assert not blank.probe_blank(img).blank


def test_luks_header_is_not_blank(tmp_path: Path) -> None:
    img = _image(tmp_path)
    subprocess.run(
        [
            "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
            "--pbkdf-force-iterations", "1000", "--luks2-metadata-size", "16k",
            "--luks2-keyslots-size", "16352k", "--key-file", "-", str(img),
        ],
        input=b"x" * 32, check=True, capture_output=True,
    )  # fmt: skip
    v = blank.probe_blank(img)
    assert not v.blank
    assert "crypto_LUKS" in v.reason or "LUKS header" in v.reason


def test_ext4_signature_is_not_blank(tmp_path: Path) -> None:
    img = _image(tmp_path)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    v = blank.probe_blank(img)
    assert not v.blank and "ext4" in v.reason


def test_range_equals_compares_chunk_by_chunk(tmp_path: Path) -> None:

    data = os.urandom(3 * blank.READ_CHUNK + 17)
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 100 + data + b"tail")
    fd = os.open(img, os.O_RDONLY)
    try:
        assert blank.range_equals(fd, 100, data)
        assert blank.range_equals(fd, 100, memoryview(data))
        changed = bytearray(data)
        changed[2 * blank.READ_CHUNK + 5] ^= 1
        assert not blank.range_equals(fd, 100, changed)
        assert not blank.range_equals(fd, 100, data + b"x" * 10)  # runs past the end
        assert blank.range_equals(fd, 0, b"")
    finally:
        os.close(fd)


# ---- the full zero scan (issue 13 item 3) -------------------------------------------------


def _scan_image(tmp_path: Path, size: int, writes: dict[int, bytes] | None = None) -> Path:
    p = tmp_path / "scan.img"
    with p.open("wb") as f:
        f.truncate(size)
        for off, data in (writes or {}).items():
            f.seek(off)
            f.write(data)
    return p


def test_scan_zeros_reads_every_byte(tmp_path: Path) -> None:
    size = 3 * blank.SCAN_CHUNK + 12345
    assert blank.scan_zeros(_scan_image(tmp_path, size), 0, size).zero
    for where in (0, blank.SCAN_CHUNK - 1, blank.SCAN_CHUNK, 2 * blank.SCAN_CHUNK + 77, size - 1):
        img = _scan_image(tmp_path, size, {where: b"\x01"})
        scan = blank.scan_zeros(img, 0, size)
        assert not scan.zero and scan.first_nonzero == where, where
        img.unlink()


def test_scan_zeros_offset_length_and_progress(tmp_path: Path) -> None:
    size = 2 * blank.SCAN_CHUNK
    img = _scan_image(tmp_path, size, {4095: b"x", size - 1: b"y"})
    seen: list[tuple[int, int]] = []
    scan = blank.scan_zeros(
        img, 4096, size - 4097, progress=lambda d, t: seen.append((d, t)), progress_every=0
    )
    assert scan.zero and scan.bytes_scanned == size - 4097
    assert seen[-1] == (size - 4097, size - 4097)
    assert blank.scan_zeros(img, 4096, size - 4096).first_nonzero == size - 1


def test_scan_zeros_short_device_is_an_error_not_zero(tmp_path: Path) -> None:
    img = _scan_image(tmp_path, blank.SCAN_CHUNK)
    with pytest.raises(OSError, match="short read"):
        blank.scan_zeros(img, 0, blank.SCAN_CHUNK + 4096)
    with pytest.raises(ValueError):
        blank.scan_zeros(img, 100, 10)


# ---- the parallel scan: the lowest failure wins, whatever the workers' order -------------


@settings(max_examples=60, deadline=None)
@given(
    size_blocks=st.integers(min_value=1, max_value=64),
    tail=st.integers(min_value=0, max_value=4095),
    writes=st.lists(st.integers(min_value=0), max_size=5),
    workers=st.integers(min_value=1, max_value=6),
    chunk_blocks=st.integers(min_value=1, max_value=4),
)
def test_parallel_scan_finds_the_first_nonzero_byte(
    tmp_path_factory: pytest.TempPathFactory,
    size_blocks: int,
    tail: int,
    writes: list[int],
    workers: int,
    chunk_blocks: int,
) -> None:
    size = size_blocks * blank.SCAN_ALIGN + tail
    where = sorted({w % size for w in writes})
    img = _scan_image(tmp_path_factory.mktemp("scan"), size, dict.fromkeys(where, b"\x80"))
    seen: list[int] = []
    scan = blank.scan_zeros(
        img, 0, size, workers=workers, chunk=chunk_blocks * blank.SCAN_ALIGN,
        progress=lambda done, _total: seen.append(done), progress_every=0,
    )  # fmt: skip
    if where:
        assert scan.first_nonzero == where[0] and scan.bytes_scanned == where[0]
        assert all(done <= where[0] for done in seen)  # progress = a proven-zero prefix only
    else:
        assert scan.zero and scan.bytes_scanned == size and seen[-1] == size
    assert seen == sorted(seen)


def test_parallel_scan_error_before_data_raises_and_data_before_an_error_wins(
    tmp_path: Path,
) -> None:
    chunk = blank.SCAN_ALIGN
    img = _scan_image(tmp_path, 8 * chunk, {3 * chunk + 5: b"\x01"})
    # the file ends at 8 blocks: asking for 12 is a short read after the data -> the data
    scan = blank.scan_zeros(img, 0, 12 * chunk, workers=4, chunk=chunk)
    assert scan.first_nonzero == 3 * chunk + 5
    img.write_bytes(bytes(2 * chunk))
    with pytest.raises(OSError, match="short read"):
        blank.scan_zeros(img, 0, 12 * chunk, workers=4, chunk=chunk)


def test_scan_arguments_out_of_range(tmp_path: Path) -> None:
    img = _scan_image(tmp_path, blank.SCAN_ALIGN)
    for kwargs in ({"workers": 0}, {"chunk": 100}, {"chunk": 2 * blank.SCAN_CHUNK}):
        with pytest.raises(ValueError, match="out of range"):
            blank.scan_zeros(img, 0, blank.SCAN_ALIGN, **kwargs)  # type: ignore[arg-type]


def test_is_zero_and_range_equals_fast_paths() -> None:
    assert blank.is_zero(b"") and blank.is_zero(bytes(blank.SCAN_CHUNK + 7))
    buf = bytearray(blank.SCAN_CHUNK + 7)
    buf[-1] = 1
    assert not blank.is_zero(buf) and not blank.is_zero(memoryview(buf))


def test_read_range_stops_at_the_end_of_a_short_file(tmp_path: Path) -> None:
    img = tmp_path / "short.img"
    data = os.urandom(3 * blank.READ_CHUNK + 5)
    img.write_bytes(data)
    fd = os.open(img, os.O_RDONLY)
    try:
        assert blank.read_range(fd, 7, len(data)) == data[7:]  # asks past the end
        assert blank.read_range(fd, 0, 10) == data[:10]
        assert blank.read_range(fd, len(data), 10) == b""
    finally:
        os.close(fd)
