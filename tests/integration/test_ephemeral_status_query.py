"""Errors that tell the truth (issue 13 item 4): on a machine without device-mapper (this
host), an ephemeral volume's "does the mapping exist?" query fails; that failure is its own
refusal, never "a device-mapper device ... already exists"."""

from __future__ import annotations

from pathlib import Path

import pytest

from luks import ephemeral
from luks import libcryptsetup as lc


def _dm_query_fails() -> bool:
    try:  # main answered "invalid"; now the failed query raises
        return lc.active_status("cva-eph-probe") not in ("inactive", "active", "busy")
    except lc.CryptError:
        return True


@pytest.mark.skipif(not _dm_query_fails(), reason="device-mapper works here: nothing to fail")
def test_failed_status_query_is_not_reported_as_an_existing_mapping(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    spec = ephemeral.EphemeralSpec(
        device=disk,
        mapper="cva-eph-0123456789abcdef",
        header=tmp_path / "headers" / "cva-eph-0123456789abcdef.header",
        integrity=False,
        mount_dir=None,
    )
    with pytest.raises(ephemeral.EphemeralRefused) as exc:
        ephemeral.create_ephemeral(spec)
    text = exc.value.message
    assert "already exists" not in text
    assert "cannot query device-mapper for cva-eph-0123456789abcdef" in text
    assert "nothing was written" in text
    assert not spec.header.exists()  # refused before anything was made
    assert disk.read_bytes() == bytes(64 << 20)
