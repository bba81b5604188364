"""`run_daemon` as a real process: sd_notify READY/STATUS/STOPPING on a real datagram socket,
`cva prepare|release|list` as clients, SIGTERM with work in flight, no key bytes in any output."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cva
from tests.daemon_support import KEY_MARKER, make_bundle


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    notify: socket.socket
    address: str
    kata: Path
    state: Path

    def messages(self, until: str, timeout: float = 20) -> list[str]:
        """Notify datagrams until one contains `until`."""
        got: list[str] = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.notify.settimeout(max(0.05, end - time.monotonic()))
            try:
                got.append(self.notify.recv(4096).decode())
            except TimeoutError:
                break
            if until in got[-1]:
                return got
        raise AssertionError(f"no {until!r} from the daemon; got {got}; rc={self.proc.poll()}")

    def output(self) -> str:
        out, err = self.proc.communicate(timeout=60)
        return out.decode() + err.decode()


def _start(
    tmp_path: Path,
    spec: dict[str, object],
    *,
    grace: float = 20,
    listen_extra: str = "",
    vsock_port: int = 0,
) -> Proc:
    kata, state = tmp_path / "kata", tmp_path / "state"
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f"""
[listen]
vsock_port = {vsock_port}
unix = "{tmp_path}/cva.sock"
{listen_extra}
[paths]
rootfs_base = "{kata}"
state_dir = "{state}"
mount_base = "{tmp_path}/mnt"
[timeouts]
shutdown_grace = {grace}
[log]
level = "debug"
"""
    )
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    notify_path = str(tmp_path / "notify")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(notify_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), NOTIFY_SOCKET=notify_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.tools.daemon_harness", str(cfg), str(spec_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return Proc(proc, rx, f"unix:{tmp_path}/cva.sock", kata, state)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Proc]:
    p = _start(
        tmp_path,
        {
            "volumes": [{"name": "pg", "containers": ["postgres"]}, {"name": "shared"}],
            "open_delay": 1.0,
        },
    )
    try:
        yield p
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)
        p.notify.close()


def _cva(*args: str) -> subprocess.CompletedProcess[bytes]:
    return run_cva(*args, timeout=60)


def test_ready_then_clients_then_sigterm(daemon: Proc) -> None:
    msgs = daemon.messages("READY=1")
    assert any("STATUS=serving 2 volume(s)" in m for m in msgs)
    assert (daemon.state / "grpc.sock").exists()
    assert oct(daemon.state.stat().st_mode & 0o777) == "0o700"
    assert oct((daemon.state / "grpc.sock").stat().st_mode & 0o077) == "0o0"

    make_bundle(daemon.kata, "c1", "postgres")
    r = _cva("prepare", "c1", "--address", daemon.address)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["container_id"] == "c1"
    assert sorted(v["name"] for v in doc["volumes"]) == ["pg", "shared"]
    assert all(v["state"] == "VOLUME_STATE_BOUND" for v in doc["volumes"])
    # the private socket serves the same API
    r = _cva("list", "--address", f"unix:{daemon.state}/grpc.sock")
    assert r.returncode == 0, r.stderr
    assert {v["name"] for v in json.loads(r.stdout)["volumes"]} == {"pg", "shared"}
    r = _cva("release", "c1", "--address", daemon.address)
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(r.stdout)["closed"]) == ["pg", "shared"]

    daemon.proc.send_signal(signal.SIGTERM)
    assert any("STOPPING=1" in m for m in daemon.messages("STOPPING=1"))
    out = daemon.output()
    assert daemon.proc.returncode == 0, out
    assert not (daemon.state / "grpc.sock").exists()
    _assert_no_key(out)
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert "ready" in events and "stopped" in events


def test_client_errors_are_one_line(daemon: Proc) -> None:
    daemon.messages("READY=1")
    r = _cva("prepare", "../etc", "--address", daemon.address)
    assert r.returncode != 0
    assert r.stderr.decode().strip() == (
        "cva: PrepareVolumes: INVALID_ARGUMENT: container_id must match "
        "[A-Za-z0-9][A-Za-z0-9_.-]+ and be at most 255 characters"
    )
    r = _cva("prepare", "nosuch", "--address", daemon.address)
    assert r.returncode != 0 and b"NOT_FOUND" in r.stderr and b"Traceback" not in r.stderr


def test_sigterm_finishes_in_flight_work(daemon: Proc) -> None:
    daemon.messages("READY=1")
    make_bundle(daemon.kata, "c1", "postgres")
    client = subprocess.Popen(
        [sys.executable, "-m", "agent", "prepare", "c1", "--address", daemon.address],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    daemon.messages("STATUS=preparing")  # the work is in flight (opens take 1 s each)
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.messages("STOPPING=1")
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    assert sorted(v["name"] for v in json.loads(out)["volumes"]) == ["pg", "shared"]
    log = daemon.output()
    assert daemon.proc.returncode == 0, log
    stopped = [json.loads(x) for x in log.splitlines() if '"stopped"' in x]
    assert stopped and stopped[0]["clean"] is True
    # new connections are refused once it stopped
    r = _cva("list", "--address", daemon.address)
    assert r.returncode != 0 and b"UNAVAILABLE" in r.stderr


def test_sigterm_with_stuck_work_exits_after_the_grace(tmp_path: Path) -> None:
    p = _start(tmp_path, {"volumes": [{"name": "pg"}], "open_delay": 30}, grace=0.5)
    try:
        p.messages("READY=1")
        make_bundle(p.kata, "c1", "app")
        client = subprocess.Popen(
            [sys.executable, "-m", "agent", "prepare", "c1", "--address", p.address],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        p.messages("STATUS=preparing")
        p.proc.send_signal(signal.SIGTERM)
        log = p.output()
        assert p.proc.returncode == 1, log  # not clean: the work was cut off
        _out, err = client.communicate(timeout=30)
        assert client.returncode != 0
        assert b"Traceback" not in err
        _assert_no_key(log)
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
        p.notify.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vsock_available() -> bool:
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def test_loopback_tcp_and_vsock_listeners(tmp_path: Path) -> None:
    port = _free_port()
    vport = 0xFFFF_0000 + os.getpid() % 0xFFFF if _vsock_available() else 0
    p = _start(
        tmp_path,
        {"volumes": [{"name": "pg"}]},
        listen_extra=f'tcp = "127.0.0.1:{port}"',
        vsock_port=vport,
    )
    try:
        p.messages("READY=1")
        r = _cva("list", "--address", f"127.0.0.1:{port}")
        assert r.returncode == 0, r.stderr
        p.proc.send_signal(signal.SIGTERM)
        log = p.output()
        assert p.proc.returncode == 0, log
        ready = next(json.loads(x) for x in log.splitlines() if '"ready"' in x)
        assert f"127.0.0.1:{port}" in ready["addresses"]
        assert ready["vsock_port"] == (vport or None)
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
        p.notify.close()


def _assert_no_key(text: str) -> None:
    assert KEY_MARKER.decode() not in text
    assert KEY_MARKER.hex() not in text
    assert KEY_MARKER[:16].hex() not in text
