"""Day-2 operations inside the qemu guest (root, real dm-crypt/LVM/ext4/xfs), issue 26.

Recovery without cva: a volume cva made opens with the plain `cryptsetup` CLI and the passphrase
`cva luks passphrase` derives from the KBS secret alone (the README's runbook, step by step:
read-only open first, read-only mount, then a read-write open).

Key rotation (luks.rotation): a volume made under one key is moved to another at its next open
(contract previous_key), data intact, with no re-encryption; each crash window of the rotation
is hit by SIGKILL in a child and the next open finishes it, and at every window one of the two
keys opens the header as plain cryptsetup reads it.

Status: `cva status` over the control socket of a VolumeManager on the real storage backend
shows the real disk under an LVM + dm-crypt stack (sysfs), the mapper, the LUKS UUID and seq
the header has, and the mounted filesystem's size and use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.config import DaemonConfig, MeasureConfig, PathsConfig
from agent.control.collect import collect
from agent.control.server import ControlServer
from agent.luks_backend import LuksBackend
from agent.measure import Measurer
from agent.volumes import VolumeManager
from luks import disk as luks_disk
from luks import volume
from luks.header import parse_luks2, read_header_area
from luks.run import run
from luks.secret import Secret
from luks.token import derive_keys, key_id
from luks.volume_plan import CrashWindow
from tests.daemon_support import contract, make_bundle
from tests.guest.storage_support import (
    MIB,
    SECRET,
    WRONG_SECRET,
    Env,
    loop_disk,
    make_volume,
    read_marker,
    unique,
    volume_to_json,
    write_marker,
)

if os.environ.get("CVA_IN_GUEST") != "1":  # before any guest-only mark is looked up
    pytest.skip("runs inside the qemu guest (make vm-test)", allow_module_level=True)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.environ.get("CVA_IN_GUEST") != "1", reason="runs inside the guest"),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path / "cva")


def _cva(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("lvm", "filesystem"), [(False, "ext4"), (True, "xfs")], ids=["disk-ext4", "lvm-xfs"]
)
def test_recovery_with_plain_cryptsetup(
    env: Env, tmp_path: Path, lvm: bool, filesystem: str
) -> None:
    name = unique("rec")
    marker = f"cva-recovery-{name}-".encode()
    vg = f"vg{name.replace('-', '')}"
    with loop_disk(tmp_path, 512 * MIB) as dev:
        vol = make_volume(name, lvm=(vg, "data", 400 * MIB) if lvm else None, filesystem=filesystem)
        write_marker(env.prepare(vol, dev), marker)
        env.release(vol, dev)
        if lvm:  # cva leaves the LV active; the runbook activates it (harmless when active)
            run(["vgchange", "-ay", vg], timeout=60)
        target = Path(f"/dev/{vg}/data") if lvm else dev

        # the operator's copy of the KBS resource (exact bytes) -> the passphrase file
        secret_file = tmp_path / "kbs-resource.bin"
        secret_file.write_bytes(SECRET)
        key_file = tmp_path / "passphrase"
        made = _cva(
            "luks", "passphrase", "--secret-file", str(secret_file), "--volume", name,
            "--output", str(key_file),
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert key_file.stat().st_mode & 0o777 == 0o600

        # a wrong secret's passphrase is refused by the keyslot, the volume untouched
        wrong = _cva("luks", "passphrase", "--secret-file", "-", "--volume", name,
                     stdin=WRONG_SECRET)  # fmt: skip
        refused = subprocess.run(
            ["cryptsetup", "open", "--readonly", "--key-file", "-", str(target), "recx"],
            input=wrong.stdout, capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert refused.returncode != 0

        mapper = f"recovery-{name}"
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        ro_opts = "ro,noload" if filesystem == "ext4" else "ro,norecovery"
        run(["cryptsetup", "open", "--readonly", "--key-file", str(key_file), str(target),
             mapper], timeout=120)  # fmt: skip
        try:
            run(["mount", "-o", ro_opts, f"/dev/mapper/{mapper}", str(mnt)], timeout=60)
            try:
                assert (mnt / "marker").read_bytes() == marker * 64
            finally:
                run(["umount", str(mnt)], timeout=60)
        finally:
            run(["cryptsetup", "close", mapper], timeout=60)

        # then read-write, through stdin (the pipe form of the runbook)
        piped = _cva("luks", "passphrase", "--secret-file", "-", "--volume", name, stdin=SECRET)
        run(["cryptsetup", "open", "--key-file", "-", str(target), mapper],
            stdin=piped.stdout, timeout=120)  # fmt: skip
        try:
            run(["mount", f"/dev/mapper/{mapper}", str(mnt)], timeout=60)
            try:
                (mnt / "recovered").write_bytes(b"written-by-hand")
            finally:
                run(["umount", str(mnt)], timeout=60)
        finally:
            run(["cryptsetup", "close", mapper], timeout=60)

        # cva still opens the volume afterwards (a hand open does not touch the header)
        p = env.prepare(replace(vol, create=False), dev)
        try:
            assert read_marker(p) == marker * 64
            assert (p.guest_path / "recovered").read_bytes() == b"written-by-hand"
        finally:
            env.release(vol, dev)


class _Keys:
    async def get_resource(self, uri: object) -> Secret:
        return Secret(bytearray(SECRET))

    async def aclose(self) -> None:
        pass


class _Register:
    def __init__(self) -> None:
        self.value = bytes(32)

    def read(self) -> bytes:
        return self.value

    def extend(self, digest: bytes) -> None:
        self.value = hashlib.sha256(self.value + digest).digest()


def test_status_shows_the_real_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique("st")
    vg = f"vg{name.replace('-', '')}"
    with loop_disk(tmp_path, 512 * MIB) as dev:
        monkeypatch.setattr(luks_disk, "wait_for_disk", lambda _ref, timeout: dev)
        monkeypatch.setattr(luks_disk, "find", lambda _ref: dev)
        vol = replace(make_volume(name, lvm=(vg, "data", 200 * MIB)), containers=("postgres",))
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        config = DaemonConfig(
            paths=PathsConfig(
                rootfs_base=tmp_path / "kata", state_dir=state, mount_base=tmp_path / "mnt"
            )
        )
        reg = _Register()
        measurer = Measurer(
            MeasureConfig(sink="tpm"),
            log_path=state / "eventlog",
            register_factory=lambda _tcti, _pcr: reg,
            tee="tpm",  # the tpm sink only on a tpm TEE (issue 21 #2)
        )
        manager = VolumeManager(
            replace(contract(), volumes=(vol,)),
            LuksBackend(config),
            _Keys(),
            rootfs_base=tmp_path / "kata",
            measurer=measurer,
        )
        make_bundle(tmp_path / "kata", "c1", "postgres")

        async def scenario() -> dict[str, Any]:
            server = ControlServer(config.control_socket, lambda: _json(manager))
            await server.start()
            try:
                await manager.prepare("c1")
                got = await asyncio.to_thread(
                    _cva, "status", "--json", "--socket", str(config.control_socket)
                )
                assert got.returncode == 0, got.stderr
                table = await asyncio.to_thread(
                    _cva, "status", "--socket", str(config.control_socket)
                )
                assert table.returncode == 0 and name.encode() in table.stdout
                uuid = await asyncio.to_thread(
                    run, ["cryptsetup", "luksUUID", f"/dev/{vg}/data"], timeout=60
                )
                await manager.release("c1")
                doc = json.loads(got.stdout)
                assert isinstance(doc, dict)
                doc["uuid_now"] = uuid.text.strip()
                return doc
            finally:
                await server.close()

        doc = asyncio.run(scenario())
        [v] = doc["volumes"]
        uuid_now = doc["uuid_now"]
        assert v["state"] == "bound" and v["holders"] == ["c1"]
        assert v["device"] == str(dev)  # the loop disk under the LV under dm-crypt
        assert v["mapper"] and Path(f"/dev/mapper/{v['mapper']}").name == v["mapper"]
        assert v["luks_uuid"] == uuid_now
        assert v["seq"] == 1  # a new volume: the first ready token
        assert 150 * MIB < v["size_bytes"] <= 200 * MIB and 0 < v["used_bytes"] < v["size_bytes"]
        assert v["last_event"]["operation"] == "volume-create"
        assert v["last_event"]["sink"] == "tpm"
        assert doc["measure"] == {"sink": "tpm", "enabled": True, "required": True}


async def _json(manager: VolumeManager) -> dict[str, object]:
    return (await collect(manager)).to_json()


# ---- key rotation -------------------------------------------------------------------------

NEW_SECRET = bytes(range(120, 184))


def _prepare(env: Env, vol: Any, dev: Path, secret: bytes, previous: bytes | None) -> Any:
    return volume.prepare_volume(
        vol,
        Secret(bytearray(secret)),
        disk=dev,
        runtime_dir=env.runtime_dir,
        mount_base=env.mount_base,
        previous=(lambda: Secret(bytearray(previous))) if previous is not None else None,
    )


def _keyslots(device: Path) -> list[str]:
    return sorted(parse_luks2(read_header_area(str(device))).section("keyslots"))


def _opens(device: Path, secret: bytes, name: str, scratch: Path) -> bool:
    """Plain cryptsetup on a copy of the header region (libcryptsetup repairs disagreeing copies
    when it loads a header: the disk itself must stay as the crash left it)."""
    passphrase, _ = derive_keys(Secret(secret), name)
    probe = scratch / "probe.img"
    with probe.open("wb") as f:
        f.truncate(32 * MIB)
        f.write(read_header_area(str(device)))
    proc = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(probe)],
        input=bytes(passphrase.data),
        capture_output=True,
        timeout=120,
        check=False,
    )
    probe.unlink()
    return proc.returncode == 0


@pytest.mark.parametrize("integrity", [False, True], ids=["plain", "integrity"])
def test_rotation_moves_a_volume_to_the_new_key(env: Env, tmp_path: Path, integrity: bool) -> None:
    name = unique("rot")
    with loop_disk(tmp_path, 256 * MIB) as dev:
        vol = make_volume(name, lvm=(f"vg{name.replace('-', '')}", "data", 128 * MIB),
                          integrity=integrity)  # fmt: skip
        assert vol.lvm is not None
        lv = Path(f"/dev/{vol.lvm.vg}/data")
        write_marker(env.prepare(vol, dev, secret=SECRET), b"before-rotation")
        env.release(vol, dev)
        run(["vgchange", "-ay", vol.lvm.vg], timeout=60)
        uuid_before = run(["cryptsetup", "luksUUID", str(lv)], timeout=60).text.strip()
        assert _keyslots(lv) == ["0"]

        p = _prepare(env, replace(vol, create=False), dev, NEW_SECRET, SECRET)
        try:
            assert read_marker(p) == b"before-rotation" * 64
            assert p.rekeyed is not None
            assert p.rekeyed.old_key_id == key_id(Secret(SECRET), name)
            assert p.rekeyed.new_key_id == key_id(Secret(NEW_SECRET), name)
            assert p.luks_uuid == uuid_before  # the same volume: no re-encryption
            write_marker(p, b"after-rotation", name="after")
        finally:
            env.release(vol, dev)
        run(["vgchange", "-ay", vol.lvm.vg], timeout=60)
        assert _keyslots(lv) == ["1"]
        assert _opens(lv, NEW_SECRET, name, tmp_path)
        assert not _opens(lv, SECRET, name, tmp_path)
        # the old key alone no longer opens it (refused, untouched)
        before = read_header_area(str(lv))
        with pytest.raises(volume.VolumeRefused, match="MAC"):
            _prepare(env, replace(vol, create=False), dev, SECRET, None)
        assert read_header_area(str(lv)) == before
        # the new key alone does; a second open rotates nothing and fetches no previous key
        asked: list[int] = []

        def previous() -> Secret:
            asked.append(1)
            return Secret(bytearray(SECRET))

        p = volume.prepare_volume(
            replace(vol, create=False), Secret(bytearray(NEW_SECRET)), disk=dev,
            runtime_dir=env.runtime_dir, mount_base=env.mount_base, previous=previous,
        )  # fmt: skip
        try:
            assert p.rekeyed is None and asked == []
            assert read_marker(p, "after") == b"after-rotation" * 64
        finally:
            env.release(vol, dev)


ROTATION_WINDOWS = [
    CrashWindow.REKEY_SLOT_ADDED_HALF,
    CrashWindow.REKEY_SLOT_ADDED,
    CrashWindow.REKEY_OLD_REMOVED_HALF,
    CrashWindow.REKEY_DONE,
]


@pytest.mark.parametrize("window", ROTATION_WINDOWS, ids=[w.value for w in ROTATION_WINDOWS])
def test_crash_in_rotation(env: Env, tmp_path: Path, window: CrashWindow) -> None:
    name = unique("rcrash")
    with loop_disk(tmp_path, 128 * MIB) as dev:
        vol = make_volume(name)
        write_marker(env.prepare(vol, dev, secret=SECRET), b"before-crash")
        env.release(vol, dev)
        spec = {
            "volume": volume_to_json(replace(vol, create=False)),
            "disk": str(dev),
            "runtime_dir": str(env.runtime_dir),
            "mount_base": str(env.mount_base),
            "crash_at": window.value,
        }
        child = subprocess.run(
            [sys.executable, "-m", "tests.guest.storage_child"],
            input=f"{NEW_SECRET.hex()}\n{SECRET.hex()}\n".encode(),
            capture_output=True,
            env={**os.environ, "CVA_TEST_PREPARE_SPEC": json.dumps(spec)},
            cwd=REPO,
            timeout=600,
            check=False,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        # never a header neither key opens; the old slot is intact until the new one is written
        assert _opens(dev, SECRET, name, tmp_path) or _opens(dev, NEW_SECRET, name, tmp_path)
        if window in (CrashWindow.REKEY_SLOT_ADDED_HALF, CrashWindow.REKEY_SLOT_ADDED):
            assert _opens(dev, SECRET, name, tmp_path)
        p = _prepare(env, replace(vol, create=False), dev, NEW_SECRET, SECRET)
        try:
            assert read_marker(p) == b"before-crash" * 64
        finally:
            env.release(vol, dev)
        assert _keyslots(dev) == ["1"]
        assert _opens(dev, NEW_SECRET, name, tmp_path)
        assert not _opens(dev, SECRET, name, tmp_path)
