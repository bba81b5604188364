"""`cva serve` itself, the production startup path (agent.startup: trust, luks backend, lazy KBS
session) on the host with the sample TEE: READY=1, ListVolumes without any key or disk, SIGTERM.
Opening volumes needs root, disks and a KBS: that is the VM suite's job."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import agent
from tests.conftest import REPO, run_cva
from tests.daemon_support import SAMPLE_IMAGE_CONFIG

pytest.importorskip("agent.kbs.client")
pytest.importorskip("luks.volume")


def _recv_until(rx: socket.socket, needle: str, timeout: float = 30) -> list[str]:
    got: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rx.settimeout(max(0.05, end - time.monotonic()))
        try:
            got.append(rx.recv(4096).decode())
        except TimeoutError:
            break
        if needle in got[-1]:
            return got
    raise AssertionError(f"no {needle!r}; got {got}")


def test_serve_ready_list_sigterm(tmp_path: Path) -> None:
    text = (
        (REPO / "examples" / "initdata.toml").read_text().replace('tee = "auto"', 'tee = "sample"')
    )
    (tmp_path / "initdata.toml").write_text(text)
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f"""
[listen]
vsock_port = 0
unix = "{tmp_path}/cva.sock"
[initdata]
devices = ["{tmp_path}/no-disk"]
toml = "{tmp_path}/initdata.toml"
[paths]
rootfs_base = "{tmp_path}/kata"
state_dir = "{tmp_path}/state"
mount_base = "{tmp_path}/state/volumes"
{SAMPLE_IMAGE_CONFIG}"""
    )
    notify = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(notify)
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "serve", "--config", str(cfg)],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO), NOTIFY_SOCKET=notify),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            _recv_until(rx, "READY=1")
            r = run_cva("list", "--address", f"unix:{tmp_path}/cva.sock")
            assert r.returncode == 0, r.stderr
            states = {v["name"]: v["state"] for v in json.loads(r.stdout)["volumes"]}
            assert states == {
                "pgdata": "VOLUME_STATE_CLOSED",
                "shared-config": "VOLUME_STATE_CLOSED",
            }
            r = run_cva("prepare", "nosuch", "--address", f"unix:{tmp_path}/cva.sock")
            assert r.returncode != 0 and b"NOT_FOUND" in r.stderr
            proc.send_signal(signal.SIGTERM)
            _recv_until(rx, "STOPPING=1")
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
    events = [line["event"] for line in lines]
    assert events[:2] == ["trust_established", "ready"] and events[-1] == "stopped"
    assert lines[1]["version"] == agent.__version__  # the ready line names what runs


def test_serve_refuses_unbound_initdata(tmp_path: Path) -> None:
    (tmp_path / "initdata.toml").write_text((REPO / "examples" / "initdata.toml").read_text())
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[initdata]\ndevices = []\ntoml = "{tmp_path}/initdata.toml"\n'
        f'[paths]\nstate_dir = "{tmp_path}/state"\n'
    )
    r = run_cva("serve", "--config", str(cfg))
    assert r.returncode != 0
    assert r.stderr.decode().count("\n") == 1 and b"Traceback" not in r.stderr
