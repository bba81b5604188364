"""Online grow inside the qemu guest (root, real LVM/dm-crypt/ext4/xfs), issue 26 item 4.

The host enlarges a disk under a mounted volume: here a loop device's image is truncated larger
and `losetup -c` makes the kernel send the same block `change` uevent with RESIZE=1 a virtio
disk resize (QMP block_resize) sends. luks.grow then runs pvresize -> lvextend (size = "max"
only) -> crypt_resize -> resize2fs / xfs_growfs on the mounted filesystem; data stays, the new
size is visible; a fixed-size LV keeps its size, an integrity volume is refused with its reason,
a shrunk disk is refused with nothing touched. The daemon's trigger (agent.grow: the netlink
uevent listener, VolumeManager.grow) is driven by the real kernel event.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import DaemonConfig, PathsConfig
from agent.control.collect import collect
from agent.daemon import _disk_devno
from agent.grow.watcher import GrowWatcher
from agent.luks_backend import LuksBackend
from agent.volumes import VolumeManager
from luks import disk as luks_disk
from luks import grow, lvm
from luks.grow_plan import INTEGRITY_REASON
from luks.secret import Secret
from luks.volume_plan import CrashWindow
from tests.daemon_support import contract, make_bundle
from tests.guest.storage_support import (
    MIB,
    SECRET,
    Env,
    loop_disk,
    make_volume,
    read_marker,
    resize_loop,
    unique,
    write_marker,
)

if os.environ.get("CVA_IN_GUEST") != "1":  # before any guest-only mark is looked up
    pytest.skip("runs inside the qemu guest (make vm-test)", allow_module_level=True)

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.environ.get("CVA_IN_GUEST") != "1", reason="runs inside the guest"),
]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path / "cva")


class _KeyCount:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> Secret:
        self.calls += 1
        return Secret(bytearray(SECRET))


def _grow(env: Env, vol: object, dev: Path, key: _KeyCount) -> grow.GrowOutcome:
    return grow.grow_mounted(
        vol,  # type: ignore[arg-type]
        key,
        disk=dev,
        runtime_dir=env.runtime_dir,
        mount_base=env.mount_base,
    )


def _fs_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def _lv_bytes(dev: Path, vg: str) -> int:
    return lvm.lv_size(str(dev), vg, "data")


def _names() -> tuple[str, str, bytes]:
    """A fresh volume name, its VG (no dashes) and a marker that names it."""
    name = unique("grow")
    return name, f"vg{name.replace('-', '')}", f"cva-grow-{name}-".encode()


@pytest.mark.parametrize("filesystem", ["ext4", "xfs"])
def test_max_volume_grows_online_with_the_disk(env: Env, tmp_path: Path, filesystem: str) -> None:
    name, vg, marker = _names()
    with loop_disk(tmp_path, 512 * MIB) as dev:
        vol = make_volume(name, lvm=(vg, "data", None), filesystem=filesystem)
        prepared = env.prepare(vol, dev)
        write_marker(prepared, marker)
        before = _fs_bytes(prepared.guest_path)
        assert 400 * MIB < before < 512 * MIB  # "max": the whole VG at create
        key = _KeyCount()
        assert _grow(env, vol, dev, key).status == "unchanged" and key.calls == 0

        resize_loop(dev, 1024 * MIB)
        out = _grow(env, vol, dev, key)
        assert out.status == "grown", out
        assert out.steps == ("pvresize", "lvextend", "crypt-resize", "fs-grow")
        assert key.calls == 1  # the key only for crypt_resize, once
        after = _fs_bytes(prepared.guest_path)
        assert after > before + 450 * MIB and out.fs_bytes is not None
        assert read_marker(prepared) == marker * 64  # data intact, still mounted
        assert _grow(env, vol, dev, key).status == "unchanged"  # idempotent

        # the grown volume opens again as it is (header, seq, filesystem)
        env.release(vol, dev)
        again = env.prepare(vol, dev)
        assert read_marker(again) == marker * 64
        assert _fs_bytes(again.guest_path) == after
        env.release(vol, dev)


def test_fixed_size_lv_keeps_its_size(env: Env, tmp_path: Path) -> None:
    name, vg, _marker = _names()
    with loop_disk(tmp_path, 512 * MIB) as dev:
        vol = make_volume(name, lvm=(vg, "data", 200 * MIB))
        prepared = env.prepare(vol, dev)
        before, lv_before = _fs_bytes(prepared.guest_path), _lv_bytes(dev, vg)
        resize_loop(dev, 1024 * MIB)
        key = _KeyCount()
        out = _grow(env, vol, dev, key)
        assert out.status == "grown" and out.steps == ("pvresize",), out
        assert key.calls == 0
        assert _lv_bytes(dev, vg) == lv_before == 200 * MIB
        assert _fs_bytes(prepared.guest_path) == before
        [group] = lvm.read_state(str(dev)).vgs
        assert group.free > 700 * MIB  # the extra space stays free in the VG
        env.release(vol, dev)


def test_integrity_volume_is_refused_with_its_reason(env: Env, tmp_path: Path) -> None:
    name, vg, _marker = _names()
    with loop_disk(tmp_path, 512 * MIB) as dev:
        vol = make_volume(name, lvm=(vg, "data", None), integrity=True)
        prepared = env.prepare(vol, dev)
        before = _fs_bytes(prepared.guest_path)
        [pv_before] = lvm.read_state(str(dev)).pvs
        resize_loop(dev, 1024 * MIB)
        out = _grow(env, vol, dev, _KeyCount())
        assert out.status == "refused" and out.reason == INTEGRITY_REASON and out.steps == ()
        assert "dm-integrity" in out.reason
        [pv_after] = lvm.read_state(str(dev)).pvs
        assert pv_after.size == pv_before.size  # nothing touched
        assert _fs_bytes(prepared.guest_path) == before
        env.release(vol, dev)


def test_a_shrunk_disk_is_refused_and_nothing_touched(env: Env, tmp_path: Path) -> None:
    name, vg, marker = _names()
    with loop_disk(tmp_path, 512 * MIB) as dev:
        vol = make_volume(name, lvm=(vg, "data", None))
        prepared = env.prepare(vol, dev)
        write_marker(prepared, marker)
        lv_before = _lv_bytes(dev, vg)
        resize_loop(dev, 384 * MIB)
        out = _grow(env, vol, dev, _KeyCount())
        assert out.status == "refused" and "never shrinks" in out.reason, out
        resize_loop(dev, 512 * MIB)  # the host gives it back
        assert _lv_bytes(dev, vg) == lv_before
        assert read_marker(prepared) == marker * 64
        assert _grow(env, vol, dev, _KeyCount()).status == "unchanged"
        env.release(vol, dev)


class _Keys:
    def __init__(self) -> None:
        self.calls = 0

    async def get_resource(self, uri: object) -> Secret:
        self.calls += 1
        return Secret(bytearray(SECRET))

    async def aclose(self) -> None:
        pass


def test_the_daemon_grows_on_the_kernel_resize_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's path: a VolumeManager on the real backend, the netlink uevent listener
    (agent.grow.watcher), the real `change` RESIZE=1 event of `losetup -c`; `cva status` shows
    the grow."""
    name, vg, _marker = _names()
    with loop_disk(tmp_path, 512 * MIB) as dev:
        monkeypatch.setattr(luks_disk, "wait_for_disk", lambda _ref, timeout: dev)
        monkeypatch.setattr(luks_disk, "find", lambda _ref: dev)
        vol = replace(make_volume(name, lvm=(vg, "data", None)), containers=("app",))
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        config = DaemonConfig(
            paths=PathsConfig(
                rootfs_base=tmp_path / "kata", state_dir=state, mount_base=tmp_path / "mnt"
            )
        )
        keys = _Keys()
        manager = VolumeManager(
            replace(contract(), volumes=(vol,)),
            LuksBackend(config),
            keys,
            rootfs_base=tmp_path / "kata",
        )
        make_bundle(tmp_path / "kata", "c1", "app")

        async def scenario() -> tuple[int, int, str | None]:
            watcher = GrowWatcher(manager.mounted, manager.grow, _disk_devno, debounce=0.2)
            assert watcher.start()
            try:
                [bound] = await manager.prepare("c1")
                before = _fs_bytes(bound.guest_path)
                await asyncio.to_thread(resize_loop, dev, 1024 * MIB)
                report = None
                for _ in range(600):  # the kernel's event, the debounce, four steps under TCG
                    await asyncio.sleep(0.2)
                    report = (await collect(manager)).volumes[0]
                    if report.grow is not None:
                        break
                after = _fs_bytes(bound.guest_path)
                await manager.release("c1")
                return before, after, report.grow if report is not None else None
            finally:
                await watcher.aclose()

        before, after, shown = asyncio.run(scenario())
        assert shown == "grown", shown
        assert after > before + 450 * MIB
        assert keys.calls == 2  # the open, then the grow's crypt_resize


GROW_WINDOWS = (
    CrashWindow.GROW_PV_RESIZED,
    CrashWindow.GROW_LV_EXTENDED,
    CrashWindow.GROW_MAPPING_RESIZED,
    CrashWindow.GROW_FS_GROWN,
)


@pytest.mark.parametrize("window", GROW_WINDOWS, ids=lambda w: w.value)
def test_crash_in_online_grow_is_finished_by_the_next_grow(
    env: Env, tmp_path: Path, window: CrashWindow
) -> None:
    """SIGKILL the online grow after each step (luks.volume's GROW_* windows): the volume stays
    mounted with its data, the next grow finishes what is left, and it opens again grown."""
    name, vg, marker = _names()
    with loop_disk(tmp_path, 512 * MIB) as dev:
        vol = make_volume(name, lvm=(vg, "data", None))
        prepared = env.prepare(vol, dev)
        try:
            write_marker(prepared, marker)
            before = _fs_bytes(prepared.guest_path)
            resize_loop(dev, 1024 * MIB)
            child = env.prepare_in_child(vol, dev, window.value, grow=True)
            assert child.returncode == -signal.SIGKILL, child.stderr.decode()
            assert read_marker(prepared) == marker * 64  # still mounted, data intact
            out = _grow(env, vol, dev, _KeyCount())
            expected = "unchanged" if window == CrashWindow.GROW_FS_GROWN else "grown"
            assert out.status == expected, out
            after = _fs_bytes(prepared.guest_path)
            assert after > before + 450 * MIB
            assert read_marker(prepared) == marker * 64
            env.release(vol, dev)
            again = env.prepare(vol, dev)
            assert read_marker(again) == marker * 64 and _fs_bytes(again.guest_path) == after
        finally:
            env.release(vol, dev)
