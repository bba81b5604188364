"""`cva serve` (the daemon harness process) with `listen.ttrpc` set: the Go ttrpc client calls
PrepareVolumes on the ttRPC socket; SIGTERM removes the socket."""

from __future__ import annotations

import signal
from pathlib import Path

from agent._proto.cva.v1 import agent_pb2
from agent.rpc.ttrpc import Code
from tests.daemon_support import KEY_MARKER, make_bundle
from tests.integration.test_daemon_process import _start
from tests.ttrpc_peer import GoCall, go_calls


async def test_daemon_serves_volume_agent_over_ttrpc(tmp_path: Path, go_ttrpc_client: Path) -> None:
    sock = tmp_path / "cdh" / "cdh.sock"
    p = _start(
        tmp_path,
        {"volumes": [{"name": "pg", "containers": ["postgres"]}], "allow": ["PrepareVolumes"]},
        listen_extra=f'ttrpc = "unix://{sock}"',
    )
    try:
        p.messages("READY=1")
        make_bundle(p.kata, "c1", "postgres")
        release = agent_pb2.ReleaseVolumesRequest(container_id="c1").SerializeToString()
        ok, denied = await go_calls(
            go_ttrpc_client,
            sock,
            [
                GoCall(
                    "cva.v1.VolumeAgent",
                    "PrepareVolumes",
                    agent_pb2.PrepareVolumesRequest(container_id="c1").SerializeToString(),
                ),
                GoCall("cva.v1.VolumeAgent", "ReleaseVolumes", release),
            ],
        )
        assert ok.code == 0, ok.message
        [vol] = agent_pb2.PrepareVolumesResponse.FromString(ok.payload).volumes
        assert (vol.name, vol.state) == ("pg", agent_pb2.VOLUME_STATE_BOUND)
        assert denied.code == Code.PERMISSION_DENIED
        assert "[api] allow" in denied.message
        p.proc.send_signal(signal.SIGTERM)
        output = p.output()
        assert p.proc.returncode == 0, output
        assert "ttrpc+unix:" in output
        assert KEY_MARKER.decode() not in output
        assert not sock.exists()
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)
        p.notify.close()


def test_daemon_listens_for_ttrpc_on_vsock(tmp_path: Path) -> None:
    """AF_VSOCK binds here (no vsock transport to dial, so the round trip is the unix one
    above: the same TtrpcServer code behind a different listening socket)."""
    port = 0xFFFF_FFF0 - 11
    p = _start(
        tmp_path,
        {"volumes": [{"name": "pg", "containers": ["postgres"]}], "allow": ["PrepareVolumes"]},
        listen_extra=f"ttrpc_vsock_port = {port}",
    )
    try:
        p.messages("READY=1")
        p.proc.send_signal(signal.SIGTERM)
        output = p.output()
        assert p.proc.returncode == 0, output
        assert f"ttrpc+vsock:{port}" in output
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)
        p.notify.close()
