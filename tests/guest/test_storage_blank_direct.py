"""The blank proof reads the medium, not the page cache (issue 21 item 5): the header region
cva copies with a buffered read is proven again with O_DIRECT before any format.

Inside the qemu guest: a loop device whose page cache remembers zeros while its backing file
(the medium) holds data written behind it.
"""

from __future__ import annotations

import os
from pathlib import Path

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
        with dev.open("rb") as f:  # the guest's page cache of the disk now says "zeros"
            assert f.read(16 * MIB) == bytes(16 * MIB)
        with Path(backing).open("r+b") as f:  # the medium changes behind that cache
            f.seek(MIB)
            f.write(DATA)
            f.flush()
            os.fsync(f.fileno())
        with dev.open("rb") as f:
            f.seek(MIB)
            cached = f.read(len(DATA))
        if cached == DATA:
            pytest.skip("the loop device's page cache was dropped in between")
        vol = make_volume(unique("direct"))
        with pytest.raises(volume.VolumeRefused, match=f"non-zero data at byte {MIB}"):
            env.prepare(vol, dev)
        with Path(backing).open("rb") as f:
            f.seek(MIB)
            assert f.read(len(DATA)) == DATA  # nothing was formatted over it
