"""The prestart hook's daemon side (agent.hook.server) over a real SOCK_SEQPACKET socket, and
the `cva hook prestart` process run as kata-agent runs it (empty environment, argv
`[name, "prestart"]`, the OCI state on stdin), against a real "container init" process that
must be SIGKILLed whenever its volumes cannot be bound. The bind into a container's mount
namespace itself is tested in the guest (tests/vm/test_e2e_hook.py)."""

from __future__ import annotations

import array
import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.contract import DiskRef, Volume
from agent.errors import CvaError
from agent.hook.server import HookServer
from agent.hook.wire import (
    MAX_MESSAGE,
    Done,
    Request,
    encode_done,
    encode_request,
)
from agent.volumes import OpenedVolume, VolumeManager, VolumeState
from tests.daemon_support import FakeKeySource, MemoryBackend, contract, make_bundle, volume

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Setup:
    tmp: Path
    base: Path
    state_dir: Path
    manager: VolumeManager
    server: HookServer
    clone_dir: Path

    @property
    def sock(self) -> Path:
        return self.server.path


def _init() -> subprocess.Popen[bytes]:
    """A stand-in for the container's init, waiting before its pivot_root."""
    return subprocess.Popen(["sleep", "120"])


@pytest.fixture
def init() -> Iterator[subprocess.Popen[bytes]]:
    proc = _init()
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _killed(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    try:
        return proc.wait(timeout) == -9
    except subprocess.TimeoutExpired:
        return False


async def _setup(tmp: Path, keys: FakeKeySource | None = None) -> Setup:
    base = tmp / "kata"
    state = tmp / "state"
    state.mkdir(mode=0o700)
    clone_dir = tmp / "volume-root"
    clone_dir.mkdir()
    c = contract(volume("pg", containers=("postgres",), mount="/var/lib/pg"))
    manager = VolumeManager(c, MemoryBackend(), keys or FakeKeySource(), rootfs_base=base)

    def clone(vol: Volume, opened: OpenedVolume) -> tuple[int, str]:
        fd = os.open(clone_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        return fd, f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"

    server = HookServer(manager, state / "hook.sock", rootfs_base=base, clone=clone)
    await server.start()
    return Setup(tmp, base, state, manager, server, clone_dir)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    s = await _setup(tmp_path)
    try:
        yield s
    finally:
        await s.server.close(1)


async def _exchange(
    s: Setup, cid: str, pid: int, *, bundle: str | None = None
) -> tuple[socket.socket, dict[str, object], list[int]]:
    """Play the hook: send the request, return the connection, the answer and its fds."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    await loop.sock_connect(sock, str(s.sock))
    req = Request(cid, pid, bundle or str(s.base / cid), 5.0)
    await loop.sock_sendall(sock, encode_request(req))

    def recv() -> tuple[bytes, list[int]]:
        sock.setblocking(True)
        sock.settimeout(10)
        fds = array.array("i")
        data, anc, _flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(64 * 4))
        for _level, _kind, payload in anc:
            fds.frombytes(payload)
        return data, list(fds)

    data, fds = await asyncio.to_thread(recv)
    return sock, json.loads(data), fds


async def test_no_volumes_answers_at_once(setup: Setup, init: subprocess.Popen[bytes]) -> None:
    make_bundle(setup.base, "pause1", "pause")
    sock, answer, fds = await _exchange(setup, "pause1", init.pid)
    sock.close()
    assert answer == {"ok": True, "rootfs": str(setup.base / "pause1" / "rootfs"), "volumes": []}
    assert fds == []
    await asyncio.sleep(0.2)
    assert init.poll() is None, "a container without volumes runs"


async def test_volumes_are_handed_over_and_done_records_the_binding(
    setup: Setup, init: subprocess.Popen[bytes]
) -> None:
    make_bundle(setup.base, "c1", "postgres")
    sock, answer, fds = await _exchange(setup, "c1", init.pid)
    assert len(fds) == 1
    st = os.fstat(fds[0])
    vol = answer["volumes"][0]  # type: ignore[index]
    assert vol == {
        "name": "pg",
        "mount": "/var/lib/pg",
        "read_only": False,
        "dev": f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}",
        "remove": None,
    }
    assert (st.st_dev, st.st_ino) == (setup.clone_dir.stat().st_dev, setup.clone_dir.stat().st_ino)
    for fd in fds:
        os.close(fd)
    sock.setblocking(True)
    sock.send(encode_done(Done(True)))
    sock.close()
    for _ in range(50):
        listed = await setup.manager.list()
        if listed[0].container_ids == ("c1",):
            break
        await asyncio.sleep(0.05)
    assert listed[0].state is VolumeState.BOUND and listed[0].container_ids == ("c1",)
    assert init.poll() is None


async def test_connection_dropped_before_done_kills_the_init(
    setup: Setup, init: subprocess.Popen[bytes]
) -> None:
    make_bundle(setup.base, "c1", "postgres")
    sock, answer, fds = await _exchange(setup, "c1", init.pid)
    assert answer["ok"] is True
    for fd in fds:
        os.close(fd)
    sock.close()  # the hook died (kata's 10 s SIGKILL, a crash)
    assert await asyncio.to_thread(_killed, init)


async def test_hook_bind_failure_kills_the_init(
    setup: Setup, init: subprocess.Popen[bytes]
) -> None:
    make_bundle(setup.base, "c1", "postgres")
    sock, _answer, fds = await _exchange(setup, "c1", init.pid)
    for fd in fds:
        os.close(fd)
    sock.setblocking(True)
    sock.send(encode_done(Done(False, "mount target is not a directory")))
    assert await asyncio.to_thread(_killed, init)
    sock.close()


async def test_kbs_refusal_kills_the_init_and_names_the_cause(
    tmp_path: Path, init: subprocess.Popen[bytes]
) -> None:
    s = await _setup(tmp_path, FakeKeySource(fail=CvaError("KBS refused the resource")))
    try:
        make_bundle(s.base, "c1", "postgres")
        sock, answer, fds = await _exchange(s, "c1", init.pid)
        sock.close()
        assert answer == {"ok": False, "error": "KBS refused the resource"}
        assert fds == []
        assert await asyncio.to_thread(_killed, init)
    finally:
        await s.server.close(1)


async def test_a_bundle_other_than_cvas_is_refused(
    setup: Setup, init: subprocess.Popen[bytes]
) -> None:
    make_bundle(setup.base, "c1", "postgres")
    sock, answer, _fds = await _exchange(setup, "c1", init.pid, bundle="/tmp/elsewhere")
    sock.close()
    assert answer["ok"] is False and "not cva's bundle" in str(answer["error"])
    assert await asyncio.to_thread(_killed, init)


async def test_unknown_container_is_refused(setup: Setup, init: subprocess.Popen[bytes]) -> None:
    sock, answer, _fds = await _exchange(setup, "nobundle", init.pid)
    sock.close()
    assert answer["ok"] is False and "no container nobundle" in str(answer["error"])
    assert await asyncio.to_thread(_killed, init)


# --- the hook process, run as kata-agent runs it -------------------------------------------


def _hook_config(tmp: Path, state_dir: Path, base: Path) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(
        f'[listen]\nvsock_port = 0\nunix = "{tmp / "api.sock"}"\n\n'
        f'[paths]\nstate_dir = "{state_dir}"\nrootfs_base = "{base}"\n'
        f'mount_base = "{tmp / "volumes"}"\n'
    )
    return cfg


async def _run_hook(cfg: Path, state: dict[str, object], *extra: str) -> tuple[int, str, float]:
    """`cva hook prestart` with an empty environment, argv[0] = the hook file's name."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "hook",
        "prestart",
        "--config",
        str(cfg),
        *extra,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={},
        cwd=REPO,
    )
    _out, err = await asyncio.wait_for(proc.communicate(json.dumps(state).encode()), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode(), time.monotonic() - started


def _state(base: Path, cid: str, pid: int) -> dict[str, object]:
    return {
        "ociVersion": "1.1.0",
        "id": cid,
        "status": "created",
        "pid": pid,
        "bundle": str(base / cid),
    }


async def test_hook_process_no_volumes(setup: Setup, init: subprocess.Popen[bytes]) -> None:
    make_bundle(setup.base, "pause1", "pause")
    cfg = _hook_config(setup.tmp, setup.state_dir, setup.base)
    rc, err, _took = await _run_hook(cfg, _state(setup.base, "pause1", init.pid))
    assert (rc, err) == (0, "")
    assert init.poll() is None


async def test_hook_process_daemon_down_kills_the_init(
    tmp_path: Path, init: subprocess.Popen[bytes]
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    cfg = _hook_config(tmp_path, state_dir, tmp_path / "kata")
    rc, err, _took = await _run_hook(cfg, _state(tmp_path / "kata", "c1", init.pid))
    assert rc == 1
    assert err.startswith("cva hook prestart: cva is not reachable") and err.count("\n") == 1
    assert await asyncio.to_thread(_killed, init)


async def test_hook_process_refusal_kills_the_init(
    tmp_path: Path, init: subprocess.Popen[bytes]
) -> None:
    s = await _setup(tmp_path, FakeKeySource(fail=CvaError("KBS refused the resource")))
    try:
        make_bundle(s.base, "c1", "postgres")
        cfg = _hook_config(tmp_path, s.state_dir, s.base)
        rc, err, _took = await _run_hook(cfg, _state(s.base, "c1", init.pid))
        assert (rc, err) == (1, "cva hook prestart: KBS refused the resource\n")
        assert await asyncio.to_thread(_killed, init)
    finally:
        await s.server.close(1)


async def test_hook_process_refuses_to_bind_in_the_agents_namespace(
    setup: Setup, init: subprocess.Popen[bytes]
) -> None:
    """The stand-in init shares this mount namespace: the hook must not bind there (that is
    the agent's namespace, whose mounts do not reach a real container) -> init killed."""
    make_bundle(setup.base, "c1", "postgres")
    cfg = _hook_config(setup.tmp, setup.state_dir, setup.base)
    rc, err, _took = await _run_hook(cfg, _state(setup.base, "c1", init.pid))
    assert rc == 1 and "shares the agent's mount namespace" in err
    assert await asyncio.to_thread(_killed, init)


async def test_hook_process_bad_state_exits_nonzero(setup: Setup) -> None:
    cfg = _hook_config(setup.tmp, setup.state_dir, setup.base)
    rc, err, _took = await _run_hook(cfg, {"id": "c1", "pid": "x"})
    assert rc == 1 and "pid" in err


def test_hook_process_imports_no_grpc() -> None:
    code = (
        "import sys, agent.cli.hook, agent.hook.prestart, agent.config, luks.mount;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('grpc', 'google', 'httpx',"
        " 'cryptography') or m in ('agent.volumes', 'agent.rpc', 'asyncio')];"
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={}, capture_output=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


async def test_hook_gone_while_the_volume_opens_kills_the_init_at_once(
    tmp_path: Path, init: subprocess.Popen[bytes]
) -> None:
    """Kata SIGKILLs a hook at 10 s: the daemon sees the connection end while the open is
    still running, kills the container's init, and lets the (shielded) open finish."""
    s = await _setup(tmp_path)
    backend = s.manager._backend
    assert isinstance(backend, MemoryBackend)
    gate = threading.Event()
    backend.open_gate = gate
    try:
        make_bundle(s.base, "c1", "postgres")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        await loop.sock_connect(sock, str(s.sock))
        await loop.sock_sendall(
            sock, encode_request(Request("c1", init.pid, str(s.base / "c1"), 30))
        )
        await asyncio.sleep(0.3)
        sock.close()
        assert await asyncio.to_thread(_killed, init)
        gate.set()
        for _ in range(100):
            if ("open", "pg") in backend.calls and "pg" in backend.mounted:
                break
            await asyncio.sleep(0.05)
        assert "pg" in backend.mounted, "the open itself goes on (a retry finds it ready)"
    finally:
        gate.set()
        await s.server.close(1)


# --- the whole path on this host's kernel: a kata-shaped launcher, a real mount namespace ----


def _can_mount() -> bool:
    return os.geteuid() == 0 and Path("/proc/self/ns/mnt").exists()


@pytest.mark.skipif(not _can_mount(), reason="needs root and mount namespaces")
async def test_hook_binds_inside_the_containers_mount_namespace(tmp_path: Path) -> None:
    """The launcher (tests.tools.kata_launcher: rustjail's rslave + private parent + rootfs
    self-bind) runs the real hook file; the daemon side hands over a detached clone of a tmpfs
    standing in for the volume. The container sees it at its path after pivot_root; the
    launcher's (agent's) namespace has nothing mounted under the rootfs."""
    from luks import mount as luks_mount

    vol_dir = tmp_path / "volume-mount"
    vol_dir.mkdir()
    luks_mount._mount("tmpfs", str(vol_dir), "tmpfs", 0, "mode=0700")
    try:
        (vol_dir / "marker").write_text("from the volume")

        def clone(vol: Volume, opened: OpenedVolume) -> tuple[int, str]:
            src = os.open(vol_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                tree = luks_mount._open_tree(
                    src,
                    "",
                    luks_mount.OPEN_TREE_CLONE
                    | luks_mount.OPEN_TREE_CLOEXEC
                    | luks_mount.AT_EMPTY_PATH,
                )
            finally:
                os.close(src)
            luks_mount._mount_setattr(tree, luks_mount.bind_attrs(read_only=vol.read_only))
            st = os.fstat(tree)
            return tree, f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"

        base = tmp_path / "kata"
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        vol = dataclasses.replace(
            volume("pg", containers=("postgres",), mount="/var/lib/pg"),
            disk=DiskRef("container", "/dev/xvdz"),
        )
        backend = MemoryBackend()
        manager = VolumeManager(contract(vol), backend, FakeKeySource(), rootfs_base=base)
        server = HookServer(manager, state / "hook.sock", rootfs_base=base, clone=clone)
        await server.start()
        try:
            bundle = make_bundle(base, "c1", "postgres")
            spec = json.loads((bundle / "config.json").read_text())
            spec["linux"] = {
                "devices": [{"path": "/dev/xvdz", "type": "b", "major": 7, "minor": 0}]
            }
            (bundle / "config.json").write_text(json.dumps(spec))
            (bundle / "rootfs" / "var" / "lib").mkdir(parents=True)
            (bundle / "rootfs" / "var" / "lib" / "pg").symlink_to("/../../../../etc")  # clamped
            cfg = _hook_config(tmp_path, state, base)
            hooks = tmp_path / "hooks" / "prestart"
            hooks.mkdir(parents=True)
            hook = hooks / "cva"
            hook.write_text(
                f"#!/bin/sh\ncd {REPO} && exec {sys.executable} -m agent hook prestart"
                f" --config {cfg}\n"
            )
            hook.chmod(0o755)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.tools.kata_launcher",
                "--bundle", str(bundle), "--hooks", str(tmp_path / "hooks"),
                "--check", "/var/lib/pg", "--read", "/var/lib/pg/marker",
                "--write", "/var/lib/pg/from-container=hello",
                stdout=asyncio.subprocess.PIPE, cwd=REPO,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            await server.close(1)
        report = json.loads(out)
        assert report["hooks"][0]["rc"] == 0, report["hooks"]
        assert report["started"], report
        seen = report["container"]
        assert seen["read"] == {"/var/lib/pg/marker": "from the volume"}
        assert seen["paths"]["/var/lib/pg"]["own_fs"]
        assert (vol_dir / "from-container").read_text() == "hello"
        assert report["agent_ns_mounts_under_rootfs"] == []
        # disk = "container:/dev/xvdz": resolved from the spec, its raw node gone from /dev
        assert seen["devices"] == {"/dev/xvdz": False}
        assert not (Path("/etc") / "from-container").exists()
        # the symlink was followed inside the rootfs: its target was made there
        assert (bundle / "rootfs" / "etc").is_dir()
    finally:
        luks_mount._umount(str(vol_dir), luks_mount.MNT_DETACH)


async def test_a_blank_proof_past_the_budget_names_the_way_out(
    tmp_path: Path, init: subprocess.Popen[bytes]
) -> None:
    """First create of a large disk: the blank proof cannot finish in the hook's budget; the
    refusal says how far it got and names blank_check = "sampled"; the init is killed."""
    s = await _setup(tmp_path)
    backend = s.manager._backend
    assert isinstance(backend, MemoryBackend)
    gate = threading.Event()
    backend.open_gate = gate
    backend.scan_report = ("disk", 3 << 30, 64 << 30)
    try:
        make_bundle(s.base, "c1", "postgres")
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        await loop.sock_connect(sock, str(s.sock))
        req = Request("c1", init.pid, str(s.base / "c1"), 1.0)
        await loop.sock_sendall(sock, encode_request(req))
        data = await asyncio.wait_for(loop.sock_recv(sock, MAX_MESSAGE), 10)
        sock.close()
        answer = json.loads(data)
        assert answer["ok"] is False
        assert "read 3072 of 65536 MiB" in answer["error"]
        assert 'blank_check = "sampled"' in answer["error"]
        assert await asyncio.to_thread(_killed, init)
    finally:
        gate.set()
        await s.server.close(1)


async def test_hook_process_own_budget_kills_the_init(
    tmp_path: Path, init: subprocess.Popen[bytes]
) -> None:
    """The volume is not ready within the hook's budget (here 2 s; 8 s by default): the hook
    kills the init itself and exits 1 with one line, well before kata's 10 s."""
    s = await _setup(tmp_path)
    backend = s.manager._backend
    assert isinstance(backend, MemoryBackend)
    gate = threading.Event()
    backend.open_gate = gate
    try:
        make_bundle(s.base, "c1", "postgres")
        cfg = _hook_config(tmp_path, s.state_dir, s.base)
        rc, err, _took = await _run_hook(cfg, _state(s.base, "c1", init.pid), "--budget", "2")
        assert rc == 1 and err.startswith("cva hook prestart: ") and err.count("\n") == 1, err
        assert "not ready within the hook's" in err or "budget" in err, err
        assert await asyncio.to_thread(_killed, init)
    finally:
        gate.set()
        await s.server.close(1)


async def test_a_hook_budget_out_of_range_fails_closed(
    setup: Setup, init: subprocess.Popen[bytes]
) -> None:
    cfg = _hook_config(setup.tmp, setup.state_dir, setup.base)
    rc, err, _took = await _run_hook(cfg, _state(setup.base, "c1", init.pid), "--budget", "1000")
    assert rc == 1 and "--budget" in err
    assert await asyncio.to_thread(_killed, init), "a broken hook file fails closed"


async def test_a_pvc_attached_again_under_another_number_is_reopened(tmp_path: Path) -> None:
    """A restarted container: kata attached its PVC again (new MAJ:MIN); the volume open on
    the old, detached disk is closed and opened on the new one."""
    base = tmp_path / "kata"
    vol = dataclasses.replace(
        volume("pg", containers=("postgres",), mount="/var/lib/pg"),
        disk=DiskRef("container", "/dev/xvdz"),
    )
    backend = MemoryBackend()
    manager = VolumeManager(contract(vol), backend, FakeKeySource(), rootfs_base=base)
    for cid, minor in (("c1", 16), ("c2", 16), ("c3", 32)):
        bundle = make_bundle(base, cid, "postgres")
        spec = json.loads((bundle / "config.json").read_text())
        spec["linux"] = {
            "devices": [{"path": "/dev/xvdz", "type": "b", "major": 8, "minor": minor}]
        }
        (bundle / "config.json").write_text(json.dumps(spec))
        ((v, _opened),) = await manager.open_for_container(cid)
        assert v.disk == DiskRef("container", "/dev/xvdz")
    assert [c for c in backend.calls if c[0] in ("open", "close")] == [
        ("open", "pg"),
        ("close", "pg"),
        ("open", "pg"),
    ]
