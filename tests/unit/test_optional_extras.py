"""tpm2-pytss and pyudev are the extras `tpm` and `udev` (issue 23): imported only where used,
and their absence is one refusal naming the extra to install, not an ImportError."""

from __future__ import annotations

import sys

import pytest

from evidence.errors import AttesterUnavailable
from luks.errors import StorageError


def test_missing_tpm_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from evidence import tpm

    monkeypatch.setitem(sys.modules, "tpm2_pytss", None)  # import raises ImportError
    with pytest.raises(AttesterUnavailable, match=r"confidential-volume-agent\[tpm\]"):
        tpm._tss()


def test_missing_udev_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from luks import disk

    monkeypatch.setitem(sys.modules, "pyudev", None)
    ref = type("Ref", (), {"kind": "serial", "value": "nosuchdisk"})()
    with pytest.raises(StorageError, match=r"confidential-volume-agent\[udev\]"):
        disk.wait_for_disk(ref, 0.1)
