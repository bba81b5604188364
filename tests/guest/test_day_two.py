"""Day-2 operations inside the qemu guest (root, real dm-crypt/LVM/ext4/xfs), issue 26.

Recovery without cva: a volume cva made opens with the plain `cryptsetup` CLI and the passphrase
`cva luks passphrase` derives from the KBS secret alone (the README's runbook, step by step:
read-only open first, read-only mount, then a read-write open).

Status: `cva status` over the control socket of a VolumeManager on the real storage backend
shows the real disk under an LVM + dm-crypt stack (sysfs), the mapper, the LUKS UUID and seq
the header has, and the mounted filesystem's size and use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
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
from luks.run import run
from luks.secret import Secret
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
