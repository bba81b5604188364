"""The initdata reader on real block devices (loop devices over image files)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.initdata import InitDataError, encode_block_image, find_initdata, read_initdata_block
from luks.run import ToolError, run
from tests.conftest import run_cva

DOC = b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"cva.toml" = "x"\n'

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None, reason="needs root and losetup"
)


@contextmanager
def loop_device(tmp_path: Path, content: bytes, size: int = 1 << 20) -> Iterator[Path]:
    img = tmp_path / f"disk{len(list(tmp_path.iterdir()))}.img"
    img.write_bytes(content.ljust(size, b"\0"))
    try:
        dev = run(["losetup", "--find", "--show", "--read-only", str(img)], timeout=30)
    except ToolError as exc:
        pytest.skip(f"no loop devices here: {exc}")
    path = Path(dev.text.strip())
    try:
        yield path
    finally:
        run(["losetup", "-d", str(path)], timeout=30, check=False)


def test_reads_initdata_from_a_block_device(tmp_path: Path) -> None:
    with loop_device(tmp_path, encode_block_image(DOC)) as dev:
        assert read_initdata_block(dev) == DOC
        assert find_initdata([dev], toml_path=tmp_path / "none") == DOC
        proc = run_cva("initdata", "digest", str(dev))
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["algorithm"] == "sha256"


def test_length_past_the_end_of_the_device(tmp_path: Path) -> None:
    image = encode_block_image(DOC)
    hostile = image[:8] + struct.pack("<Q", 200_000) + image[16:]
    with loop_device(tmp_path, hostile, size=64 * 1024) as dev:
        with pytest.raises(InitDataError, match="runs past the end"):
            read_initdata_block(dev)
        proc = run_cva("initdata", "check", str(dev))
        assert proc.returncode != 0 and b"runs past the end" in proc.stderr
        assert b"Traceback" not in proc.stderr


def test_scan_skips_devices_without_the_magic(tmp_path: Path) -> None:
    with (
        loop_device(tmp_path, b"\0" * 512) as blank,
        loop_device(tmp_path, encode_block_image(DOC)) as ours,
    ):
        assert find_initdata([blank, ours], toml_path=tmp_path / "none") == DOC
