"""Start and stop the host services of tests/vm/host_services.py around the VM boots."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.vm.host_services import HostService
from tests.vm.machine import GuestForward, free_port

GUEST_ADDR = "10.0.2.100"  # inside qemu's user network only
FIRST_GUEST_PORT = 8001


@dataclass(frozen=True)
class RunningService:
    service: HostService
    host_port: int
    guest_port: int
    process: subprocess.Popen[bytes] | None
    log: Path
    problem: str | None = None  # None: up and listening

    @property
    def guest_url(self) -> str:
        return f"{self.service.scheme}://{GUEST_ADDR}:{self.guest_port}"

    @property
    def forward(self) -> GuestForward:
        return GuestForward(GUEST_ADDR, self.guest_port, self.host_port)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-10:])
    except FileNotFoundError:
        return ""


def start(service: HostService, index: int, repo: Path, job_dir: Path) -> RunningService:
    port = free_port()
    log = job_dir / f"service-{service.name}.log"
    argv = [arg.format(port=port, job=job_dir, python=sys.executable) for arg in service.argv]
    guest_port = FIRST_GUEST_PORT + index
    env = dict(os.environ, PYTHONPATH=str(repo))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=repo,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + service.ready_timeout
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            why = "exited" if proc.returncode is not None else "did not listen"
            problem = (
                f"host service {service.name} ({' '.join(argv)}) {why} on 127.0.0.1:{port}; "
                f"log {log}:\n{_tail(log)}"
            )
            return RunningService(service, port, guest_port, None, log, problem)
        time.sleep(0.1)
    return RunningService(service, port, guest_port, proc, log)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def stop(running: list[RunningService]) -> None:
    for item in running:
        if item.process is not None:
            stop_process(item.process)
