"""Which host tools the VM suite needs, and what to install when one is missing.

python -m tests.vm.preflight    # exit 0: ready; 3: skip (not in CI); 1: missing in CI
"""

from __future__ import annotations

import os
import shutil
import sys

from tests.vm.build import cache_root, recipe_key

# tool -> Debian package that provides it
RUN_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "swtpm": "swtpm",
    "socat": "socat",
}
BUILD_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "pkg-config": "pkg-config",
}
SKIP = 3


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def missing_tools() -> dict[str, str]:
    """Missing tool -> package; build tools only count when the image is not cached yet."""
    needed = dict(RUN_TOOLS)
    if not (cache_root() / recipe_key() / "root.img").is_file():
        needed.update(BUILD_TOOLS)
    return {tool: pkg for tool, pkg in needed.items() if shutil.which(tool) is None}


def missing_message(missing: dict[str, str]) -> str:
    tools = ", ".join(sorted(missing))
    packages = " ".join(sorted(set(missing.values())))
    return f"vm-test: {tools} not found: install the Debian package(s) {packages} (make setup)"


def main() -> int:
    missing = missing_tools()
    if not missing:
        return 0
    print(missing_message(missing), file=sys.stderr)
    return 1 if in_ci() else SKIP


if __name__ == "__main__":
    sys.exit(main())
