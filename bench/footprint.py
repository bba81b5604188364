"""Agent footprint (issue 8 #5): `cva serve` start to READY=1 and its idle RSS, against a bare
grpc.aio server with the same serving imports (`bench.floor_server`).

Both run as real processes with $NOTIFY_SOCKET pointing at a datagram socket this module
binds: start-to-READY is the time from spawning the interpreter to receiving `READY=1`. Idle
RSS is VmRSS from /proc after one second of idling behind READY. `cva serve` runs its real
start path (config, initdata, contract, the image-config sample TEE, services on a unix socket; no
vsock, the KBS is contacted lazily and never here). Runs are interleaved; medians are reported.
Both run with bytecode caches, as an installed image has them: kept in the run's temporary
directory (PYTHONPYCACHEPREFIX) whatever PYTHONDONTWRITEBYTECODE says, filled by the warm-up run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results import Result, Target, measured, not_measured

REPO = Path(__file__).resolve().parents[1]
GROUP = "5. Agent footprint (host)"
RUNS = 7
IDLE_SECONDS = 1.0
NOTES: list[str] = [
    "Floor: `bench/floor_server.py`, a grpc.aio server with the health service that imports "
    "grpc, grpc_health, structlog and cva's generated VolumeAgent protos, binds a unix socket "
    "and sends READY=1; `cva serve` runs its real start path (config, initdata, contract, "
    "the image-config sample TEE, gRPC on unix sockets, no vsock; the KBS is contacted lazily). "
    "Both with warm bytecode caches (PYTHONPYCACHEPREFIX in the run's temporary directory)."
]
READY_TIMEOUT = 60.0

CONTRACT = """
version = 1
[kbs]
url = "http://127.0.0.1:9"
tee = "sample"
[[volumes]]
name = "data"
key = "kbs:///default/data/luks"
disk = "serial:benchdisk"
filesystem = "ext4"
mount = "/data"
containers = []
create = true
integrity = false
read_only = false
"""


def _write_cva_files(tmp: Path) -> Path:
    initdata = tmp / "initdata.toml"
    initdata.write_text(
        f"version = \"0.1.0\"\nalgorithm = \"sha256\"\n\n[data]\n\"cva.toml\" = '''{CONTRACT}'''\n"
    )
    config = tmp / "config.toml"
    config.write_text(
        f"""
[listen]
vsock_port = 0
unix = "{tmp}/cva.sock"
[initdata]
toml = "{initdata}"
[paths]
rootfs_base = "{tmp}/kata"
state_dir = "{tmp}/state"
mount_base = "{tmp}/mnt"
[log]
level = "warning"
[evidence]
tee = "sample"
allow_sample = true
"""
    )
    return config


def _child_env(tmp: Path, notify_path: Path) -> dict[str, str]:
    """The children's environment: $NOTIFY_SOCKET, this checkout first on the path, and bytecode
    caches written to (and read from) `tmp/pycache`, so that the warm-up run really warms them
    even where PYTHONDONTWRITEBYTECODE is set (cva's own modules would otherwise be compiled
    from source at every start, the floor's site-packages not)."""
    env = dict(
        os.environ,
        NOTIFY_SOCKET=str(notify_path),
        PYTHONPATH=str(REPO),
        PYTHONPYCACHEPREFIX=str(tmp / "pycache"),
    )
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run_once(argv: list[str], tmp: Path) -> tuple[float, float]:
    """(seconds from spawn to READY=1, idle RSS in MiB)."""
    notify_path = tmp / "notify"
    notify_path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(notify_path))
        env = _child_env(tmp, notify_path)
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            deadline = start + READY_TIMEOUT
            ready = None
            while ready is None:
                if proc.poll() is not None or time.perf_counter() > deadline:
                    proc.kill()
                    _, err = proc.communicate(timeout=30)
                    text = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
                    raise RuntimeError(
                        f"{' '.join(argv[1:4])} sent no READY=1 (rc {proc.poll()}): {text[0][:200]}"
                    )
                rx.settimeout(0.2)
                try:
                    message = rx.recv(4096).decode(errors="replace")
                except TimeoutError:
                    continue
                if "READY=1" in message.split("\n"):
                    ready = time.perf_counter() - start
            time.sleep(IDLE_SECONDS)
            rss = _rss_kib(proc.pid) / 1024
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    return ready, rss


def parse_importtime(stderr: str) -> dict[str, float]:
    """Self import time in ms per top-level package from `python -X importtime` output."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue
        top = parts[2].strip().split(".")[0]
        totals[top] = totals.get(top, 0.0) + int(parts[0]) / 1000
    return totals


def import_costs(cva: list[str], floor: list[str], tmp: Path) -> str:
    """One line naming what cva's start path imports beyond the floor, costliest first."""
    got = {}
    for label, argv in (("cva", cva), ("floor", floor)):
        got[label] = _importtime_until_ready(argv, tmp)
    extra = {k: v for k, v in got["cva"].items() if k not in got["floor"]}
    top = sorted(extra.items(), key=lambda kv: -kv[1])[:8]
    listed = ", ".join(f"{name} {ms:.0f} ms" for name, ms in top)
    return (
        f"Imported by `cva serve` before READY=1 but not by the floor (self import time, "
        f"python -X importtime, one run): {listed or 'nothing'}."
    )


def _importtime_until_ready(argv: list[str], tmp: Path) -> dict[str, float]:
    notify_path = tmp / "notify-it"
    notify_path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(notify_path))
        rx.settimeout(READY_TIMEOUT)
        env = _child_env(tmp, notify_path)
        proc = subprocess.Popen(
            [argv[0], "-X", "importtime", *argv[1:]],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while "READY=1" not in rx.recv(4096).decode(errors="replace").split("\n"):
                pass
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
    return parse_importtime(err)


TARGET = Target("ratio", "<=", 1.3, "≤ 1.3x the floor")


def planned(reason: str) -> list[Result]:
    return [
        not_measured(
            name,
            reason,
            unit=unit,
            baseline_name="bare grpc.aio server",
            target=TARGET,
            group=GROUP,
        )
        for name, unit in (("cva serve: start to READY=1", "ms"), ("cva serve: idle RSS", "MiB"))
    ]


def collect() -> list[Result]:
    import importlib.util

    if importlib.util.find_spec("agent.startup") is None:
        return planned("`cva serve` (agent/startup.py, daemon stream) is not in this tree yet")
    with tempfile.TemporaryDirectory(prefix="cva-bench-fp-") as d:
        tmp = Path(d)
        config = _write_cva_files(tmp)
        cva = [sys.executable, "-m", "agent", "serve", "--config", str(config)]
        floor = [sys.executable, "-m", "bench.floor_server", str(tmp / "floor.sock")]
        run_once(cva, tmp)  # warm the page cache and the bytecode caches for both
        run_once(floor, tmp)
        cva_runs, floor_runs = [], []
        for _ in range(RUNS):
            cva_runs.append(run_once(cva, tmp))
            floor_runs.append(run_once(floor, tmp))
        try:
            NOTES.append(import_costs(cva, floor, tmp))
        except (OSError, RuntimeError, subprocess.SubprocessError, TimeoutError) as exc:
            NOTES.append(f"(import-time breakdown failed: {exc})")
    target = TARGET
    note = f"median of {RUNS} interleaved runs"
    return [
        measured(
            "cva serve: start to READY=1",
            "ms",
            statistics.median(r[0] for r in cva_runs) * 1000,
            baseline_name="bare grpc.aio server",
            baseline=statistics.median(r[0] for r in floor_runs) * 1000,
            target=target,
            note=note,
            group=GROUP,
        ),
        measured(
            "cva serve: idle RSS",
            "MiB",
            statistics.median(r[1] for r in cva_runs),
            baseline_name="bare grpc.aio server",
            baseline=statistics.median(r[1] for r in floor_runs),
            target=target,
            note=f"VmRSS {IDLE_SECONDS:.0f} s after READY=1; {note}",
            group=GROUP,
        ),
    ]
