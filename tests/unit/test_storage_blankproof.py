"""luks.blankproof: the full proof on image files (data anywhere is found), the sampled look
and what it cannot see, the cursor (keyed by device identity, hostile documents ignored), and
`cva luks blank` (JSON, exit codes 0/1/2)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent import cli
from luks import blank, blankproof

MIB = 1 << 20
SIZE = 96 * MIB


def _image(tmp_path: Path, size: int = SIZE) -> Path:
    img = tmp_path / "disk.img"
    with img.open("wb") as f:
        f.truncate(size)
    return img


def _poke(img: Path, offset: int, data: bytes = b"\x01") -> None:
    with img.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def test_blank_image_is_proven_in_full(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    proof = blankproof.prove_blank(
        _image(tmp_path), progress=lambda d, t: seen.append((d, t)), progress_every=0
    )
    assert proof.blank and proof.mode == "full"
    assert proof.bytes_scanned == SIZE and proof.first_nonzero_offset is None
    assert seen[0] == (0, SIZE) and seen[-1] == (SIZE, SIZE)


@pytest.mark.parametrize(
    "offset",
    [0, 4096, 16 * MIB, 64 * MIB, 64 * MIB + 12345, SIZE - 1],
    ids=["first-byte", "first-block", "data-start", "64MiB", "64MiB-odd", "last-byte"],
)
def test_one_byte_anywhere_is_not_blank(tmp_path: Path, offset: int) -> None:
    img = _image(tmp_path)
    _poke(img, offset, b"\x80")
    proof = blankproof.prove_blank(img)
    assert not proof.blank
    assert proof.first_nonzero_offset == offset and proof.bytes_scanned == offset
    assert f"byte {offset}" in proof.reason


def test_sampled_misses_data_between_samples_full_does_not(tmp_path: Path) -> None:
    """What `blank_check = "sampled"` cannot see, stated as a test: 64 MiB + 12345 lies
    between two samples of a 96 MiB disk (the issue's 'data from 64 MiB' case)."""
    img = _image(tmp_path)
    _poke(img, 64 * MIB + 12345, b"data")
    sampled = blankproof.prove_blank(img, mode="sampled")
    assert sampled.blank and sampled.bytes_scanned < SIZE
    assert "sampled only" in sampled.reason
    assert not blankproof.prove_blank(img).blank


def test_sampled_finds_the_last_mib(tmp_path: Path) -> None:
    img = _image(tmp_path)
    _poke(img, SIZE - 1)
    proof = blankproof.prove_blank(img, mode="sampled")
    assert not proof.blank and proof.first_nonzero_offset == SIZE - 1


def test_signature_refuses_before_any_scan(tmp_path: Path) -> None:
    img = _image(tmp_path)
    _poke(img, 1024 + 56, b"\x53\xef")  # an ext4 superblock magic
    proof = blankproof.prove_blank(img)
    assert not proof.blank and proof.bytes_scanned == 0
    assert "ext2/3/4 superblock" in proof.reason


def test_the_full_proof_reads_every_byte_from_zero_with_o_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21 item 5: the header region is proven by the O_DIRECT scan too, never taken from
    a caller's buffered copy (the page cache may remember zeros the medium no longer holds)."""
    img = _image(tmp_path)
    scanned: list[tuple[int, int]] = []
    real_scan = blank.scan_zeros

    def spy(path: Path, offset: int, length: int, **kw: Any) -> blank.ZeroScan:
        scanned.append((offset, length))
        return real_scan(path, offset, length, **kw)

    monkeypatch.setattr(blank, "scan_zeros", spy)
    seen: list[int] = []
    proof = blankproof.prove_blank(img, progress=lambda d, _t: seen.append(d))
    assert proof.blank and seen[0] == 0
    assert scanned == [(0, SIZE)]
    assert "known_zero_prefix" not in inspect.signature(blankproof.prove_blank).parameters


# ---- the cursor ---------------------------------------------------------------------------

IDENT = blankproof.DeviceIdentity("253:4", SIZE, 41)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"devno": "253:4", "size": SIZE, "diskseq": 41, "scanned": 8 * MIB}, 8 * MIB),
        ({"devno": "253:4", "size": SIZE, "diskseq": 41, "scanned": SIZE}, SIZE),
        ({"devno": "253:4", "size": SIZE, "diskseq": 42, "scanned": 8 * MIB}, 0),  # new attach
        ({"devno": "253:4", "size": SIZE + 4096, "diskseq": 41, "scanned": 8 * MIB}, 0),
        ({"devno": "253:5", "size": SIZE, "diskseq": 41, "scanned": 8 * MIB}, 0),
        ({"devno": "253:4", "size": SIZE, "diskseq": 41, "scanned": SIZE + 4096}, 0),
        ({"devno": "253:4", "size": SIZE, "diskseq": 41, "scanned": -4096}, 0),
        ({"devno": "253:4", "size": SIZE, "diskseq": 41, "scanned": 8 * MIB + 1}, 0),
        ({"devno": "253:4", "size": SIZE, "diskseq": 41, "scanned": True}, 0),
        ({"devno": "253:4", "size": SIZE, "diskseq": 41, "scanned": 8.0 * MIB}, 0),
        ({"devno": "253:4", "size": SIZE, "diskseq": 41}, 0),
        ([1, 2], 0),
        ("253:4", 0),
        (None, 0),
    ],
)
def test_cursor_resumes_only_the_very_same_device(doc: object, expected: int) -> None:
    assert blankproof.cursor_offset(doc, IDENT) == expected


def test_cursor_round_trip_and_garbage(tmp_path: Path) -> None:
    blankproof.save_cursor(tmp_path, IDENT, 12 * MIB)
    assert blankproof.load_cursor(tmp_path, IDENT) == 12 * MIB
    path = tmp_path / blankproof.cursor_name(IDENT)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    other = blankproof.DeviceIdentity("253:4", SIZE, 99)  # the same devno attached again
    assert blankproof.load_cursor(tmp_path, other) == 0
    path.write_text("[" * 100000)  # our own tmpfs file, but never trusted blindly
    assert blankproof.load_cursor(tmp_path, IDENT) == 0


def test_a_regular_file_gets_no_cursor(tmp_path: Path) -> None:
    img = _image(tmp_path)
    assert blankproof.device_identity(img) is None
    cursors = tmp_path / "cursors"
    assert blankproof.prove_blank(img, cursor_dir=cursors).blank
    assert not cursors.exists() or not list(cursors.iterdir())


def test_scan_is_aligned_and_rejects_bad_ranges(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="aligned"):
        blank.scan_zeros(_image(tmp_path), 100, 4096)


# ---- cva luks blank -----------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object], str]:
    code = cli.main(["luks", "blank", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out else {}), err


def test_cli_blank_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = _cli(capsys, str(_image(tmp_path)))
    assert code == 0
    assert doc == {
        "blank": True, "mode": "full", "size_bytes": SIZE, "bytes_scanned": SIZE,
        "first_nonzero_offset": None, "reasons": [],
    }  # fmt: skip


def test_cli_not_blank_and_sampled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _image(tmp_path)
    _poke(img, 64 * MIB + 12345)
    code, doc, _ = _cli(capsys, str(img))
    assert code == 1 and doc["blank"] is False and doc["first_nonzero_offset"] == 64 * MIB + 12345
    code, doc, _ = _cli(capsys, str(img), "--sampled")
    assert code == 0 and doc["mode"] == "sampled" and doc["reasons"]


def test_cli_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, err = _cli(capsys, str(tmp_path / "missing.img"))
    assert code == 2 and doc == {}
    assert err.count("\n") == 1 and "cannot prove" in err
    small = _image(tmp_path, 1 * MIB)
    code, doc, err = _cli(capsys, str(small), "--sampled")  # too small for the sample plan
    assert code == 2 and "smaller than" in err
    os.chmod(small, 0)
    if os.geteuid() != 0:
        code, doc, err = _cli(capsys, str(small))
        assert code == 2


def _losetup(img: Path) -> str:
    try:
        return subprocess.run(
            ["losetup", "--find", "--show", str(img)],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pytest.skip("needs root and loop devices")


def _lodetach(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], check=False, timeout=30)


def test_cursor_resumes_on_the_same_attach_and_never_after_a_swap(tmp_path: Path) -> None:
    """A scan resumes from its cursor only on the very same attach of the device: the same
    loop device given another backing file (a host swapping the disk) has a new diskseq and
    is scanned again from the start."""
    if os.geteuid() != 0:
        pytest.skip("needs root and loop devices")
    img = _image(tmp_path)
    dev = _losetup(img)
    cursors = tmp_path / "cursors"
    try:
        ident = blankproof.device_identity(Path(dev))
        if ident is None:
            pytest.skip("kernel without diskseq")
        assert ident.size == SIZE
        proof = blankproof.prove_blank(Path(dev), cursor_dir=cursors)
        assert proof.blank and blankproof.load_cursor(cursors, ident) == SIZE
        blankproof.save_cursor(cursors, ident, 32 * MIB)  # as if killed at 32 MiB
        _poke(img, 8 * MIB)  # behind the cursor: this attach does not look again (residual)
        proof = blankproof.prove_blank(Path(dev), cursor_dir=cursors)
        assert proof.blank and proof.resumed_from == 32 * MIB
        blankproof.save_cursor(cursors, ident, 32 * MIB)
    finally:
        _lodetach(dev)
    dev = _losetup(img)  # the "swapped" disk: maybe the same loop number, a new diskseq
    try:
        again = blankproof.device_identity(Path(dev))
        assert again is not None and again.diskseq != ident.diskseq
        proof = blankproof.prove_blank(Path(dev), cursor_dir=cursors)
        assert not proof.blank and proof.first_nonzero_offset == 8 * MIB
        assert proof.resumed_from == 0
        blankproof.drop_cursor(cursors, Path(dev))
        assert blankproof.load_cursor(cursors, again) == 0
    finally:
        _lodetach(dev)
