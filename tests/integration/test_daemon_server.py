"""The real grpc.aio server (policy interceptor, limits, deadlines, health) over a unix socket,
with the in-memory storage backend and a fake key source."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent._proto.cva.v1 import agent_pb2, agent_pb2_grpc
from agent.rpc.grpc_service import AgentServer
from agent.volumes import VolumeManager
from tests.daemon_support import FakeKeySource, MemoryBackend, contract, make_bundle, volume


@dataclass
class Running:
    server: AgentServer
    channel: grpc.aio.Channel
    stub: agent_pb2_grpc.VolumeAgentStub
    backend: MemoryBackend
    keys: FakeKeySource
    kata: Path


@pytest.fixture
def server_options() -> dict[str, Any]:
    return {}


@pytest.fixture
async def running(tmp_path: Path, server_options: dict[str, Any]) -> AsyncIterator[Running]:
    backend = server_options.get("backend") or MemoryBackend()
    keys = FakeKeySource()
    vols = server_options.get(
        "volumes",
        (
            volume("pg", containers=("postgres",)),
            volume("shared"),
            volume("web", containers=("nginx",)),
        ),
    )
    c = contract(*vols, allow=server_options.get("allow"))
    kata = tmp_path / "kata"
    manager = VolumeManager(c, backend, keys, rootfs_base=kata)
    server = AgentServer(manager, call_timeout=server_options.get("call_timeout", 30.0))
    sock = tmp_path / "grpc.sock"
    server.add_address(f"unix:{sock}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix:{sock}")
    try:
        yield Running(server, channel, agent_pb2_grpc.VolumeAgentStub(channel), backend, keys, kata)
    finally:
        await channel.close()
        await server.stop(1)
        await manager.drain(5)


async def _code(awaitable: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_health(running: Running) -> None:
    stub = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", "cva.v1.VolumeAgent"):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_prepare_list_release(running: Running) -> None:
    make_bundle(running.kata, "c1", "postgres")
    resp = await running.stub.PrepareVolumes(
        agent_pb2.PrepareVolumesRequest(container_id="c1"), timeout=10
    )
    assert resp.container_id == "c1"
    assert sorted(v.name for v in resp.volumes) == ["pg", "shared"]
    pg = next(v for v in resp.volumes if v.name == "pg")
    assert pg.state == agent_pb2.VOLUME_STATE_BOUND and pg.created
    assert pg.container_path == "/data/pg" and pg.guest_path == "/run/cva/volumes/pg"
    listed = await running.stub.ListVolumes(agent_pb2.ListVolumesRequest(), timeout=10)
    states = {v.name: (v.state, list(v.container_ids)) for v in listed.volumes}
    assert states["pg"] == (agent_pb2.VOLUME_STATE_BOUND, ["c1"])
    assert states["web"] == (agent_pb2.VOLUME_STATE_ABSENT, [])
    rel = await running.stub.ReleaseVolumes(
        agent_pb2.ReleaseVolumesRequest(container_id="c1"), timeout=10
    )
    assert sorted(rel.released) == ["pg", "shared"] and sorted(rel.closed) == ["pg", "shared"]


async def test_idempotent_prepare(running: Running) -> None:
    make_bundle(running.kata, "c1", "postgres")
    req = agent_pb2.PrepareVolumesRequest(container_id="c1")
    first = await running.stub.PrepareVolumes(req, timeout=10)
    second = await running.stub.PrepareVolumes(req, timeout=10)
    assert first == second
    assert len(running.keys.requests) == 2  # pg + shared, once each


@pytest.mark.parametrize("server_options", [{"allow": ("PrepareVolumes",)}])
async def test_denied_rpcs(running: Running) -> None:
    code, details = await _code(running.stub.ListVolumes(agent_pb2.ListVolumesRequest(), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "ListVolumes is not allowed by the contract" in details
    code, _ = await _code(
        running.stub.ReleaseVolumes(agent_pb2.ReleaseVolumesRequest(container_id="c1"), timeout=5)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    for method in ("/cva.v1.VolumeAgent/Format", "/grpc.reflection.v1alpha.ServerReflection/X"):
        call = running.channel.unary_unary(method)(b"\x0a\x02c1", timeout=5)
        code, _ = await _code(call)
        assert code == grpc.StatusCode.PERMISSION_DENIED
    make_bundle(running.kata, "c1", "postgres")
    code, _ = await _code(
        running.stub.PrepareVolumes(agent_pb2.PrepareVolumesRequest(container_id="c1"), timeout=5)
    )
    assert code == grpc.StatusCode.OK
    health = health_pb2_grpc.HealthStub(running.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == 1


@pytest.mark.parametrize("server_options", [{"allow": ()}])
async def test_empty_allow_list_denies_everything_but_health(running: Running) -> None:
    make_bundle(running.kata, "c1", "postgres")
    code, _ = await _code(
        running.stub.PrepareVolumes(agent_pb2.PrepareVolumesRequest(container_id="c1"), timeout=5)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert running.backend.calls == [] and running.keys.requests == []


@pytest.mark.parametrize(
    ("cid", "code"),
    [
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        ("../../etc", grpc.StatusCode.INVALID_ARGUMENT),
        ("a", grpc.StatusCode.INVALID_ARGUMENT),
        ("c\n1", grpc.StatusCode.INVALID_ARGUMENT),
        ("nosuch", grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_container_id_validation(running: Running, cid: str, code: grpc.StatusCode) -> None:
    got, details = await _code(
        running.stub.PrepareVolumes(agent_pb2.PrepareVolumesRequest(container_id=cid), timeout=5)
    )
    assert got == code
    assert details and "\n" not in details
    assert running.keys.requests == []


async def test_bundle_without_name_is_failed_precondition(running: Running) -> None:
    make_bundle(running.kata, "c1", None)
    code, details = await _code(
        running.stub.PrepareVolumes(agent_pb2.PrepareVolumesRequest(container_id="c1"), timeout=5)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "io.kubernetes.cri.container-name" in details


async def test_oversized_request_is_refused(running: Running) -> None:
    req = agent_pb2.PrepareVolumesRequest(container_id="a" * 100_000)
    code, _ = await _code(running.stub.PrepareVolumes(req, timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert running.backend.calls == []


async def test_concurrent_prepares_share_one_open_per_volume(running: Running) -> None:
    for i in range(8):
        make_bundle(running.kata, f"c{i}", "postgres" if i % 2 else "nginx")
    calls = [
        running.stub.PrepareVolumes(
            agent_pb2.PrepareVolumesRequest(container_id=f"c{i % 8}"), timeout=20
        )
        for i in range(32)
    ]
    results = await asyncio.gather(*calls)
    assert all(r.volumes for r in results)
    opens = sorted(name for op, name in running.backend.calls if op == "open")
    assert opens == ["pg", "shared", "web"]
    assert sorted(running.keys.requests) == [
        "kbs:///default/pg/luks",
        "kbs:///default/shared/luks",
        "kbs:///default/web/luks",
    ]


_GATE = threading.Event()


@pytest.mark.parametrize("server_options", [{"backend": MemoryBackend(open_gate=_GATE)}])
async def test_client_deadline_leaves_work_running(running: Running) -> None:
    _GATE.clear()
    make_bundle(running.kata, "c1", "postgres")
    req = agent_pb2.PrepareVolumesRequest(container_id="c1")
    code, _ = await _code(running.stub.PrepareVolumes(req, timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    _GATE.set()
    resp = await running.stub.PrepareVolumes(req, timeout=10)
    assert sorted(v.name for v in resp.volumes) == ["pg", "shared"]
    assert sorted(n for op, n in running.backend.calls if op == "open") == ["pg", "shared"]


_GATE2 = threading.Event()


@pytest.mark.parametrize(
    "server_options", [{"backend": MemoryBackend(open_gate=_GATE2), "call_timeout": 0.3}]
)
async def test_server_side_call_deadline(running: Running) -> None:
    _GATE2.clear()
    make_bundle(running.kata, "c1", "postgres")
    code, details = await _code(
        running.stub.PrepareVolumes(agent_pb2.PrepareVolumesRequest(container_id="c1"), timeout=10)
    )
    _GATE2.set()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not finish within 0.3s" in details
