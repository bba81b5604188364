"""Child process of the crash-window tests: prepare one volume (or, with `"grow": true` in the
spec, grow the mounted one online: luks.grow), SIGKILL self at a window.

Spec in $CVA_TEST_PREPARE_SPEC (JSON, no secret); the secret (hex) on stdin, optionally a second
line with the previous key's secret (hex; key rotation, luks.rotation).
Exit 0 = prepared (grown); 3 = refused (message on stderr); killed by SIGKILL = crashed at the
window.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from luks import grow, volume
from luks.errors import StorageError
from luks.secret import Secret
from luks.volume_plan import CrashWindow
from tests.guest.storage_support import volume_from_json


def main() -> int:
    spec = json.loads(os.environ["CVA_TEST_PREPARE_SPEC"])
    lines = sys.stdin.read().split()
    secret = Secret(bytearray.fromhex(lines[0]))
    old = bytearray.fromhex(lines[1]) if len(lines) > 1 else None
    crash_at = spec["crash_at"]
    if crash_at is not None:
        target = CrashWindow(crash_at)

        def hook(window: CrashWindow) -> None:
            if window == target:
                os.kill(os.getpid(), signal.SIGKILL)

        volume.crash_hook = hook
    if spec.get("grow"):
        outcome = grow.grow_mounted(
            volume_from_json(spec["volume"]),
            lambda: Secret(bytearray(secret.data)),
            disk=Path(spec["disk"]),
            runtime_dir=Path(spec["runtime_dir"]),
            mount_base=Path(spec["mount_base"]),
        )
        print(outcome.status)
        return 0 if outcome.status in ("grown", "unchanged") else 3
    try:
        volume.prepare_volume(
            volume_from_json(spec["volume"]),
            secret,
            disk=Path(spec["disk"]),
            runtime_dir=Path(spec["runtime_dir"]),
            mount_base=Path(spec["mount_base"]),
            previous=(lambda: Secret(bytearray(old))) if old is not None else None,
        )
    except StorageError as exc:
        print(exc.message, file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
