"""The import-linter contracts (pyproject [tool.importlinter], run by `make lint`) hold on this
tree, and really fail on a deliberate bad import: a copy of the three packages in tmp_path where
one luks module imports agent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONFIG = """
[importlinter]
root_packages =
    agent
    evidence
    luks

[importlinter:contract:luks-library]
name = luks is a library: it imports neither agent nor evidence
type = forbidden
source_modules =
    luks
forbidden_modules =
    agent
    evidence
"""


def _lint(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _copy_tree(dest: Path) -> None:
    for pkg in ("agent", "evidence", "luks"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))


def test_a_luks_module_importing_agent_breaks_the_contract(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    (tmp_path / ".importlinter").write_text(CONFIG)
    clean = _lint(tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    mount = tmp_path / "luks" / "mount.py"
    mount.write_text(mount.read_text() + "\nimport agent.errors  # deliberate bad import\n")
    broken = _lint(tmp_path)
    assert broken.returncode != 0
    assert "luks is a library: it imports neither agent nor evidence BROKEN" in broken.stdout
    assert "luks.mount -> agent.errors" in broken.stdout


def test_the_repository_keeps_every_contract() -> None:
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout
