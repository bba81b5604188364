"""Regenerate the committed gRPC/protobuf code from `protos/` (`make proto`).

protoc's Python output imports by proto path (`from cva.v1 import agent_pb2`), so the generated
modules are rewritten to import from their real package, `agent._proto.cva.v1`. The output is a
pure function of the .proto files and the pinned grpcio-tools / mypy-protobuf versions; the unit
test `tests/unit/test_proto_fresh.py` regenerates into a temporary directory and fails when the
committed files differ (stale output). `python -m tests.tools.gen_proto --check` does the same.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
# every .proto under protos/ (cva's API, the ttRPC envelope, CDH's SecureMount API)
PROTO_FILES = tuple(
    sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
)
PACKAGE = "agent._proto"  # the Python package the proto root maps to
OUT_DIR = REPO / "agent" / "_proto"
_INIT = '"""Generated code (make proto); do not edit."""\n'


def _plugin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    found = str(exe) if exe.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"gen_proto: {name} not found; install mypy-protobuf (make setup)")
    return found


def _rewrite_imports(text: str) -> str:
    for proto in PROTO_FILES:
        pkg = ".".join(Path(proto).parent.parts)
        text = text.replace(f"from {pkg} import ", f"from {PACKAGE}.{pkg} import ")
        text = text.replace(f"import {pkg}.", f"import {PACKAGE}.{pkg}.")
    return text


def generate(out_dir: Path) -> list[Path]:
    """Generate every proto into `out_dir` (the directory of package `agent._proto`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cva-proto-") as tmp:
        argv = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            *PROTO_FILES,
        ]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)
        written: list[Path] = []
        for src in sorted(Path(tmp).rglob("*")):
            if not src.is_file():
                continue
            rel = src.relative_to(tmp)
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(_rewrite_imports(src.read_text()))
            written.append(dst)
        # every directory on the way is a real package
        for d in {out_dir, *(p.parent for p in written)}:
            while True:
                init = d / "__init__.py"
                if not init.exists():
                    init.write_text(_INIT)
                if d == out_dir:
                    break
                d = d.parent
        return written


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> text of every generated file under `root`."""
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def stale_files(committed: Path = OUT_DIR) -> list[str]:
    """Files whose committed text differs from a fresh generation (empty = up to date)."""
    with tempfile.TemporaryDirectory(prefix="cva-proto-check-") as tmp:
        generate(Path(tmp))
        fresh = snapshot(Path(tmp))
    have = snapshot(committed) if committed.is_dir() else {}
    return sorted(k for k in fresh.keys() | have.keys() if fresh.get(k) != have.get(k))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the committed output is stale")
    args = ap.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print(f"gen_proto: stale generated code: {', '.join(stale)}; run `make proto`")
            return 1
        print("gen_proto: generated code is up to date")
        return 0
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    for path in generate(OUT_DIR):
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
