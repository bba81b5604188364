"""sd_notify against a real datagram socket (filesystem path and abstract name)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.sdnotify import Notifier


def _receiver(address: str | bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(5)
    return s


def test_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _receiver(path) as rx:
        n = Notifier.from_env({"NOTIFY_SOCKET": path})
        assert n.enabled
        assert n.ready("serving 2 volume(s)")
        assert rx.recv(4096) == b"READY=1\nSTATUS=serving 2 volume(s)"
        assert n.status("line one\nline two")
        assert rx.recv(4096) == b"STATUS=line one line two"
        assert n.stopping()
        assert rx.recv(4096) == b"STOPPING=1"


def test_abstract_socket() -> None:
    name = f"cva-test-notify-{os.getpid()}"
    with _receiver(b"\0" + name.encode()) as rx:
        n = Notifier(f"@{name}")
        assert n.ready()
        assert rx.recv(4096) == b"READY=1"


def test_not_under_systemd_is_a_noop() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready() is False and n.status("x") is False and n.stopping() is False


def test_send_failure_is_reported(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"))
    with pytest.raises(OSError):
        n.ready()


def test_relative_address_refused() -> None:
    with pytest.raises(ValueError, match="absolute"):
        Notifier("relative")


def test_status_is_capped(tmp_path: Path) -> None:
    path = str(tmp_path / "n")
    with _receiver(path) as rx:
        Notifier(path).status("x" * 10000)
        assert len(rx.recv(65536)) == len("STATUS=") + 400
