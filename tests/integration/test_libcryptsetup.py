"""luks.libcryptsetup against the real libcryptsetup, on image files (no device-mapper needed).

Also: headers made by this binding and by the `cryptsetup` CLI are judged by the allow-list,
and the token MAC round-trips through real headers.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from luks import libcryptsetup as lc
from luks.header import (
    HEADER_AREA_BYTES,
    allow_list_reasons,
    parse_luks2,
    read_header_area,
)
from luks.run import run, secret_fd
from luks.secret import Secret
from luks.token import canonical_metadata, derive_keys, make_token, token_json, verify_token

PASSPHRASE = b"PASSPHRASE-MARKER-0123456789abcdef"
VOLUME_KEY = bytes(range(64))

try:
    lc._library()
    HAVE_LIB = True
except lc.CryptError:
    HAVE_LIB = False

pytestmark = pytest.mark.skipif(not HAVE_LIB, reason="libcryptsetup.so.12 not installed")


def _image(tmp_path: Path, name: str = "disk.img", size: int = 32 * 1024 * 1024) -> str:
    path = tmp_path / name
    with path.open("wb") as f:
        f.truncate(size)
    return str(path)


def _formatted(tmp_path: Path, name: str = "disk.img") -> str:
    img = _image(tmp_path, name)
    with lc.CryptDevice.open(img) as cd:
        cd.format_luks2(integrity=False)
        assert cd.keyslot_add_by_volume_key(Secret(PASSPHRASE)) == 0
    return img


def _no_secret_in(text: str) -> None:
    for marker in (PASSPHRASE, VOLUME_KEY):
        assert marker.hex() not in text
        assert marker.decode("latin-1") not in text
    assert "PASSPHRASE-MARKER" not in text


def test_format_produces_cvas_profile(tmp_path: Path) -> None:
    img = _formatted(tmp_path)
    hdr = parse_luks2(read_header_area(img))
    assert allow_list_reasons(hdr, integrity=False) == []
    seg = hdr.section("segments")["0"]
    assert isinstance(seg, dict) and seg["offset"] == "16777216" and seg["sector_size"] == 4096
    ks = hdr.section("keyslots")["0"]
    assert isinstance(ks, dict) and ks["kdf"] == {**ks["kdf"], "type": "pbkdf2", "iterations": 1000}


def test_load_uuid_dump_and_verify(tmp_path: Path) -> None:
    img = _formatted(tmp_path)
    hdr = parse_luks2(read_header_area(img))
    with lc.CryptDevice.open(img) as cd:
        cd.load()
        assert cd.type == "LUKS2"
        assert cd.uuid == hdr.uuid
        dump = json.loads(cd.dump_json())
        assert dump["segments"]["0"]["encryption"] == "aes-xts-plain64"
        assert cd.activate_by_passphrase(None, Secret(PASSPHRASE)) == 0


def test_given_volume_key_and_secret_wipeable_afterwards(tmp_path: Path) -> None:
    img = _image(tmp_path)
    vk, pw = Secret(VOLUME_KEY), Secret(PASSPHRASE)
    with lc.CryptDevice.open(img) as cd:
        cd.format_luks2(integrity=False, volume_key=vk)
        assert cd.keyslot_add_by_volume_key(pw, volume_key=vk) == 0
        cd.activate_by_passphrase(None, pw)
    assert bytes(vk.data) == VOLUME_KEY  # the binding borrows, never alters, the caller's key
    vk.wipe()  # no buffer export left pinning the bytearray
    pw.wipe()
    assert len(vk) == 0 and len(pw) == 0


def test_wrong_volume_key_size_refused(tmp_path: Path) -> None:
    with lc.CryptDevice.open(_image(tmp_path)) as cd, pytest.raises(lc.CryptError) as info:
        cd.format_luks2(integrity=False, volume_key=Secret(VOLUME_KEY[:32]))
    _no_secret_in(str(info.value))


def test_wrong_passphrase_is_wrong_passphrase_and_header_unchanged(tmp_path: Path) -> None:
    img = _formatted(tmp_path)
    before = Path(img).read_bytes()
    with lc.CryptDevice.open(img) as cd:
        cd.load()
        with pytest.raises(lc.WrongPassphrase) as info:
            cd.activate_by_passphrase(None, Secret(b"not-the-passphrase-0123456789abcd"))
        assert info.value.errno == 1
        # and the right one still works afterwards: nothing was lost
        assert cd.activate_by_passphrase(None, Secret(PASSPHRASE)) == 0
    assert Path(img).read_bytes() == before
    _no_secret_in(str(info.value) + repr(info.value))


def test_errors_carry_libcryptsetup_log_line_and_no_secrets(tmp_path: Path) -> None:
    with pytest.raises(lc.CryptError) as info:
        lc.CryptDevice.open(str(tmp_path / "missing.img"))
    assert "does not exist" in str(info.value) and info.value.errno > 0
    blank = _image(tmp_path, "blank.img")
    with lc.CryptDevice.open(blank) as cd, pytest.raises(lc.CryptError) as info2:
        cd.load()
    assert "crypt_load" in str(info2.value)
    with lc.CryptDevice.open(blank) as cd, pytest.raises(lc.CryptError) as info3:
        cd.activate_by_passphrase(None, Secret(PASSPHRASE))
    _no_secret_in(str(info3.value))


def test_closed_context_refused(tmp_path: Path) -> None:
    cd = lc.CryptDevice.open(_image(tmp_path))
    cd.close()
    cd.close()
    with pytest.raises(lc.CryptError, match="closed"):
        cd.load()


def test_empty_passphrase_refused(tmp_path: Path) -> None:
    img = _formatted(tmp_path)
    with lc.CryptDevice.open(img) as cd:
        cd.load()
        with pytest.raises(lc.CryptError, match="empty passphrase"):
            cd.activate_by_passphrase(None, Secret(b""))


def test_token_json_get_set_remove(tmp_path: Path) -> None:
    img = _formatted(tmp_path)
    with lc.CryptDevice.open(img) as cd:
        cd.load()
        assert cd.token_json_get(0) is None
        text = '{"type":"cva","keyslots":[],"state":"initializing"}'
        assert cd.token_json_set(0, text) == 0
        got = cd.token_json_get(0)
        assert got is not None and json.loads(got) == json.loads(text)
        assert cd.token_json_get(3) is None
        cd.token_json_set(0, None)
        assert cd.token_json_get(0) is None
        with pytest.raises(lc.CryptError):
            cd.token_json_set(1, "not json")


def test_token_mac_through_real_header(tmp_path: Path) -> None:
    img = _formatted(tmp_path)
    _, mac_key = derive_keys(Secret(bytes(range(40))), "pgdata")
    hdr = parse_luks2(read_header_area(img))
    with lc.CryptDevice.open(img) as cd:
        cd.load()
        cd.token_json_set(0, token_json(make_token(hdr, "initializing", "pgdata", mac_key)))
    marked = parse_luks2(read_header_area(img))
    assert marked.seqid > hdr.seqid
    assert canonical_metadata(marked) == canonical_metadata(hdr)  # token writes keep M
    assert allow_list_reasons(marked, integrity=False) == []
    assert verify_token(marked, "pgdata", mac_key) == "initializing"
    with lc.CryptDevice.open(img) as cd:
        cd.load()
        cd.token_json_set(0, token_json(make_token(marked, "ready", "pgdata", mac_key)))
    assert verify_token(parse_luks2(read_header_area(img)), "pgdata", mac_key) == "ready"


def test_open_from_in_memory_copy_never_writes_the_disk(tmp_path: Path) -> None:
    img = _formatted(tmp_path)
    area = read_header_area(img)
    assert len(area) == HEADER_AREA_BYTES
    # make the on-disk secondary stale: libcryptsetup would "repair" it on load
    broken = bytearray(Path(img).read_bytes())
    broken[16384 + 500] ^= 0xFF
    Path(img).write_bytes(bytes(broken))
    before = Path(img).read_bytes()
    with lc.header_copy(area) as path, lc.CryptDevice.open(img, header=path) as cd:
        cd.load()
        assert cd.uuid == parse_luks2(area).uuid
        assert cd.activate_by_passphrase(None, Secret(PASSPHRASE)) == 0
        with pytest.raises(lc.WrongPassphrase):
            cd.activate_by_passphrase(None, Secret(b"wrong-passphrase-0123456789abcdef"))
    assert Path(img).read_bytes() == before


def test_one_lock_serialises_threads(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            img = _formatted(tmp_path, f"t{i}.img")
            with lc.CryptDevice.open(img) as cd:
                cd.load()
                cd.activate_by_passphrase(None, Secret(PASSPHRASE))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_active_status_of_unknown_name() -> None:
    # "inactive" where device-mapper exists; a failed query is its own error, never a state
    try:
        assert lc.active_status("cva-test-does-not-exist") == "inactive"
    except lc.StatusQueryFailed as exc:
        assert "cannot query device-mapper" in exc.message


def test_integrity_format_needs_device_mapper_or_works(tmp_path: Path) -> None:
    img = _image(tmp_path)
    with lc.CryptDevice.open(img) as cd:
        try:
            cd.format_luks2(integrity=True)
        except lc.CryptError as exc:
            assert "device-mapper" in str(exc) or "integrity" in str(exc)
            return
    hdr = parse_luks2(read_header_area(img))
    assert allow_list_reasons(hdr, integrity=True) == []


# --- headers made by the cryptsetup CLI ----------------------------------------------------

CRYPTSETUP = shutil.which("cryptsetup", path="/usr/sbin:/usr/bin:/sbin:/bin")
PROFILE_ARGS = [
    "--type",
    "luks2",
    "--cipher",
    "aes-xts-plain64",
    "--key-size",
    "512",
    "--sector-size",
    "4096",
    "--pbkdf",
    "pbkdf2",
    "--pbkdf-force-iterations",
    "1000",
    "--hash",
    "sha256",
    "--luks2-metadata-size",
    "16k",
    "--luks2-keyslots-size",
    "16352k",
]
needs_cli = pytest.mark.skipif(CRYPTSETUP is None, reason="cryptsetup CLI not installed")


def _cli_format(img: str, *extra: str) -> None:
    with secret_fd(Secret(PASSPHRASE)) as path:
        fd = int(path.rsplit("/", 1)[1])
        run(
            ["cryptsetup", "luksFormat", "-q", "--key-file", path, *extra, img],
            timeout=120,
            pass_fds=[fd],
        )


@needs_cli
def test_cli_header_in_cvas_profile_passes_and_opens(tmp_path: Path) -> None:
    img = _image(tmp_path)
    _cli_format(img, *PROFILE_ARGS)
    hdr = parse_luks2(read_header_area(img))
    assert allow_list_reasons(hdr, integrity=False) == []
    with lc.header_copy(read_header_area(img)) as path, lc.CryptDevice.open(img, header=path) as cd:
        cd.load()
        assert cd.activate_by_passphrase(None, Secret(PASSPHRASE)) == 0


@needs_cli
@pytest.mark.parametrize(
    ("extra", "rule"),
    [
        ((), "keyslot-kdf"),  # cryptsetup's defaults: argon2id (cheap here: --iter-time 50)
        (("--sector-size", "512"), "sector-size"),
        (("--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"), "segment-cipher"),
        (("--pbkdf-force-iterations", "200000"), "keyslot-kdf"),
        (("--luks2-metadata-size", "64k"), "metadata-size"),
        (("--label", "evil"), "label"),
    ],
)
def test_cli_headers_off_profile_refused(tmp_path: Path, extra: tuple[str, ...], rule: str) -> None:
    img = _image(tmp_path)
    args = list(PROFILE_ARGS) if extra else ["--type", "luks2", "--iter-time", "50"]
    _cli_format(img, *args, *extra)
    reasons = allow_list_reasons(parse_luks2(read_header_area(img)), integrity=False)
    assert any(r.startswith(rule + ":") for r in reasons), reasons


@needs_cli
def test_cli_second_keyslot_refused(tmp_path: Path) -> None:
    img = _image(tmp_path)
    _cli_format(img, *PROFILE_ARGS)
    with secret_fd(Secret(PASSPHRASE)) as path:
        fd = int(path.rsplit("/", 1)[1])
        run(
            [
                "cryptsetup",
                "luksAddKey",
                "-q",
                "--key-file",
                path,
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                img,
                path,
            ],
            timeout=120,
            pass_fds=[fd],
        )
    reasons = allow_list_reasons(parse_luks2(read_header_area(img)), integrity=False)
    assert any(r.startswith("keyslot-count:") for r in reasons)


def test_foreign_token_refused(tmp_path: Path) -> None:
    img = _formatted(tmp_path)
    with lc.CryptDevice.open(img) as cd:
        cd.load()
        # (a systemd-tpm2 token needs its plugin installed to be written; any foreign type will do)
        cd.token_json_set(0, '{"type":"hostile-plugin","keyslots":["0"]}')
    reasons = allow_list_reasons(parse_luks2(read_header_area(img)), integrity=False)
    assert any(r.startswith("token-type:") for r in reasons)


@pytest.mark.parametrize("length", [16 * 1024 * 1024, 3 * 65536 + 17, 100])
def test_header_copy_is_byte_exact_with_zero_blocks_left_as_holes(length: int) -> None:
    """Zero 64 KiB blocks are not written (holes read as zeros); a block with a single
    non-zero byte, the first, the last and a partial last block all are."""
    area = bytearray(length)
    for where in (w for w in (0, 65536 + 4095, length // 2, length - 1) if w < length):
        area[where] = 0xA5
    with lc.header_copy(area) as path:
        copy = Path(path).read_bytes()
    assert copy == bytes(area)
