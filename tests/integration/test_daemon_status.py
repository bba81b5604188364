"""`cva status` against the daemon harness process: the control socket (0600, in the 0700 state
dir) answers even when the contract's `[api] allow` denies ListVolumes to the host-facing API;
it shows the bound volume; SIGTERM removes the socket; no key bytes anywhere."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.conftest import run_cva
from tests.daemon_support import KEY_MARKER, make_bundle
from tests.integration.test_daemon_process import _start


def test_status_over_the_control_socket_ignores_api_allow(tmp_path: Path) -> None:
    p = _start(
        tmp_path,
        {"volumes": [{"name": "pg", "containers": ["postgres"]}], "allow": ["PrepareVolumes"]},
    )
    try:
        p.messages("READY=1")
        sock = p.state / "control.sock"
        assert sock.stat().st_mode & 0o777 == 0o600
        make_bundle(p.kata, "c1", "postgres")
        r = run_cva("prepare", "c1", "--address", p.address)
        assert r.returncode == 0, r.stderr
        denied = run_cva("list", "--address", p.address)
        assert denied.returncode != 0 and b"allow" in denied.stderr

        r = run_cva("status", "--json", "--socket", str(sock))
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["v"] == 1 and doc["version"]
        [pg] = doc["volumes"]
        assert (pg["name"], pg["kind"], pg["state"], pg["holders"]) == (
            "pg",
            "contract",
            "bound",
            ["c1"],
        )
        assert pg["mapper"] == "cva-pg" and pg["luks_uuid"]
        assert set(doc["kbs"]) == {"state", "token_expires"}

        table = run_cva("status", "--socket", str(sock))
        assert table.returncode == 0, table.stderr
        assert b"KBS session:" in table.stdout and b"pg" in table.stdout

        p.proc.send_signal(signal.SIGTERM)
        output = p.output()
        assert p.proc.returncode == 0, output
        assert f"control+unix:{sock}" in output
        assert not sock.exists()
        assert KEY_MARKER.decode() not in output + r.stdout.decode() + table.stdout.decode()
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)
        p.notify.close()


def test_status_without_a_daemon(tmp_path: Path) -> None:
    r = run_cva("status", "--socket", str(tmp_path / "control.sock"))
    assert r.returncode == 2 and b"is cva serve running" in r.stderr
