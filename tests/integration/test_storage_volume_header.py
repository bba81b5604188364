"""luks.volume's header steps on image files with the real libcryptsetup (no device-mapper):
create decision, format -> INITIALIZING, the ready write-back from the copy, refusals, and
the two format crash windows (which must refuse, never reformat)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

contract = pytest.importorskip("agent.contract")
pytest.importorskip("luks.token")

from luks import blank, volume  # noqa: E402
from luks.header import LuksHeader, parse_luks2  # noqa: E402
from luks.libcryptsetup import CryptDevice, header_copy  # noqa: E402
from luks.secret import Secret  # noqa: E402
from luks.token import derive_keys  # noqa: E402
from luks.volume_plan import CrashWindow, decide  # noqa: E402

MIB = 1 << 20
SECRET = bytes(range(1, 65))


def make_volume(name: str = "pgdata", *, create: bool = True) -> contract.Volume:
    return contract.Volume(
        name=name,
        key=contract.KbsResourceUri("default", name, "luks"),
        disk=contract.DiskRef("serial", "pgdisk"),
        lvm=None,
        filesystem="ext4",
        mount="/var/lib/data",
        containers=(),
        create=create,
        integrity=False,
        read_only=False,
    )


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with p.open("wb") as f:
        f.truncate(64 * MIB)
    return p


def keys(name: str = "pgdata", secret: bytes = SECRET) -> tuple[Secret, Secret]:
    return derive_keys(Secret(secret), name)


def test_blank_image_decides_create_then_format_gives_initializing(img: Path) -> None:
    vol = make_volume()
    passphrase, mac_key = keys()
    area = volume._read_area(img)
    obs = volume._observe(area, vol, mac_key)
    assert obs.kind == "zero"
    assert decide(obs, blank.probe_blank(img), create=True).action == "create"
    volume._format(img, vol, passphrase, mac_key)
    area = volume._read_area(img)
    obs = volume._observe(area, vol, mac_key)
    assert (obs.kind, obs.token_state) == ("cva", "initializing")
    # a blank check now fails: a header is there
    assert not blank.probe_blank(img).blank


def test_ready_written_back_from_the_copy(img: Path) -> None:
    vol = make_volume()
    passphrase, mac_key = keys()
    volume._format(img, vol, passphrase, mac_key)
    area = volume._read_area(img)
    with header_copy(area) as copy:
        new = volume._mark_ready(img, copy, area, vol, mac_key)
    disk_now = volume._read_area(img)
    assert disk_now == new
    assert disk_now[32 * 1024 :] == area[32 * 1024 :]  # the keyslot area never changes
    obs = volume._observe(disk_now, vol, mac_key)
    assert (obs.kind, obs.token_state) == ("cva", "ready")
    assert decide(obs, None, create=True).action == "open"


def test_header_swapped_before_ready_write_is_refused(img: Path) -> None:
    vol = make_volume()
    passphrase, mac_key = keys()
    volume._format(img, vol, passphrase, mac_key)
    area = volume._read_area(img)
    with img.open("r+b") as f:  # the host edits the on-disk header after cva copied it
        f.seek(4096 + 10)
        f.write(b" ")
    with header_copy(area) as copy, pytest.raises(volume.VolumeRefused, match="changed"):
        volume._mark_ready(img, copy, area, vol, mac_key)


def test_wrong_key_or_other_volume_is_refused_even_with_create(img: Path) -> None:
    vol = make_volume()
    passphrase, mac_key = keys()
    volume._format(img, vol, passphrase, mac_key)
    area = volume._read_area(img)
    _, wrong_mac = keys(secret=bytes(64))
    obs = volume._observe(area, vol, wrong_mac)
    assert obs.kind == "invalid" and "MAC" in obs.reasons[0]
    assert decide(obs, None, create=True).action == "refuse"
    other = make_volume("other")
    _, other_mac = keys("other")
    assert volume._observe(area, other, other_mac).kind == "invalid"
    assert volume._read_area(img) == area  # looking changed nothing


class Crash(BaseException):
    pass


@pytest.mark.parametrize("window", [CrashWindow.LUKS_FORMATTED, CrashWindow.KEYSLOT_ADDED])
def test_format_crash_windows_leave_the_disk_untouched(
    img: Path, window: CrashWindow, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libcryptsetup formats into a memfd: a crash before cva writes the header leaves the
    disk as blank as it was (without integrity), so the next run creates again."""

    def hook(w: CrashWindow) -> None:
        if w == window:
            raise Crash

    monkeypatch.setattr(volume, "crash_hook", hook)
    vol = make_volume()
    passphrase, mac_key = keys()
    with pytest.raises(Crash):
        volume._format(img, vol, passphrase, mac_key)
    monkeypatch.setattr(volume, "crash_hook", None)
    assert blank.scan_zeros(img, 0, 64 * MIB).zero
    obs = volume._observe(volume._read_area(img), vol, mac_key)
    assert decide(obs, blank.probe_blank(img), create=True).action == "create"


def test_header_swapped_on_disk_during_format_is_never_macd(
    img: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 item 4: the MAC covers libcryptsetup's in-memory header, never bytes read
    back from the disk, which the host could have swapped between format and MAC."""
    other = tmp_path / "other.img"
    with other.open("wb") as f:
        f.truncate(64 * MIB)
    vol = make_volume()
    passphrase, mac_key = keys()
    with CryptDevice.open(str(other)) as cd:  # a genuine-looking header the host made
        cd.format_luks2(integrity=False)
        cd.keyslot_add_by_volume_key(passphrase, keyslot=0)
    hostile = volume._read_area(other)
    hostile_uuid = parse_luks2(hostile).uuid

    def hook(w: CrashWindow) -> None:
        if w == CrashWindow.KEYSLOT_ADDED:
            with img.open("r+b") as f:  # the host swaps the on-disk header right now
                f.write(hostile)
                f.flush()

    macd: list[str] = []
    real_make_token = volume.make_token

    def spy(hdr: LuksHeader, *args: object, **kwargs: object) -> object:
        macd.append(hdr.uuid)
        return real_make_token(hdr, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(volume, "crash_hook", hook)
    monkeypatch.setattr(volume, "make_token", spy)
    try:
        area = volume._format(img, vol, passphrase, mac_key)
    except volume.VolumeRefused:
        area = None
    assert macd and hostile_uuid not in macd  # the host's header was never MAC'd
    if area is not None:  # created: the disk holds exactly cva's MAC'd in-memory header
        assert volume._read_area(img) == area
        obs = volume._observe(area, vol, mac_key)
        assert (obs.kind, obs.token_state) == ("cva", "initializing")
        assert parse_luks2(area).uuid != hostile_uuid


def test_initializing_window_recovers(img: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def hook(w: CrashWindow) -> None:
        if w == CrashWindow.INITIALIZING_WRITTEN:
            raise Crash

    monkeypatch.setattr(volume, "crash_hook", hook)
    vol = make_volume()
    passphrase, mac_key = keys()
    with pytest.raises(Crash):
        volume._format(img, vol, passphrase, mac_key)
    obs = volume._observe(volume._read_area(img), vol, mac_key)
    assert decide(obs, None, create=False).action == "finish"


def test_torn_ready_write_is_refused_not_reformatted(
    img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = make_volume()
    passphrase, mac_key = keys()
    volume._format(img, vol, passphrase, mac_key)
    area = volume._read_area(img)

    def hook(w: CrashWindow) -> None:
        if w == CrashWindow.READY_HALF_WRITTEN:
            raise Crash

    monkeypatch.setattr(volume, "crash_hook", hook)
    with header_copy(area) as copy, pytest.raises(Crash):
        volume._mark_ready(img, copy, area, vol, mac_key)
    torn = volume._read_area(img)
    obs = volume._observe(torn, vol, mac_key)
    assert obs.kind == "invalid" and any("cop" in r for r in obs.reasons), obs
    assert decide(obs, None, create=True).action == "refuse"


def _torn(
    img: Path, vol: contract.Volume, mac_key: Secret, monkeypatch: pytest.MonkeyPatch
) -> bytes:
    def hook(w: CrashWindow) -> None:
        if w == CrashWindow.READY_HALF_WRITTEN:
            raise Crash

    area = volume._read_area(img)
    monkeypatch.setattr(volume, "crash_hook", hook)
    with header_copy(area) as copy, pytest.raises(Crash):
        volume._mark_ready(img, copy, area, vol, mac_key)
    monkeypatch.setattr(volume, "crash_hook", None)
    return volume._read_area(img)


def test_torn_ready_write_adopts_the_initializing_copy(
    img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14 item 2: READY_HALF_WRITTEN no longer refuses forever. Each copy alone is a
    valid, MAC-verified header of this volume differing only in the token: the initializing
    copy is adopted and written to both slots (then the initializing rule applies)."""
    vol = make_volume()
    passphrase, mac_key = keys()
    initializing = volume._format(img, vol, passphrase, mac_key)
    torn = _torn(img, vol, mac_key, monkeypatch)
    area, obs = volume._adopt_half_written(img, torn, vol, mac_key)
    assert (obs.kind, obs.token_state) == ("cva", "initializing")
    disk_now = volume._read_area(img)
    assert disk_now == area
    assert parse_luks2(area).metadata == parse_luks2(initializing).metadata
    assert area[32 * 1024 :] == initializing[32 * 1024 :]  # the keyslot area never changes
    assert not any(
        r.startswith("header-copies") for r in volume._observe(area, vol, mac_key).reasons
    )
    # a second copy-level view: the ready state is then written as usual
    with header_copy(area) as copy:
        ready = volume._mark_ready(img, copy, area, vol, mac_key)
    assert volume._observe(ready, vol, mac_key).token_state == "ready"


def test_torn_copies_are_not_adopted_with_a_wrong_key_or_a_foreign_copy(
    img: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = make_volume()
    passphrase, mac_key = keys()
    volume._format(img, vol, passphrase, mac_key)
    torn = _torn(img, vol, mac_key, monkeypatch)
    _, wrong_mac = keys(secret=bytes(64))
    with pytest.raises(volume.VolumeRefused, match=r"copies disagree.*does not verify"):
        volume._adopt_half_written(img, torn, vol, wrong_mac)
    # the host splices in the secondary copy of another header (another volume key)
    other = tmp_path / "other.img"
    with other.open("wb") as f:
        f.truncate(64 * MIB)
    volume._format(other, vol, passphrase, mac_key)
    foreign = volume._read_area(other)
    spliced = torn[: 16 * 1024] + foreign[16 * 1024 : 32 * 1024] + torn[32 * 1024 :]
    with pytest.raises(volume.VolumeRefused, match="copies disagree"):
        volume._adopt_half_written(img, spliced, vol, mac_key)
    # a broken secondary (garbage) is never adopted either
    garbage = torn[: 16 * 1024] + bytes([7]) * (16 * 1024) + torn[32 * 1024 :]
    with pytest.raises(volume.VolumeRefused, match="copies disagree"):
        volume._adopt_half_written(img, garbage, vol, mac_key)
    assert volume._read_area(img) == torn  # refusals write nothing


def test_adoption_refused_when_the_disk_changed_meanwhile(
    img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol = make_volume()
    passphrase, mac_key = keys()
    volume._format(img, vol, passphrase, mac_key)
    torn = _torn(img, vol, mac_key, monkeypatch)
    with img.open("r+b") as f:
        f.seek(100)
        f.write(b"x")
    with pytest.raises(volume.VolumeRefused, match="changed"):
        volume._adopt_half_written(img, torn, vol, mac_key)


def test_format_ahead_writes_nothing_until_the_proof_says_blank(img: Path) -> None:
    """Issue 14 item 4: without integrity the in-memory format runs while the blank proof
    reads the disk; the disk stays all zeros until cva writes the header it made."""
    vol = make_volume()
    passphrase, mac_key = keys()
    with volume._FormatAhead(img, vol, passphrase, mac_key) as ahead:
        assert blank.scan_zeros(img, 0, 64 * MIB).zero
    area = ahead.area()
    assert area is not None and len(area) == 16 * MIB
    assert blank.scan_zeros(img, 0, 64 * MIB).zero  # made in memory only
    obs = volume._observe(area, vol, mac_key)
    assert (obs.kind, obs.token_state) == ("cva", "initializing")
    assert volume._write_formatted(img, area) == area
    assert volume._read_area(img) == area


def test_format_ahead_does_nothing_with_integrity(img: Path) -> None:
    """With integrity the format writes dm-integrity's superblock into the data area: never
    while the disk is still being proven blank."""
    vol = dataclasses.replace(make_volume(), integrity=True)
    passphrase, mac_key = keys()
    with volume._FormatAhead(img, vol, passphrase, mac_key) as ahead:
        pass
    assert ahead.area() is None
    assert blank.scan_zeros(img, 0, 64 * MIB).zero


def test_format_ahead_hands_back_what_the_format_raised(
    img: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def hook(w: CrashWindow) -> None:
        if w == CrashWindow.KEYSLOT_ADDED:
            raise Crash

    monkeypatch.setattr(volume, "crash_hook", hook)
    passphrase, mac_key = keys()
    with volume._FormatAhead(img, make_volume(), passphrase, mac_key) as ahead:
        pass
    with pytest.raises(Crash):
        ahead.area()
    assert blank.scan_zeros(img, 0, 64 * MIB).zero
