"""Build (or find) the cached guest image of the VM suite.

The image is built in two layers, each cached under ${CVA_VM_CACHE:-~/.cache/cva-vm}/:

- `base-<base key>/`: a Debian bookworm tree made by mmdebstrap (kernel 6.12 from
  bookworm-backports; recipe/customize.sh) with an empty test venv /opt/venv, plus the wheels
  of the guest tests' tools. Keyed by the recipe files BASE_FILES names, constraints.txt and
  the Debian sources; rebuilt (a few minutes) only when those change.
- `<key>/{root.img,vmlinuz,initrd.img,manifest.json}`: a copy of the base tree with the
  suite's files (recipe/harness.sh: the job runner, the stage step, kata's guest layout:
  kata-containers.target as the default unit, tmp.mount, a stand-in kata-agent.service), into
  which cva is installed exactly as the README tells users - `image/dist.py` (make dist: the
  wheel, its dependencies' wheels, the hash-pinned locks) then `image/install.sh --tee tpm`
  (make rootfs: /opt/cva, the unit, LVM and module settings, the OCI hooks) -, then the test
  tools into /opt/venv; copied into an ext4 file by `mkfs.ext4 -d` (no loop mount). <key>
  adds to the base key every recipe file and everything the wheel and the install step are
  made of (agent/, evidence/, luks/, pyproject.toml, LICENSE, image/, systemd/cva.service;
  not README.md, which only feeds the wheel's long description): a change to cva or to the
  harness costs a product layer (a minute or two), not a Debian bootstrap.

A build goes to a temporary sibling folder and is renamed into place at the end: an
interrupted build never leaves a half cache. Lock files serialise concurrent builds of a key.

    python -m tests.vm.build            # build if needed, print the image folder
    python -m tests.vm.build --key      # print the key only
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = Path(__file__).resolve().parent / "recipe"
# Bump when build.py changes what ends up in the base tree / in the image.
BASE_FORMAT = "cva-vm-base-1"
BUILD_FORMAT = "cva-vm-image-2"
# The recipe files the Debian base tree is made of (customize.sh); the others (harness.sh and
# what it installs) are applied to each image build.
BASE_FILES = (
    "customize.sh", "packages.txt", "guest-python.txt", "modprobe.conf", "journald.conf",
    "cva-vm.network",
)  # fmt: skip
# What the product layer is made of (paths relative to the repo; folders are walked).
PRODUCT_INPUTS = (
    "agent", "evidence", "luks", "pyproject.toml", "LICENSE", "image", "systemd/cva.service",
)  # fmt: skip
GUEST_TEE = "tpm"  # the suite's guest has a (swtpm) TPM: cva's tpm extra and TPM drivers
GUEST_PYTHON = "3.11"  # Debian 12's CPython
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SOURCES = (
    f"deb {MIRROR} bookworm main",
    f"deb {MIRROR} bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
    f"deb {MIRROR} bookworm-backports main",
)
KERNEL_PACKAGE = "linux-image-amd64/bookworm-backports"
# Wheels of the test tools for the guest's CPython 3.11 (Debian 12, glibc 2.36).
WHEEL_PLATFORMS = (
    "manylinux2014_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_34_x86_64",
)
ROOT_LABEL = "cvavmroot"
BUILD_TIMEOUT = 1800.0
PRUNE_DAYS = 7

Log = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """The guest image could not be built; the message names the step and its log file."""


@dataclass(frozen=True)
class GuestImage:
    folder: Path
    key: str

    @property
    def root(self) -> Path:
        return self.folder / "root.img"

    @property
    def kernel(self) -> Path:
        return self.folder / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.folder / "initrd.img"


def cache_root() -> Path:
    configured = os.environ.get("CVA_VM_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "cva-vm"


def _names(lines: str) -> list[str]:
    out = []
    for line in lines.splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            out.append(text)
    return out


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def guest_test_packages() -> list[str]:
    """Top-level packages of the test venv /opt/venv (the product venv is image/install.sh's)."""
    seen: dict[str, str] = {}
    for name in _names((RECIPE / "guest-python.txt").read_text()):
        seen.setdefault(_normalise(name), name)
    return sorted(seen.values(), key=_normalise)


def guest_debian_packages() -> list[str]:
    return _names((RECIPE / "packages.txt").read_text())


def base_key(repo: Path = REPO) -> str:
    digest = hashlib.sha256()
    digest.update(BASE_FORMAT.encode())
    for name in BASE_FILES:
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256((RECIPE / name).read_bytes()).digest())
    digest.update((repo / "constraints.txt").read_bytes())
    digest.update("\n".join(guest_test_packages()).encode())
    digest.update("\n".join((*SOURCES, KERNEL_PACKAGE)).encode())
    return digest.hexdigest()[:16]


def product_files(repo: Path = REPO) -> list[Path]:
    """Every file the product layer is built from (what make dist and image/install.sh read)."""
    found: list[Path] = []
    for name in PRODUCT_INPUTS:
        path = repo / name
        if path.is_dir():
            found += [
                p
                for p in path.rglob("*")
                if (p.is_file() or p.is_symlink())
                and "__pycache__" not in p.parts
                and p.suffix != ".pyc"
            ]
        elif path.exists():
            found.append(path)
    return sorted(found)


def recipe_key(repo: Path = REPO) -> str:
    """The image's key: the base key plus every product input (name, mode, content)."""
    digest = hashlib.sha256()
    digest.update(BUILD_FORMAT.encode() + base_key(repo).encode())
    for path in sorted(p for p in RECIPE.rglob("*") if p.is_file()):  # harness.sh and its files
        digest.update(str(path.relative_to(RECIPE)).encode() + b"\0")
        digest.update(b"x" if os.access(path, os.X_OK) else b"-")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(f"{GUEST_TEE} {GUEST_PYTHON}".encode())
    for path in product_files(repo):
        digest.update(str(path.relative_to(repo)).encode() + b"\0")
        if path.is_symlink():  # image/install.sh refuses those in hooks: key them all the same
            digest.update(b"link:" + os.readlink(path).encode())
        else:
            digest.update(b"x" if os.access(path, os.X_OK) else b"-")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _run(argv: list[str], log_file: Path, step: str, *, env: dict[str, str] | None = None) -> None:
    """Run one build step in its own process group; on timeout or interruption kill the group."""
    with log_file.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        try:
            returncode = proc.wait(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            _kill_group(proc)
            raise ImageBuildError(
                f"{step} timed out after {BUILD_TIMEOUT:.0f} s; see {log_file}"
            ) from exc
        except BaseException:
            _kill_group(proc)
            raise
    if returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-15:]
        raise ImageBuildError(
            f"{step} failed (exit {returncode}); see {log_file}\n" + "\n".join(tail)
        )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a build step this module started, with everything it spawned (mmdebstrap forks)."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)  # reaps the leader; the others keep the group alive
        if not _group_alive(proc.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """rm -rf that never descends into a mount point (a killed mmdebstrap leaves /proc etc.)."""
    if not path.exists():
        return
    for point in _mounts_below(path):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=60, check=False)
    if _mounts_below(path):
        return  # still mounted: leave it rather than delete through a mount
    shutil.rmtree(path, ignore_errors=True)


def _fetch_test_wheels(repo: Path, dest: Path, log_file: Path) -> None:
    """Binary wheels of the guest tests' tools (and what they need) for the guest's CPython."""
    dest.mkdir(parents=True)
    packages = guest_test_packages()
    shutil.copy(repo / "constraints.txt", dest / "constraints.txt")
    (dest / "requirements.txt").write_text("\n".join(packages) + "\n")
    platforms = [arg for plat in WHEEL_PLATFORMS for arg in ("--platform", plat)]
    abi = "cp" + GUEST_PYTHON.replace(".", "")
    _run(
        [
            sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--quiet",
            "--dest", str(dest), "--only-binary=:all:", "--implementation", "cp",
            "--python-version", GUEST_PYTHON, "--abi", abi, *platforms,
            "-c", str(repo / "constraints.txt"), *packages,
        ],
        log_file,
        "pip download of the guest tests' wheels",
    )  # fmt: skip


def _mmdebstrap(rootfs: Path, debcache: Path, log_file: Path) -> None:
    debcache.mkdir(parents=True, exist_ok=True)
    include = ",".join([*guest_debian_packages(), KERNEL_PACKAGE])
    env = dict(os.environ, CVA_VM_RECIPE=str(RECIPE))
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        f"--include={include}",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--skip=essential/unlink",
        "--skip=download/empty",
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
        f"--setup-hook=sync-in {debcache} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {debcache}",
        '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
        '--customize-hook=rm -rf "$1"/var/lib/apt/lists/*',
        f'--customize-hook="{RECIPE / "customize.sh"}" "$1"',
        SUITE,
        str(rootfs),
        *SOURCES,
    ]
    _run(argv, log_file, "mmdebstrap of the guest tree", env=env)


def _is_base_complete(folder: Path) -> bool:
    return (folder / "complete").is_file()


def ensure_base(repo: Path, log: Log) -> Path:
    """The cached base tree (base-<key>/rootfs, base-<key>/testwheels), built when missing."""
    key = base_key(repo)
    root = cache_root()
    final = root / f"base-{key}"
    if _is_base_complete(final):
        os.utime(final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"base-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_base_complete(final):
            return final
        _remove_tree(final)
        work = root / f"base-{key}.tmp-{os.getpid()}"
        _remove_tree(work)
        work.mkdir(parents=True)
        log_file = work / "build.log"
        started = time.monotonic()
        log(f"vm: building the guest base tree {key} (a few minutes; log: {log_file})")
        try:
            _fetch_test_wheels(repo, work / "testwheels", log_file)
            _mmdebstrap(work / "rootfs", root / "debs", log_file)
            (work / "complete").write_text(f"{time.monotonic() - started:.1f}\n")
            work.rename(final)
        except BaseException:
            _remove_tree(work / "rootfs")
            failed = root / f"base-{key}.failed"
            _remove_tree(failed)
            if work.exists():
                work.rename(failed)
            raise
        log(f"vm: guest base tree built in {time.monotonic() - started:.0f} s: {final}")
    return final


def _install_product(repo: Path, base: Path, work: Path, log_file: Path) -> None:
    """cva into a copy of the base tree through make dist + image/install.sh, then the tests'
    tools into /opt/venv (pip there sees /opt/cva's packages and does not install them again)."""
    dist, rootfs = work / "dist", work / "rootfs"
    _run(
        [sys.executable, str(repo / "image" / "dist.py"), "--out", str(dist),
         "--python-version", GUEST_PYTHON],
        log_file,
        "make dist (image/dist.py: the wheel, its dependencies, the locks)",
    )  # fmt: skip
    _run(["cp", "-a", str(base / "rootfs"), str(rootfs)], log_file, "copying the base tree")
    _run([str(RECIPE / "harness.sh"), str(rootfs), str(RECIPE)], log_file,
         "tests/vm/recipe/harness.sh (the suite's job runner, kata's layout)")  # fmt: skip
    _run(
        [str(repo / "image" / "install.sh"), "--rootfs", str(rootfs), "--dist", str(dist),
         "--tee", GUEST_TEE],
        log_file,
        "image/install.sh (make rootfs) into the guest tree",
    )  # fmt: skip
    # The test venv sees the product venv's packages through a .pth (at the end of its path).
    # It names the folder install.sh made (recipe/customize.sh's guess of it, with the system
    # Python's Debian scheme, is overwritten here).
    (product_site,) = (rootfs / "opt" / "cva").glob("lib/python3*/site-packages")
    (test_site,) = (rootfs / "opt" / "venv").glob("lib/python3*/site-packages")
    (test_site / "cva-product.pth").write_text(f"/{product_site.relative_to(rootfs)}\n")
    stage = rootfs / "tmp" / "cva-test-wheels"
    shutil.copytree(base / "testwheels", stage)
    chroot = ["chroot", str(rootfs), "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
              "HOME=/root"]  # fmt: skip
    _run(
        [*chroot, "/opt/venv/bin/pip", "install", "--quiet", "--no-index",
         "--disable-pip-version-check", "--no-cache-dir", "--find-links", "/tmp/cva-test-wheels",
         "-r", "/tmp/cva-test-wheels/requirements.txt",
         "-c", "/tmp/cva-test-wheels/constraints.txt"],
        log_file,
        "pip install of the guest tests' tools into /opt/venv",
    )  # fmt: skip
    shutil.rmtree(stage)
    check = (
        "import agent, pytest, cryptography; "
        "assert agent.__file__.startswith('/opt/cva/'), agent.__file__; "
        "assert cryptography.__file__.startswith('/opt/cva/'), cryptography.__file__"
    )
    _run([*chroot, "/opt/venv/bin/python", "-c", check], log_file,
         "the test venv must import cva and its dependencies from /opt/cva")  # fmt: skip


def _make_disk(rootfs: Path, folder: Path, log_file: Path) -> None:
    used = subprocess.run(
        ["du", "-sm", str(rootfs)], capture_output=True, text=True, check=True, timeout=300
    ).stdout.split()[0]
    size_mb = int(used) * 16 // 10 + 256
    image = folder / "root.img"
    with image.open("wb") as handle:
        handle.truncate(size_mb * 1024 * 1024)
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            ROOT_LABEL,
            "-d",
            str(rootfs),
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            str(image),
        ],
        log_file,
        "mkfs.ext4 -d of the guest tree",
    )

    def newest(pattern: str) -> Path:
        found = sorted((rootfs / "boot").glob(pattern))
        if not found:
            raise ImageBuildError(f"no /boot/{pattern} in the guest tree; see {log_file}")
        return found[-1]

    shutil.copy(newest("vmlinuz-*"), folder / "vmlinuz")
    shutil.copy(newest("initrd.img-*"), folder / "initrd.img")


def _build(repo: Path, key: str, final: Path, log: Log) -> None:
    base = ensure_base(repo, log)
    work = final.parent / f"{key}.tmp-{os.getpid()}"
    _remove_tree(work)
    work.mkdir(parents=True)
    log_file = work / "build.log"
    started = time.monotonic()
    log(f"vm: building the guest image {key} from {base.name} (log: {log_file})")
    try:
        _install_product(repo, base, work, log_file)
        _make_disk(work / "rootfs", work, log_file)
        _remove_tree(work / "rootfs")
        _remove_tree(work / "dist")
        manifest = {
            "key": key,
            "base": base.name,
            "format": BUILD_FORMAT,
            "debian_packages": guest_debian_packages(),
            "kernel": KERNEL_PACKAGE,
            "test_python_packages": guest_test_packages(),
            "tee": GUEST_TEE,
            "seconds": round(time.monotonic() - started, 1),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        work.rename(final)
    except BaseException:
        # Keep the log for the failure message, drop the (large) half-built tree.
        _remove_tree(work / "rootfs")
        _remove_tree(work / "dist")
        failed = final.parent / f"{key}.failed"
        _remove_tree(failed)
        if work.exists():
            work.rename(failed)
        raise
    log(f"vm: guest image built in {time.monotonic() - started:.0f} s: {final}")


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("root.img", "vmlinuz", "initrd.img"))


def ensure_image(repo: Path = REPO, *, log: Log = print) -> GuestImage:
    """Return the cached image for the current recipe, building it first when needed."""
    key = recipe_key(repo)
    root = cache_root()
    folder = root / key
    if not _is_complete(folder):
        root.mkdir(parents=True, exist_ok=True)
        with (root / f"{key}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _is_complete(folder):
                _remove_tree(folder)
                _build(repo, key, folder, log)
            _prune(root, keep=key)
    os.utime(folder)  # last use, for pruning
    return GuestImage(folder, key)


def _prune(root: Path, *, keep: str) -> None:
    """Drop images and base trees of other recipes unused for PRUNE_DAYS (other branches may
    still use some)."""
    cutoff = time.time() - PRUNE_DAYS * 86400
    for folder in root.glob("*.tmp-*"):  # left by a build that was killed
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _remove_tree(folder)
    for folder in root.iterdir():
        if folder.name == keep or not re.fullmatch(r"(base-)?[0-9a-f]{16}(\.failed)?", folder.name):
            continue
        if folder.stat().st_mtime < cutoff:
            _remove_tree(folder)
            (root / f"{folder.name}.lock").unlink(missing_ok=True)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _terminate)  # clean up the half-built tree on kill
    if "--key" in argv:
        print(recipe_key())
        return 0
    try:
        image = ensure_image(log=lambda line: print(line, file=sys.stderr))
    except ImageBuildError as exc:
        print(f"vm image: {exc}", file=sys.stderr)
        return 1
    print(image.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
