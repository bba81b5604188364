"""Build (or find) the cached guest image of the VM suite.

The image is a Debian bookworm tree made by mmdebstrap (kernel 6.12 from bookworm-backports)
with the project's Python dependencies baked into /opt/venv, copied into an ext4 file by
`mkfs.ext4 -d` (no loop mount). It lives in

    ${CVA_VM_CACHE:-~/.cache/cva-vm}/<key>/{root.img,vmlinuz,initrd.img,manifest.json}

where <key> hashes the recipe (tests/vm/recipe/*, the build format), constraints.txt and the
project's dependency list, so it is rebuilt only when one of those changes. A build goes to a
temporary sibling folder and is renamed into place at the end: an interrupted build never
leaves a half cache. A lock file serialises concurrent builds of the same key.

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
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = Path(__file__).resolve().parent / "recipe"
# Bump when build.py changes what ends up in the image.
BUILD_FORMAT = "cva-vm-image-1"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SOURCES = (
    f"deb {MIRROR} bookworm main",
    f"deb {MIRROR} bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
    f"deb {MIRROR} bookworm-backports main",
)
KERNEL_PACKAGE = "linux-image-amd64/bookworm-backports"
# Wheels for the guest's CPython 3.11 (Debian 12, glibc 2.36).
WHEEL_PLATFORMS = (
    "manylinux2014_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_34_x86_64",
)
# Packages without a usable binary wheel: built on the host (same distro and ABI as the guest).
BUILT_ON_HOST = ("tpm2-pytss",)
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


def _requirement_name(spec: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.strip())
    if not match:
        raise ImageBuildError(f"cannot read the requirement {spec!r} in pyproject.toml")
    return match.group(0)


def guest_python_packages(repo: Path = REPO) -> list[str]:
    """Top-level packages of /opt/venv: the project's runtime deps plus the guest test tools."""
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    names = [_requirement_name(spec) for spec in project.get("dependencies", [])]
    names += _names((RECIPE / "guest-python.txt").read_text())
    seen: dict[str, str] = {}
    for name in names:
        seen.setdefault(_normalise(name), name)
    return sorted(seen.values(), key=_normalise)


def guest_debian_packages() -> list[str]:
    return _names((RECIPE / "packages.txt").read_text())


def recipe_key(repo: Path = REPO) -> str:
    digest = hashlib.sha256()
    digest.update(BUILD_FORMAT.encode())
    for path in sorted(p for p in RECIPE.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(RECIPE)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update((repo / "constraints.txt").read_bytes())
    digest.update("\n".join(guest_python_packages(repo)).encode())
    digest.update("\n".join((*SOURCES, KERNEL_PACKAGE)).encode())
    return digest.hexdigest()[:16]


def _pins(repo: Path) -> dict[str, str]:
    pins = {}
    for line in _names((repo / "constraints.txt").read_text()):
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_normalise(name)] = version.strip()
    return pins


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


def _fetch_wheels(repo: Path, dest: Path, log_file: Path) -> None:
    """Download binary wheels for the guest and build the ones that have none, on the host."""
    dest.mkdir(parents=True)
    packages = guest_python_packages(repo)
    built_here = {_normalise(n) for n in BUILT_ON_HOST}
    pins = _pins(repo)
    shutil.copy(repo / "constraints.txt", dest / "constraints.txt")
    (dest / "requirements.txt").write_text("\n".join(packages) + "\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    download = [p for p in packages if _normalise(p) not in built_here]
    # What the host-built packages need at run time must come as wheels too.
    download += ["cffi", "packaging"]
    platforms = [arg for plat in WHEEL_PLATFORMS for arg in ("--platform", plat)]
    _run(
        [
            *pip,
            "download",
            "--quiet",
            "--dest",
            str(dest),
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            "3.11",
            "--abi",
            "cp311",
            *platforms,
            "-c",
            str(repo / "constraints.txt"),
            *download,
        ],
        log_file,
        "pip download of the guest's wheels",
    )
    for name in BUILT_ON_HOST:
        if _normalise(name) not in {_normalise(p) for p in packages}:
            continue
        version = pins.get(_normalise(name))
        spec = f"{name}=={version}" if version else name
        _run(
            [*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), spec],
            log_file,
            f"building a wheel for {spec} on the host (needs libtss2-dev and pkg-config)",
        )


def _mmdebstrap(rootfs: Path, wheels: Path, debcache: Path, log_file: Path) -> None:
    debcache.mkdir(parents=True, exist_ok=True)
    include = ",".join([*guest_debian_packages(), KERNEL_PACKAGE])
    env = dict(os.environ, CVA_VM_RECIPE=str(RECIPE), CVA_VM_WHEELS=str(wheels))
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
    work = final.parent / f"{key}.tmp-{os.getpid()}"
    _remove_tree(work)
    work.mkdir(parents=True)
    log_file = work / "build.log"
    started = time.monotonic()
    log(f"vm: building the guest image {key} (a few minutes; log: {log_file})")
    try:
        _fetch_wheels(repo, work / "wheels", log_file)
        _mmdebstrap(work / "rootfs", work / "wheels", final.parent / "debs", log_file)
        _make_disk(work / "rootfs", work, log_file)
        _remove_tree(work / "rootfs")
        _remove_tree(work / "wheels")
        manifest = {
            "key": key,
            "format": BUILD_FORMAT,
            "debian_packages": guest_debian_packages(),
            "kernel": KERNEL_PACKAGE,
            "python_packages": guest_python_packages(repo),
            "seconds": round(time.monotonic() - started, 1),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        work.rename(final)
    except BaseException:
        # Keep the log for the failure message, drop the (large) half-built tree.
        _remove_tree(work / "rootfs")
        _remove_tree(work / "wheels")
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
    """Drop images of other recipes unused for PRUNE_DAYS (other branches may still use some)."""
    cutoff = time.time() - PRUNE_DAYS * 86400
    for folder in root.glob("*.tmp-*"):  # left by a build that was killed
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _remove_tree(folder)
    for folder in root.iterdir():
        if folder.name == keep or not re.fullmatch(r"[0-9a-f]{16}(\.failed)?", folder.name):
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
