"""Run the real daemon loop (`agent.daemon.run_daemon`) with the in-memory storage backend and a
fake key source, for host integration tests: `python -m tests.tools.daemon_harness CONFIG SPEC`.

SPEC is JSON: {"allow": [...], "volumes": [{"name", "containers", "mount"}], "open_delay": s}.
Everything else (config parsing, listeners, policy, sd_notify, signals, shutdown) is
production code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from agent.config import DaemonConfig, load_config
from agent.daemon import run_daemon
from agent.log import configure_logging
from agent.volumes import BindingStore, VolumeManager
from tests.daemon_support import FakeKeySource, MemoryBackend, contract_from_spec


def main(argv: list[str]) -> int:
    config = load_config(Path(argv[0]))
    spec = json.loads(Path(argv[1]).read_text())
    configure_logging(config.log_level)
    backend = MemoryBackend(open_delay=float(spec.get("open_delay", 0.0)))

    def make(cfg: DaemonConfig, on_status: Callable[[str], None]) -> VolumeManager:
        return VolumeManager(
            contract_from_spec(spec),
            backend,
            FakeKeySource(),
            rootfs_base=cfg.paths.rootfs_base,
            bindings=BindingStore(cfg.paths.state_dir / "bindings.json"),
            on_status=on_status,
        )

    return run_daemon(config, make)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
