"""systemd/cva.service: `systemd-analyze verify` clean, and the options cva depends on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

UNIT = REPO / "systemd" / "cva.service"
SYSTEM_UNITS = Path("/lib/systemd/system")
# options that give the unit its own mount namespace: its mounts would never reach kata-agent
MOUNT_NAMESPACE_OPTIONS = (
    "PrivateMounts",
    "PrivateDevices",
    "PrivateTmp",
    "ProtectHome",
    "ProtectSystem",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "MountFlags",
    "ProtectClock",  # implies a DeviceAllow list: would cut off hot-plugged disks
)


def _unit() -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    return cp


def test_required_settings() -> None:
    u = _unit()
    s = u["Service"]
    assert s["Type"] == "notify"
    assert s["Restart"] == "on-failure"
    assert "kata-agent.service" in u["Unit"]["Before"]
    assert int(u["Unit"]["StartLimitBurst"]) > 0
    assert s["NoNewPrivileges"] == "yes"
    assert s["RuntimeDirectory"] == "cva" and s["RuntimeDirectoryMode"] == "0700"
    assert s["RuntimeDirectoryPreserve"] == "yes"
    assert s["StandardOutput"] == "journal"
    assert "serve" in s["ExecStart"]


def test_the_image_layout_kata_and_defaults() -> None:
    """cva from image/install.sh's venv; started by kata's own target (a Kata guest never
    reaches multi-user.target); no --config, so a missing /etc/cva/config.toml means defaults."""
    u = _unit()
    assert u["Service"]["ExecStart"] == "/opt/cva/bin/cva serve"
    assert u["Install"]["WantedBy"].split() == ["kata-containers.target", "multi-user.target"]


def test_no_mount_namespace() -> None:
    present = set(_unit()["Service"])
    assert present.isdisjoint(MOUNT_NAMESPACE_OPTIONS), present & set(MOUNT_NAMESPACE_OPTIONS)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or not SYSTEM_UNITS.is_dir(),
    reason="systemd-analyze and the system units are needed",
)
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/cva.service")
    exe = root / "opt/cva/bin/cva"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    r = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            f"--root={root}",
            "/etc/systemd/system/cva.service",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
