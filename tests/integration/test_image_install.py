"""`make dist` and `image/install.sh` (issue 23): what a platform engineer installs.

- The wheel and its lock install with `--require-hashes`, binary wheels only (so no compiler),
  without the tpm/udev extras, and `cva --version` / `cva initdata` / `cva evidence parse` /
  `cva luks inspect` work there; tpm2-pytss is not even importable.
- image/install.sh run twice against two fresh guest trees gives byte-identical files (content,
  mode, owner, mtime, link targets): the step feeds a measured rootfs. The trees share the host's
  /usr through an overlay (its python3 and venv stand in for the guest's); what the step writes
  lands in each tree and in each overlay's upper folder, which are compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent
from tests.conftest import REPO
from tests.luks_headers import luks2_area, write_image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

INSTALL = REPO / "image" / "install.sh"
EPOCH = "1700000000"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, str(REPO / "image" / "dist.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def _wheel(dist: Path) -> Path:
    (wheel,) = dist.glob("confidential_volume_agent-*-py3-none-any.whl")
    return wheel


def test_dist_builds_a_pure_wheel_and_hash_pinned_locks(dist: Path) -> None:
    wheel = _wheel(dist)
    assert wheel.name == f"confidential_volume_agent-{agent.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(f"confidential_volume_agent-{agent.__version__}.dist-info/METADATA")
    assert "agent/cli/__init__.py" in names and "luks/run.py" in names
    assert not any(n.startswith("tests/") or n.startswith("bench/") for n in names)
    assert any(n.endswith("dist-info/licenses/LICENSE") for n in names)
    text = meta.decode()
    assert 'Requires-Dist: tpm2-pytss>=3.0.0; extra == "tpm"' in text
    assert 'Requires-Dist: pyudev>=0.24.5; extra == "udev"' in text
    lock = (dist / "requirements.lock").read_text()
    assert "cryptography==" in lock and "pyudev==" in lock and "tpm2-pytss" not in lock
    assert "tpm2-pytss==" in (dist / "tpm.lock").read_text()
    # every pinned file is in wheels/ with that hash
    hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (dist / "wheels").iterdir()}
    for lock_name in ("requirements.lock", "tpm.lock"):
        for line in (dist / lock_name).read_text().splitlines():
            if "--hash=sha256:" in line:
                assert line.split("sha256:")[1].rstrip(" \\") in hashes, line


def test_the_wheel_is_reproducible(dist: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "image" / "dist.py"), "--out", str(tmp_path), "--no-deps"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert _wheel(tmp_path).read_bytes() == _wheel(dist).read_bytes()


def test_the_wheel_installs_without_a_compiler_and_the_host_tools_work(
    dist: Path, tmp_path: Path, vectors: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # no compiler on PATH, binary wheels only, nothing from an index, every file hash-checked
    env = {"PATH": f"{venv}/bin:/usr/bin:/bin", "HOME": str(tmp_path), "CC": "/bin/false",
           "PIP_CONFIG_FILE": "/dev/null"}  # fmt: skip
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--no-index",
           "--only-binary=:all:", "--disable-pip-version-check"]  # fmt: skip
    for argv in (
        [*pip, "--find-links", str(dist / "wheels"), "--require-hashes", "-r",
         str(dist / "requirements.lock")],
        [*pip, "--no-deps", str(_wheel(dist))],
    ):  # fmt: skip
        proc = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert proc.returncode == 0, proc.stderr
    cva = str(venv / "bin" / "cva")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [cva, *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    assert run("--version").stdout == f"cva {agent.__version__}\n"
    checked = run("initdata", "check", str(REPO / "examples" / "initdata.toml"))
    assert checked.returncode == 0, checked.stderr
    img = tmp_path / "good.img"
    write_image(img, luks2_area())
    inspected = run("luks", "inspect", str(img))
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["verdict"] == "ok"
    parsed = run("evidence", "parse", str(vectors / "tdx/trustee_tdx_quote_v4.dat"))
    assert parsed.returncode == 0, parsed.stderr
    no_tpm = subprocess.run(
        [str(venv / "bin/python"), "-c", "import tpm2_pytss"], env=env, capture_output=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert no_tpm.returncode != 0  # the tpm extra was not installed, and nothing needed it


# --- image/install.sh ---------------------------------------------------------------------
def _can_build_trees() -> str | None:
    if os.geteuid() != 0:
        return "image/install.sh needs root (chroot)"
    if shutil.which("unshare") is None or not Path("/usr/bin/python3").exists():
        return "needs unshare and /usr/bin/python3"
    probe = subprocess.run(
        ["/usr/bin/python3", "-c", "import ensurepip"], capture_output=True, timeout=60, check=False
    )
    if probe.returncode != 0:
        return "the host's /usr/bin/python3 has no ensurepip (python3-venv)"
    return None


@pytest.fixture
def trees(tmp_path: Path) -> Iterator[Path]:
    why = _can_build_trees()
    if why:
        pytest.skip(why)
    yield tmp_path


def _install(base: Path, dist: Path, *args: str) -> tuple[Path, Path, str]:
    """A guest tree at base/rootfs (made when missing; /usr: an overlay of the host's whose
    upper folder is base/upper, so nothing reaches the host's /usr), install.sh into it."""
    rootfs, upper, work = base / "rootfs", base / "upper", base / "work"
    if not rootfs.exists():
        for d in (rootfs / "usr", rootfs / "etc/lvm", rootfs / "tmp", rootfs / "opt", upper):
            d.mkdir(parents=True)
        for name in ("bin", "sbin", "lib", "lib64"):
            (rootfs / name).symlink_to(f"usr/{name}")
        for path in rootfs.rglob("*"):  # the scaffolding itself: the same in every tree
            os.utime(path, (0, 0), follow_symlinks=False)
    work.mkdir()
    script = (
        f"mount -t overlay overlay -o lowerdir=/usr,upperdir={upper},workdir={work} "
        f"{rootfs}/usr && exec {INSTALL} --rootfs {rootfs} --dist {dist} " + " ".join(args)
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SOURCE_DATE_EPOCH": EPOCH},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shutil.rmtree(work)
    return rootfs, upper, proc.stdout


def _manifest(top: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[object, ...]]:
    """Every entry below top: type, mode, owner, mtime, and content hash or link target."""
    out: dict[str, tuple[object, ...]] = {}
    for path in sorted(top.rglob("*")):
        rel = str(path.relative_to(top))
        if rel.split("/", maxsplit=1)[0] in skip:
            continue
        st = path.lstat()
        if path.is_symlink():
            what: object = ("link", os.readlink(path))
        elif path.is_dir():
            what = "dir"
        else:
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        out[rel] = (what, st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime))
    return out


def test_install_sh_is_reproducible_and_writes_what_the_readme_lists(
    trees: Path, dist: Path
) -> None:
    hooks = trees / "hooks"
    (hooks / "prestart").mkdir(parents=True)
    (hooks / "prestart" / "cva").write_text("#!/bin/sh\nexec /opt/cva/bin/cva hook prestart\n")
    (hooks / "prestart" / ".gitkeep").write_text("")
    config = trees / "config.toml"
    config.write_text('[evidence]\ntee = "tpm"\n')
    args = ("--tee", "tpm", "--hooks", str(hooks), "--config", str(config))
    one = _install(trees / "one", dist, *args)
    two = _install(trees / "two", dist, *args)
    for a, b in ((one[0], two[0]), (one[1], two[1])):
        first, second = _manifest(a, skip=("usr",)), _manifest(b, skip=("usr",))
        assert first == second, sorted(set(first.items()) ^ set(second.items()))[:10]
    rootfs, upper, _ = one
    tree = _manifest(rootfs, skip=("usr",))
    mtimes = {v[4] for k, v in tree.items() if k.startswith(("opt/", "etc/"))}
    assert mtimes == {int(EPOCH)}
    # the venv: cva + locked deps + the tpm and udev extras, no pip, only checked-hash .pyc
    names = set(tree)
    assert "opt/cva/bin/cva" in names and "opt/cva/bin/pip" not in names
    site = next(n for n in names if n.endswith("site-packages/agent/__init__.py"))
    assert site.startswith("opt/cva/lib/python3")
    assert any("/tpm2_pytss/" in n for n in names) and any("/pyudev/" in n for n in names)
    pycs = [rootfs / n for n in names if n.endswith(".pyc")]
    assert pycs and all((p.read_bytes()[4] & 0b11) == 0b11 for p in pycs)  # checked-hash
    # the unit, its WantedBy links, the config, LVM, modules, hooks
    assert (upper / "lib/systemd/system/cva.service").read_bytes() == (
        REPO / "systemd" / "cva.service"
    ).read_bytes()
    for target in ("kata-containers.target", "multi-user.target"):
        link = rootfs / f"etc/systemd/system/{target}.wants/cva.service"
        assert os.readlink(link) == "/usr/lib/systemd/system/cva.service"
    assert (rootfs / "etc/cva/config.toml").read_text() == config.read_text()
    lvm = (rootfs / "etc/lvm/lvmlocal.conf").read_text()
    assert "event_activation = 0" in lvm and "auto_activation_volume_list = []" in lvm
    modules = (rootfs / "etc/modules-load.d/cva.conf").read_text().split()
    assert {"dm_crypt", "dm_integrity", "vmw_vsock_virtio_transport", "tpm_crb"} <= set(modules)
    hook = upper / "share/oci/hooks/prestart/cva"  # /usr: the overlay's upper folder
    assert hook.is_file() and not hook.is_symlink() and hook.stat().st_mode & 0o777 == 0o755
    assert not (upper / "share/oci/hooks/prestart/.gitkeep").exists()
    assert list((rootfs / "tmp").iterdir()) == []


def test_install_sh_without_config_or_tpm_and_refusals(trees: Path, dist: Path) -> None:
    rootfs, _, _ = _install(trees / "plain", dist, "--tee", "tdx")
    assert not (rootfs / "etc/cva").exists()  # no config: cva runs on its defaults
    names = {str(p.relative_to(rootfs)) for p in (rootfs / "opt/cva").rglob("*")}
    assert not any("/tpm2_pytss/" in n for n in names)
    modules = (rootfs / "etc/modules-load.d/cva.conf").read_text().split()
    assert "tdx_guest" in modules and "tpm_crb" not in modules
    # running it again over the same tree gives the same tree (the LVM block is not doubled)
    before = _manifest(rootfs, skip=("usr",))
    _install(trees / "plain", dist, "--tee", "tdx", "--hooks", "/nonexistent")
    assert _manifest(rootfs, skip=("usr",)) == before
    # refusals name the cause
    bad_hooks = trees / "badhooks"
    (bad_hooks / "prestart").mkdir(parents=True)
    (bad_hooks / "prestart" / "cva").symlink_to("/bin/true")
    for extra, message in (
        (("--tee", "sgx"), "--tee sgx: expected tdx, snp or tpm"),
        (("--tee", "tdx", "--hooks", str(bad_hooks)), "kata skips symlinks"),
        (("--tee", "tdx", "--config", "/nonexistent"), "no config file"),
    ):
        proc = subprocess.run(
            [str(INSTALL), "--rootfs", str(rootfs), "--dist", str(dist), *extra],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert proc.returncode != 0 and message in proc.stderr, (extra, proc.stderr)
