"""luks.rotation on image files with the real libcryptsetup (no device-mapper): a ready volume
under the previous key is moved to the new key (two keyslots only in the rotation state, one
after), every crash window is cut in-process and the next settle finishes it, at every point at
least one of the two keys opens the header as libcryptsetup reads it, and what the host could do
instead (a forged rotation state, a swap mid-rotation, a wrong previous key) is refused."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from agent import contract
from luks import rotation, volume
from luks.header import allow_list_reasons, parse_luks2
from luks.libcryptsetup import CryptDevice, WrongPassphrase, header_copy
from luks.secret import Secret
from luks.token import derive_keys, key_id, verified_token
from luks.volume_plan import CrashWindow, HeaderObservation, VolumeRefused

MIB = 1 << 20
OLD = bytes(range(1, 65))
NEW = bytes(range(101, 165))
OTHER = bytes(range(51, 115))
NAME = "pgdata"


class Cut(Exception):
    pass


def make_volume(*, read_only: bool = False, integrity: bool = False) -> contract.Volume:
    return contract.Volume(
        name=NAME,
        key=contract.KbsResourceUri("default", NAME, "luks2"),
        disk=contract.DiskRef("serial", "pgdisk"),
        lvm=None,
        filesystem="ext4",
        mount="/var/lib/data",
        containers=(),
        create=True,
        integrity=integrity,
        read_only=read_only,
    )


@pytest.fixture
def img(tmp_path: Path) -> Path:
    """A ready cva volume header under OLD (seq 1), as luks.volume makes it."""
    p = tmp_path / "disk.img"
    with p.open("wb") as f:
        f.truncate(64 * MIB)
    vol = make_volume()
    passphrase, mac_key = derive_keys(Secret(OLD), NAME)
    volume._format(p, vol, passphrase, mac_key)
    area = volume._read_area(p)
    with header_copy(area) as copy:
        volume._mark_ready(p, copy, area, vol, mac_key)
    return p


def _observe(area: bytes, secret: bytes) -> HeaderObservation:
    _, mac_key = derive_keys(Secret(secret), NAME)
    return volume._observe(area, make_volume(), mac_key)


def _settle(
    img: Path,
    *,
    previous: bytes | None = OLD,
    cut_at: CrashWindow | None = None,
    read_only: bool = False,
    fetched: list[int] | None = None,
) -> rotation.Settled:
    area = volume._read_area(img)

    def window(w: CrashWindow) -> None:
        if w is cut_at:
            raise Cut(w.value)

    def fetch() -> Secret:
        if fetched is not None:
            fetched.append(1)
        assert previous is not None
        return Secret(bytearray(previous))

    return rotation.settle(
        img,
        area,
        _observe(area, NEW),
        name=NAME,
        integrity=False,
        read_only=read_only,
        secret=Secret(bytearray(NEW)),
        previous=fetch if previous is not None else None,
        observe=lambda a: _observe(a, NEW),
        window=window,
    )


def _opens(img: Path, secret: bytes) -> bool:
    """Whether the plain cryptsetup CLI opens the on-disk header with this key's passphrase
    (on a copy of the header region: libcryptsetup repairs disagreeing copies when it loads)."""
    passphrase, _ = derive_keys(Secret(secret), NAME)
    probe = img.with_name("probe.img")
    with probe.open("wb") as f:
        f.truncate(32 * MIB)
        f.write(volume._read_area(img))
    proc = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(probe)],
        input=bytes(passphrase.data),
        capture_output=True,
        timeout=120,
        check=False,
    )
    return proc.returncode == 0


def _keyslots(area: bytes) -> list[str]:
    return sorted(parse_luks2(area).section("keyslots"))


def test_rotation_moves_a_volume_to_the_new_key(img: Path) -> None:
    before = parse_luks2(volume._read_area(img))
    fetched: list[int] = []
    settled = _settle(img, fetched=fetched)
    assert fetched == [1]
    assert (settled.obs.kind, settled.obs.token_state) == ("cva", "ready")
    assert settled.rekeyed == rotation.Rekeyed(key_id(Secret(OLD), NAME), key_id(Secret(NEW), NAME))
    disk = volume._read_area(img)
    assert disk == settled.area
    hdr = parse_luks2(disk)
    assert _keyslots(disk) == ["1"] and allow_list_reasons(hdr, integrity=False) == []
    assert hdr.uuid == before.uuid
    assert hdr.section("segments") == before.section("segments")  # no re-encryption
    _, new_mac = derive_keys(Secret(NEW), NAME)
    assert verified_token(hdr, NAME, new_mac).seq == 3  # N=1 -> rotating 2 -> ready 3
    assert _opens(img, NEW) and not _opens(img, OLD)
    # settled: a second settle does nothing and fetches nothing
    fetched.clear()
    again = _settle(img, fetched=fetched)
    assert again.rekeyed is None and fetched == [] and volume._read_area(img) == disk


def test_a_second_rotation_goes_back_to_slot_0(img: Path) -> None:
    _settle(img)
    area = volume._read_area(img)
    settled = rotation.settle(
        img,
        area,
        _observe(area, OTHER),
        name=NAME,
        integrity=False,
        read_only=False,
        secret=Secret(bytearray(OTHER)),
        previous=lambda: Secret(bytearray(NEW)),
        observe=lambda a: _observe(a, OTHER),
        window=lambda _w: None,
    )
    assert settled.obs.token_state == "ready" and _keyslots(settled.area) == ["0"]
    assert _opens(img, OTHER) and not _opens(img, NEW)


WINDOWS = [
    CrashWindow.REKEY_SLOT_ADDED_HALF,
    CrashWindow.REKEY_SLOT_ADDED,
    CrashWindow.REKEY_OLD_REMOVED_HALF,
    CrashWindow.REKEY_DONE,
]


@pytest.mark.parametrize("window", WINDOWS, ids=[w.value for w in WINDOWS])
def test_every_cut_is_finished_by_the_next_open(img: Path, window: CrashWindow) -> None:
    with pytest.raises(Cut):
        _settle(img, cut_at=window)
    assert _opens(img, OLD) or _opens(img, NEW)  # never a header neither key opens
    if window in (CrashWindow.REKEY_SLOT_ADDED_HALF, CrashWindow.REKEY_SLOT_ADDED):
        assert _opens(img, OLD)  # the old keyslot is untouched until the new one is on disk
    settled = _settle(img)
    assert (settled.obs.kind, settled.obs.token_state) == ("cva", "ready")
    assert _keyslots(volume._read_area(img)) == ["1"]
    assert _opens(img, NEW) and not _opens(img, OLD)
    if window is not CrashWindow.REKEY_DONE:
        assert settled.rekeyed is not None
        assert settled.rekeyed.new_key_id == key_id(Secret(NEW), NAME)


@pytest.mark.parametrize(
    "window",
    [CrashWindow.REKEY_SLOT_ADDED, CrashWindow.REKEY_OLD_REMOVED_HALF],
    ids=["slot-added", "old-removed-half"],
)
def test_a_cut_rotation_finishes_without_the_previous_key(img: Path, window: CrashWindow) -> None:
    with pytest.raises(Cut):
        _settle(img, cut_at=window)
    settled = _settle(img, previous=None)
    assert settled.obs.token_state == "ready" and settled.rekeyed is not None
    assert settled.rekeyed.old_key_id is None  # not at hand: not claimed
    assert _opens(img, NEW)


def test_rotating_header_without_the_new_key_is_refused_untouched(img: Path) -> None:
    with pytest.raises(Cut):
        _settle(img, cut_at=CrashWindow.REKEY_SLOT_ADDED)
    disk = volume._read_area(img)
    obs = _observe(disk, OLD)  # the contract went back to the old key: its MAC does not verify
    assert obs.kind == "invalid" and any("MAC" in r for r in obs.reasons)
    assert _opens(img, OLD)


def test_no_previous_key_named_leaves_it_to_the_open_path(img: Path) -> None:
    disk = volume._read_area(img)
    settled = _settle(img, previous=None)
    assert settled.obs.kind == "invalid" and settled.rekeyed is None
    assert volume._read_area(img) == disk


def test_a_wrong_previous_key_is_refused_untouched(img: Path) -> None:
    disk = volume._read_area(img)
    with pytest.raises(rotation.PreviousKeyRefused, match="neither"):
        _settle(img, previous=OTHER)
    assert volume._read_area(img) == disk


def test_read_only_never_rotates(img: Path) -> None:
    disk = volume._read_area(img)
    with pytest.raises(VolumeRefused, match="read-write once"):
        _settle(img, read_only=True)
    assert volume._read_area(img) == disk


def test_a_forged_rotation_state_is_refused(img: Path) -> None:
    """Two keyslots are structurally allowed only with the token in state rotating; the host
    cannot MAC such a token, so a header it makes that way does not verify under either key."""
    area = volume._read_area(img)
    with header_copy(area) as copy, CryptDevice.open(str(img), header=copy) as cd:
        cd.load()
        old_pp, _ = derive_keys(Secret(OLD), NAME)
        cd.keyslot_add_by_passphrase(old_pp, Secret(b"host-passphrase-0123456789abcdef"), keyslot=1)
        tok = cd.token_json_get(0)
        assert tok is not None
        cd.token_json_set(0, tok.replace('"ready"', '"rotating"'))
        with Path(copy).open("rb") as f:
            forged = f.read(len(area))
    hdr = parse_luks2(forged)
    assert allow_list_reasons(hdr, integrity=False) == []  # the shape is a rotation's
    for secret in (OLD, NEW):
        obs = _observe(forged, secret)
        assert obs.kind == "invalid" and any("MAC" in r for r in obs.reasons)
    # and two keyslots with a ready token are refused by the allow-list itself
    with header_copy(forged) as copy, CryptDevice.open(str(img), header=copy) as cd:
        cd.load()
        tok = cd.token_json_get(0)
        assert tok is not None
        cd.token_json_set(0, tok.replace('"rotating"', '"ready"'))
        with Path(copy).open("rb") as f:
            two_ready = f.read(len(area))
    reasons = allow_list_reasons(parse_luks2(two_ready), integrity=False)
    assert any(r.startswith("keyslot-count:") for r in reasons)


def test_a_header_swapped_mid_rotation_is_not_written_over(img: Path) -> None:
    swapped = bytearray(volume._read_area(img))

    def window(w: CrashWindow) -> None:
        if w is CrashWindow.REKEY_SLOT_ADDED:  # the host writes its own bytes now
            with img.open("r+b") as f:
                f.seek(4096 * 8)
                f.write(b"\x01" * 4096)

    area = bytes(swapped)
    with pytest.raises(VolumeRefused, match="changed while cva was rotating"):
        rotation.settle(
            img,
            area,
            _observe(area, NEW),
            name=NAME,
            integrity=False,
            read_only=False,
            secret=Secret(bytearray(NEW)),
            previous=lambda: Secret(bytearray(OLD)),
            observe=lambda a: _observe(a, NEW),
            window=window,
        )
    assert _opens(img, OLD) or _opens(img, NEW)


def test_wrong_passphrase_names_the_binding(img: Path) -> None:
    area = volume._read_area(img)
    with header_copy(area) as copy, CryptDevice.open(str(img), header=copy) as cd:
        cd.load()
        with pytest.raises(WrongPassphrase):
            cd.keyslot_add_by_passphrase(
                Secret(b"not-the-passphrase-0123456789abcd"), Secret(b"x" * 32), keyslot=1
            )
    assert dataclasses.is_dataclass(rotation.Rekeyed)


def test_a_cut_ready_write_does_not_fetch_the_previous_key(tmp_path: Path) -> None:
    """Copies that disagree because cva's own ready write was cut (both under the new key) are
    left to the open path, and the previous key is not asked for."""
    p = tmp_path / "disk.img"
    with p.open("wb") as f:
        f.truncate(64 * MIB)
    vol = make_volume()
    passphrase, mac_key = derive_keys(Secret(NEW), NAME)
    volume._format(p, vol, passphrase, mac_key)
    area = volume._read_area(p)

    def cut(w: CrashWindow) -> None:
        if w is CrashWindow.READY_HALF_WRITTEN:
            raise Cut(w.value)

    volume.crash_hook = cut
    try:
        with header_copy(area) as copy, pytest.raises(Cut):
            volume._mark_ready(p, copy, area, vol, mac_key)
    finally:
        volume.crash_hook = None
    fetched: list[int] = []
    before = volume._read_area(p)
    settled = _settle(p, fetched=fetched)
    assert settled.obs.kind == "invalid" and settled.rekeyed is None
    assert fetched == [] and volume._read_area(p) == before
