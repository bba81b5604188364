"""What cva adds to the guest image (issue 23 #6): MiB of /opt/cva, by package. A figure, no
target yet.

`make dist` (image/dist.py) and `image/install.sh --tee tpm` (the VM suite's choice: every
extra) into a throwaway guest tree whose /usr is an overlay of this host's (its python3 and
venv stand in for the guest's; Debian 12 both), then the apparent size of every file under
/opt/cva, attributed to the distribution whose RECORD names its top-level folder or module
(.pyc included). What no distribution owns (the venv's bin/, pyvenv.cfg, ...) is "venv".
Needs root, unshare and an overlay mount; otherwise not measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.results import Result, measured, not_measured

REPO = Path(__file__).resolve().parents[1]
GROUP = "10. Image footprint: /opt/cva"
NOTES: list[str] = [
    "image/install.sh --tee tpm (cva, its locked dependencies, the tpm and udev extras, "
    "checked-hash .pyc, no pip) into a throwaway tree with the host's CPython 3.11; apparent "
    "file sizes (du --apparent-size), per distribution by its RECORD's top-level names. "
    "A figure to watch, no target."
]
MIB = 1024 * 1024


def planned(reason: str) -> list[Result]:
    return [not_measured("/opt/cva total", reason, unit="MiB", group=GROUP)]


def _install(tmp: Path) -> Path:
    dist = tmp / "dist"
    subprocess.run(
        [sys.executable, str(REPO / "image" / "dist.py"), "--out", str(dist)],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    rootfs, upper, work = tmp / "rootfs", tmp / "upper", tmp / "work"
    for d in (rootfs / "usr", rootfs / "etc/lvm", rootfs / "tmp", rootfs / "opt", upper, work):
        d.mkdir(parents=True)
    for name in ("bin", "sbin", "lib", "lib64"):
        (rootfs / name).symlink_to(f"usr/{name}")
    script = (
        f"mount -t overlay overlay -o lowerdir=/usr,upperdir={upper},workdir={work} "
        f"{rootfs}/usr && exec {REPO}/image/install.sh --rootfs {rootfs} --dist {dist} --tee tpm"
    )
    subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    return rootfs / "opt" / "cva"


def sizes_by_package(venv: Path) -> dict[str, int]:
    """Bytes under `venv` per distribution (by RECORD top-level names), the rest as "venv"."""
    (site,) = venv.glob("lib/python3*/site-packages")
    owner: dict[str, str] = {}
    for info in site.glob("*.dist-info"):
        name = info.name.split("-")[0].replace("_", "-").lower()
        owner[info.name] = name
        record = info / "RECORD"
        if record.exists():
            for line in record.read_text().splitlines():
                top = line.split(",", 1)[0].split("/", 1)[0]
                if top and not top.startswith("..") and top != "__pycache__":
                    owner.setdefault(top, name)
    totals: dict[str, int] = {}
    for path in venv.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        package = "venv"
        if path.is_relative_to(site):
            top = path.relative_to(site).parts[0]
            package = owner.get(top, owner.get(top.removesuffix(".py"), "venv"))
            if top == "__pycache__":  # a top-level module's .pyc: MODULE.cpython-311.pyc
                package = owner.get(path.name.split(".")[0] + ".py", "venv")
        totals[package] = totals.get(package, 0) + path.stat().st_size
    return totals


def collect() -> list[Result]:
    if os.geteuid() != 0:
        return planned("needs root (image/install.sh chroots)")
    with tempfile.TemporaryDirectory(prefix="cva-bench-image-") as d:
        try:
            totals = sizes_by_package(_install(Path(d)))
        except (OSError, subprocess.SubprocessError) as exc:
            return planned(f"could not install into a throwaway tree: {exc}")
    results = [
        measured("/opt/cva total", "MiB", sum(totals.values()) / MIB, group=GROUP,
                 note=f"{len(totals) - 1} distributions + the venv itself")
    ]  # fmt: skip
    for name, size in sorted(totals.items(), key=lambda item: -item[1]):
        results.append(measured(f"/opt/cva: {name}", "MiB", size / MIB, group=GROUP))
    return results
