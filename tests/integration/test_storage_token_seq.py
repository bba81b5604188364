"""The sequence in cva's MAC'd token (luks.token `seq`) on image files with the real
libcryptsetup: round trip, the MAC covers it, tokens made before it read as 0 and get one at
the next write, hostile values refused, and the ready write bumps it from the validated copy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from luks import libcryptsetup as lc
from luks import volume
from luks.header import TOKEN_SEQ_MAX, allow_list_reasons, parse_luks2, read_header_area
from luks.libcryptsetup import CryptDevice, header_copy
from luks.secret import Secret
from luks.spec import VolumeSpec
from luks.token import (
    TokenError,
    derive_keys,
    make_token,
    next_sequence,
    token_mac,
    verified_token,
)
from luks.volume_plan import CrashWindow
from tests.luks_headers import good_metadata, luks2_area

try:
    lc._library()
except lc.CryptError:
    pytest.skip("libcryptsetup.so.12 not installed", allow_module_level=True)

MIB = 1 << 20
SECRET = bytes(range(1, 65))
NAME = "pgdata"


@dataclass(frozen=True)
class _Spec:
    name: str = NAME
    filesystem: Literal["ext4", "xfs"] = "ext4"
    lvm: None = None
    create: bool = True
    integrity: bool = False
    read_only: bool = False


def _spec() -> VolumeSpec:
    return _Spec()


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with p.open("wb") as f:
        f.truncate(64 * MIB)
    return p


def _keys() -> tuple[Secret, Secret]:
    return derive_keys(Secret(SECRET), NAME)


def _set_token(img: Path, token: dict[str, Any]) -> None:
    """Store `token` (any JSON object) as token 0 through libcryptsetup (both copies)."""
    with CryptDevice.open(str(img)) as cd:
        cd.load()
        cd.token_json_set(0, json.dumps(token, separators=(",", ":")))


def _token_on_disk(img: Path) -> dict[str, Any]:
    with CryptDevice.open(str(img)) as cd:
        cd.load()
        text = cd.token_json_get(0)
    assert text is not None
    doc = json.loads(text)
    assert isinstance(doc, dict)
    return doc


def _formatted(img: Path) -> tuple[Secret, Secret]:
    passphrase, mac_key = _keys()
    volume._format(img, _spec(), passphrase, mac_key)
    return passphrase, mac_key


def _seq(img: Path, mac_key: Secret) -> int:
    return verified_token(parse_luks2(read_header_area(str(img))), NAME, mac_key).seq


def _mark_ready(img: Path, mac_key: Secret) -> bytes:
    area = read_header_area(str(img))
    with header_copy(area) as copy:
        return volume._mark_ready(img, copy, area, _spec(), mac_key)


def test_seq_round_trip_and_every_ready_write_bumps_it(img: Path) -> None:
    _, mac_key = _formatted(img)
    assert _token_on_disk(img)["seq"] == 0  # the initializing token
    assert verified_token(parse_luks2(read_header_area(str(img))), NAME, mac_key).state == (
        "initializing"
    )
    area = _mark_ready(img, mac_key)  # the first ready token: seq 1
    assert read_header_area(str(img)) == area
    assert _token_on_disk(img)["seq"] == 1
    got = verified_token(parse_luks2(area), NAME, mac_key)
    assert (got.state, got.seq) == ("ready", 1)
    _mark_ready(img, mac_key)  # what a read-write open writes
    _mark_ready(img, mac_key)
    assert _seq(img, mac_key) == 3
    hdr = parse_luks2(read_header_area(str(img)))
    assert allow_list_reasons(hdr, integrity=False) == []


def test_seq_near_the_maximum_survives_libcryptsetup(img: Path) -> None:
    """json-c (libcryptsetup's JSON) keeps integers up to 2^64-1 exact."""
    _, mac_key = _formatted(img)
    hdr = parse_luks2(read_header_area(str(img)))
    _set_token(img, make_token(hdr, "ready", NAME, mac_key, seq=TOKEN_SEQ_MAX - 1))
    assert _seq(img, mac_key) == TOKEN_SEQ_MAX - 1
    _mark_ready(img, mac_key)
    assert _token_on_disk(img)["seq"] == TOKEN_SEQ_MAX
    assert _seq(img, mac_key) == TOKEN_SEQ_MAX
    with pytest.raises(TokenError, match="maximum"):  # never wraps to a lower value
        _mark_ready(img, mac_key)
    assert _seq(img, mac_key) == TOKEN_SEQ_MAX


@pytest.mark.parametrize("seq", [0, 1, 7, 1 << 32])
def test_mac_covers_seq(img: Path, seq: int) -> None:
    _, mac_key = _formatted(img)
    hdr = parse_luks2(read_header_area(str(img)))
    token = make_token(hdr, "ready", NAME, mac_key, seq=seq)
    _set_token(img, token)
    assert _seq(img, mac_key) == seq
    for flipped in (seq + 1, seq ^ 1, 0 if seq else 1):
        _set_token(img, {**token, "seq": flipped})  # the host rewrites seq, keeps the MAC
        with pytest.raises(TokenError, match="MAC does not match"):
            _seq(img, mac_key)
    stripped = {k: v for k, v in token.items() if k != "seq"}  # the host strips seq
    _set_token(img, stripped)
    with pytest.raises(TokenError, match="MAC does not match"):
        _seq(img, mac_key)


def test_token_without_seq_reads_as_zero_and_gets_one_at_the_next_write(img: Path) -> None:
    """A volume made before the sequence existed: its token has no seq and the old MAC."""
    _, mac_key = _formatted(img)
    hdr = parse_luks2(read_header_area(str(img)))
    old = {
        "type": "cva",
        "keyslots": [],
        "state": "ready",
        "volume": NAME,
        "mac": token_mac(hdr, "ready", NAME, mac_key),  # the MAC without seq
    }
    _set_token(img, old)
    assert "seq" not in _token_on_disk(img)
    got = verified_token(parse_luks2(read_header_area(str(img))), NAME, mac_key)
    assert (got.state, got.seq) == ("ready", 0)
    # the old MAC with a seq added does not verify (the host cannot add one either)
    _set_token(img, {**old, "seq": 0})
    with pytest.raises(TokenError, match="MAC does not match"):
        _seq(img, mac_key)
    _set_token(img, old)
    _mark_ready(img, mac_key)  # the next write (a read-write open) migrates it
    assert _token_on_disk(img)["seq"] == 1
    assert _seq(img, mac_key) == 1


def _header_with_seq(seq: object) -> Any:
    token = {"type": "cva", "keyslots": [], "state": "ready", "volume": NAME, "mac": "0" * 64}
    meta = {**good_metadata(), "tokens": {"0": {**token, "seq": seq}}}
    return parse_luks2(luks2_area(meta))


HOSTILE = [-1, TOKEN_SEQ_MAX + 1, 1 << 80, 1.0, 1.5, True, False, "1", "0", None, [], {}]


@pytest.mark.parametrize("seq", HOSTILE, ids=repr)
def test_hostile_seq_values_refused(seq: object) -> None:
    _, mac_key = _keys()
    hdr = _header_with_seq(seq)
    reasons = allow_list_reasons(hdr, integrity=False)
    assert any("seq" in r for r in reasons), reasons
    with pytest.raises(TokenError, match="seq"):
        verified_token(hdr, NAME, mac_key)


@pytest.mark.parametrize("seq", [-1, TOKEN_SEQ_MAX + 1, 1.0, True, "1", None])
def test_hostile_seq_values_never_written_or_macd(seq: Any) -> None:
    _, mac_key = _keys()
    hdr = _header_with_seq(0)
    with pytest.raises(TokenError, match="seq"):
        make_token(hdr, "ready", NAME, mac_key, seq=seq)
    if seq is not None:
        with pytest.raises(TokenError, match="seq"):
            token_mac(hdr, "ready", NAME, mac_key, seq)
        with pytest.raises(TokenError, match="seq"):
            next_sequence(seq)


def test_hostile_seq_on_disk_through_libcryptsetup_is_refused(img: Path) -> None:
    _, mac_key = _formatted(img)
    for seq in (-1, "1", True, 1.5):
        _set_token(img, {**_token_on_disk(img), "seq": seq})
        hdr = parse_luks2(read_header_area(str(img)))
        assert allow_list_reasons(hdr, integrity=False) != []
        obs = volume._observe(read_header_area(str(img)), _spec(), mac_key)
        assert obs.kind == "invalid"


def test_a_cut_seq_write_leaves_copies_that_differ_only_in_the_token(
    img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crash window SEQ_HALF_WRITTEN: the secondary copy holds seq N+1, the primary still N;
    the two copies never get handed to libcryptsetup as they are (luks.volume's rule for
    copies that disagree decides), and each alone is a MAC-verified header of this volume."""
    _, mac_key = _formatted(img)
    _mark_ready(img, mac_key)
    area = read_header_area(str(img))

    class Crash(Exception):
        pass

    def hook(w: CrashWindow) -> None:
        if w == CrashWindow.SEQ_HALF_WRITTEN:
            raise Crash

    monkeypatch.setattr(volume, "crash_hook", hook)
    with header_copy(area) as copy, pytest.raises(Crash):
        volume._mark_ready(
            img, copy, area, _spec(), mac_key, half_window=CrashWindow.SEQ_HALF_WRITTEN
        )
    torn = read_header_area(str(img))
    assert torn[:16384] == area[:16384]  # the primary: untouched, seq 1
    obs = volume._observe(torn, _spec(), mac_key)
    assert obs.kind == "invalid"
    assert all(r.startswith("header-copies") or "copies" in r for r in obs.reasons), obs
