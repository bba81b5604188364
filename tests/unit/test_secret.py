from __future__ import annotations

import pickle

import pytest

from luks.secret import Secret, wipe, wiping


def test_secret_wipes_and_hides() -> None:
    raw = bytearray(b"k" * 32)
    s = Secret(raw)
    assert raw == bytearray(32), "the source bytearray is consumed (zeroed)"
    assert "kkkk" not in repr(s) and "kkkk" not in str(s) and "32" in repr(s)
    buf = s.data
    with s:
        assert bytes(s.data) == b"k" * 32
    assert len(s) == 0 and buf == bytearray()


def test_wipe_zeroes_in_place() -> None:
    b = bytearray(b"secret")
    view = memoryview(b)
    wipe(b)
    assert bytes(view) == b"\0" * 6
    with wiping(bytearray(b"abc")) as w:
        keep = w
    assert keep == bytearray(3)


def test_secret_cannot_be_pickled_and_compares_in_constant_time() -> None:
    s = Secret(b"abc")
    with pytest.raises(TypeError):
        pickle.dumps(s)
    assert s.equals(b"abc") and not s.equals(b"abd")
