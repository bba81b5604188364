"""`make dist`: the cva wheel, the wheels of its runtime dependencies, and hash-pinned locks.

    python3 image/dist.py [--out dist] [--python-version 3.11] [--no-deps]

writes into OUT:

- `confidential_volume_agent-VERSION-py3-none-any.whl`, built reproducibly (SOURCE_DATE_EPOCH =
  the last commit's time, or the value already set): the same commit gives the same bytes;
- `wheels/`: binary wheels of every runtime dependency for CPython PYTHON_VERSION on
  manylinux x86_64 (what `image/install.sh` installs offline), plus a tpm2-pytss wheel built
  here (it has no binary wheel upstream; building needs a compiler, libtss2-dev and
  pkg-config, and the same CPython minor version and an older or equal glibc as the guest);
- `requirements.lock`: the core runtime dependencies and the `udev` extra, each `==` pinned
  with the sha256 of the wheels in `wheels/` (`pip install --require-hashes`);
- `tpm.lock`: the `tpm` extra (tpm2-pytss, pinned to the wheel built here, and what it needs
  beyond requirements.lock).

Versions come from constraints.txt. `--no-deps` builds the wheel only. Standard library only:
it runs with the Python that runs pip (`make dist` uses .venv's).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIST_NAME = "confidential-volume-agent"
# Wheels for the guest's CPython on glibc x86_64 (Debian 12: glibc 2.36, Ubuntu 24.04: 2.39).
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux_2_34_x86_64")
CORE_EXTRAS = ("udev",)  # installable from binary wheels everywhere
TPM_PACKAGE = "tpm2-pytss"  # the `tpm` extra: no binary wheel upstream
TIMEOUT = 1800.0


class DistError(RuntimeError):
    pass


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    proc = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        command = " ".join(argv[1:4])
        raise DistError(f"{argv[0]} {command} ... failed (exit {proc.returncode}):\n{tail}")


def source_date_epoch() -> str:
    """SOURCE_DATE_EPOCH if set, else the last commit's time, else 0 (outside git)."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return os.environ["SOURCE_DATE_EPOCH"]
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "log", "-1", "--format=%ct"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out if out.isdigit() else "0"


def build_wheel(out: Path, python: str = sys.executable) -> Path:
    """Build the cva wheel from a clean copy of the tracked sources (no stale build/ dir)."""
    out.mkdir(parents=True, exist_ok=True)
    epoch = source_date_epoch()
    with tempfile.TemporaryDirectory(prefix="cva-dist-") as tmp:
        src = Path(tmp) / "src"
        _copy_sources(src)
        env = dict(os.environ, SOURCE_DATE_EPOCH=epoch, PYTHONHASHSEED="0")
        build = Path(tmp) / "wheel"
        _run(
            [
                python,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-build-isolation",
                "--wheel-dir",
                str(build),
                str(src),
            ],
            env=env,
        )
        (built,) = build.glob("*.whl")
        target = out / built.name
        shutil.copyfile(built, target)
    return target


def _copy_sources(dest: Path) -> None:
    """pyproject.toml, README.md, LICENSE and the packages' files, with fixed modes."""
    names = ["pyproject.toml", "README.md", "LICENSE"]
    for package in ("agent", "evidence", "luks"):
        for path in sorted((REPO / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                names.append(str(path.relative_to(REPO)))
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, target)
        target.chmod(0o644)


def wheel_requirements(wheel: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The wheel's Requires-Dist: (core requirements, {extra: requirements})."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    core: list[str] = []
    extras: dict[str, list[str]] = {}
    for line in meta.get_all("Requires-Dist") or []:
        spec, _, marker = line.partition(";")
        found = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if found:
            extras.setdefault(found.group(1), []).append(spec.strip())
        else:
            core.append(spec.strip())
    return core, extras


def _name(spec: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec)
    if not match:
        raise DistError(f"cannot read the requirement {spec!r}")
    return match.group(0)


def _pip_download(dest: Path, specs: list[str], python_version: str) -> None:
    abi = "cp" + python_version.replace(".", "")
    platforms = [arg for plat in PLATFORMS for arg in ("--platform", plat)]
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--dest",
            str(dest),
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            python_version,
            "--abi",
            abi,
            *platforms,
            "-c",
            str(REPO / "constraints.txt"),
            *specs,
        ]
    )


def _wheel_name_version(path: Path) -> tuple[str, str]:
    if path.suffix == ".whl":
        name, version = path.name.split("-")[:2]
    else:  # sdist: NAME-VERSION.tar.gz
        stem = path.name.removesuffix(".tar.gz")
        name, version = stem.rsplit("-", 1)
    return normalise(name), version


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lock_text(title: str, entries: dict[str, tuple[str, list[Path]]]) -> str:
    lines = [
        f"# {title}",
        "# Written by `make dist` (image/dist.py); install with",
        "#   pip install --no-index --find-links wheels --require-hashes -r requirements.lock",
        "",
    ]
    for name in sorted(entries):
        version, files = entries[name]
        hashes = sorted({_sha256(f) for f in files})
        lines.append(f"{name}=={version} \\")
        lines += [
            f"    --hash=sha256:{h}" + (" \\" if i < len(hashes) - 1 else "")
            for i, h in enumerate(hashes)
        ]
    return "\n".join(lines) + "\n"


def build_dependencies(out: Path, wheel: Path, python_version: str) -> None:
    """wheels/ and the two locks for the runtime dependencies of `wheel`."""
    core, extras = wheel_requirements(wheel)
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    core_specs = core + [s for extra in CORE_EXTRAS for s in extras.get(extra, [])]
    tpm_specs = extras.get("tpm", [])
    if any(normalise(_name(s)) != TPM_PACKAGE for s in tpm_specs):
        raise DistError(f"the tpm extra is expected to hold only {TPM_PACKAGE}: {tpm_specs}")
    with tempfile.TemporaryDirectory(prefix="cva-deps-") as tmp:
        core_dir, tpm_dir = Path(tmp, "core"), Path(tmp, "tpm")
        _pip_download(core_dir, core_specs, python_version)
        # tpm2-pytss's own dependencies (binary), then the package itself from source
        _pip_download(tpm_dir, ["cffi", "packaging", "cryptography"], python_version)
        host = f"{sys.version_info.major}.{sys.version_info.minor}"
        if host != python_version:
            raise DistError(
                f"the {TPM_PACKAGE} wheel is built with this Python ({host}) and would not load"
                f" in the guest's {python_version}; run `make dist` with python{python_version}"
            )
        pin = _pins().get(TPM_PACKAGE)
        spec = f"{TPM_PACKAGE}=={pin}" if pin else TPM_PACKAGE
        env = dict(os.environ, SOURCE_DATE_EPOCH=source_date_epoch())
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-binary",
                TPM_PACKAGE,
                "--wheel-dir",
                str(tpm_dir),
                spec,
            ],
            env=env,
        )
        core_entries: dict[str, tuple[str, list[Path]]] = {}
        for path in sorted(core_dir.iterdir()):
            name, version = _wheel_name_version(path)
            core_entries.setdefault(name, (version, []))[1].append(wheels / path.name)
            shutil.copyfile(path, wheels / path.name)
        tpm_entries: dict[str, tuple[str, list[Path]]] = {}
        for path in sorted(tpm_dir.iterdir()):
            name, version = _wheel_name_version(path)
            if name in core_entries:
                if core_entries[name][0] != version:
                    raise DistError(f"{name}: {version} for tpm, {core_entries[name][0]} core")
                continue
            tpm_entries.setdefault(name, (version, []))[1].append(wheels / path.name)
            shutil.copyfile(path, wheels / path.name)
    note = f"CPython {python_version}, glibc x86_64"
    (out / "requirements.lock").write_text(
        _lock_text(f"cva's runtime dependencies and its udev extra ({note})", core_entries)
    )
    (out / "tpm.lock").write_text(
        _lock_text(
            f"cva's tpm extra ({note}); tpm2-pytss: the wheel make dist built from its sdist",
            tpm_entries,
        )
    )


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if "==" in text:
            name, version = text.split("==", 1)
            pins[normalise(name)] = version.strip()
    return pins


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="image/dist.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    parser.add_argument("--python-version", default="3.11", help="the guest's CPython (X.Y)")
    parser.add_argument("--no-deps", action="store_true", help="the cva wheel only")
    args = parser.parse_args(argv)
    try:
        for old in args.out.glob("confidential_volume_agent-*.whl"):
            old.unlink()
        wheel = build_wheel(args.out)
        print(wheel)
        if not args.no_deps:
            build_dependencies(args.out, wheel, args.python_version)
            print(args.out / "requirements.lock")
            print(args.out / "tpm.lock")
    except DistError as exc:
        print(f"dist: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
