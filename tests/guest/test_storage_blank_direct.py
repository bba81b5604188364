"""The blank proof reads the medium, not the page cache (issue 21 item 5): the header region
cva copies with a buffered read is proven again with O_DIRECT before any format.

Inside the qemu guest: a loop device whose page cache remembers zeros while its backing file
(the medium) holds data written behind it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import pytest

from luks import volume
from luks.run import run
from tests.guest.storage_support import MIB, Env, loop_disk, make_volume, unique

if os.environ.get("CVA_IN_GUEST") != "1":  # before any guest-only mark is looked up
    pytest.skip("runs inside the qemu guest (make vm-test)", allow_module_level=True)

pytestmark = [pytest.mark.vm]

DATA = b"data the page cache does not know about"


def test_data_under_cached_zeros_in_the_header_region_is_refused(tmp_path: Path) -> None:
    env = Env(tmp_path / "cva")
    with loop_disk(tmp_path, 128 * MIB) as dev:
        backing = run(["losetup", "-n", "-O", "BACK-FILE", str(dev)], timeout=30).text.strip()
        # an opener held throughout: the kernel drops a block device's page cache at its last
        # close, so something (udev, a workload) must hold it for the cache to go stale
        holder = dev.open("rb")
        try:
            _stale_cache(dev, holder, Path(backing))
            vol = make_volume(unique("direct"))
            with pytest.raises(volume.VolumeRefused, match=f"non-zero data at byte {MIB}"):
                env.prepare(vol, dev)
        finally:
            holder.close()
        with Path(backing).open("rb") as f:
            f.seek(MIB)
            assert f.read(len(DATA)) == DATA  # nothing was formatted over it


def _stale_cache(dev: Path, holder: BinaryIO, backing: Path) -> None:
    assert holder.read(16 * MIB) == bytes(16 * MIB)  # the page cache now says "zeros"
    with backing.open("r+b") as f:  # the medium changes behind that cache
        f.seek(MIB)
        f.write(DATA)
        f.flush()
        os.fsync(f.fileno())
    with dev.open("rb") as f:
        f.seek(MIB)
        assert f.read(len(DATA)) == bytes(len(DATA)), "the page cache was not stale"
