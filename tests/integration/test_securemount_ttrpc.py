"""kata-agent's SecureMount call, made by containerd's Go ttrpc client, against cva's
SecureMountService (decisions real, storage backend recorded)."""

from __future__ import annotations

from pathlib import Path

from agent._proto.cdh import api_pb2
from agent.rpc.ttrpc import Code, TtrpcServer
from agent.securemount.decisions import (
    EphemeralMount,
    PersistentMount,
    SecureMountPolicy,
    SecureMountService,
)
from tests.ttrpc_peer import GoCall, go_calls
from tests.unit.test_securemount import (
    BLANK_DEVICE,
    HEADERS,
    KATA_EMPTYDIR,
    MOUNT,
    PG_DEVICE,
    PGDATA,
    VOLUMES,
    FakeBackend,
)


def call(options: dict[str, str], mount: str = MOUNT) -> GoCall:
    req = api_pb2.SecureMountRequest(volume_type="block-device", options=options, mount_point=mount)
    return GoCall("api.SecureMountService", "SecureMount", req.SerializeToString())


async def serve(tmp_path: Path, backend: FakeBackend) -> TtrpcServer:
    server = TtrpcServer()
    SecureMountService(
        backend,
        VOLUMES,
        policy=SecureMountPolicy(persistent=True, ephemeral=True),
        header_dir=HEADERS,
    ).register(server)
    await server.listen_unix(tmp_path / "cdh.sock")
    return server


async def test_ephemeral_emptydir_over_ttrpc(tmp_path: Path, go_ttrpc_client: Path) -> None:
    backend = FakeBackend(BLANK_DEVICE)
    server = await serve(tmp_path, backend)
    try:
        [res] = await go_calls(go_ttrpc_client, tmp_path / "cdh.sock", [call(KATA_EMPTYDIR)])
    finally:
        await server.close()
    assert res.code == 0
    assert api_pb2.SecureMountResponse.FromString(res.payload).mount_path == MOUNT
    [plan] = backend.plans
    assert isinstance(plan, EphemeralMount)
    assert plan.mkfs_args == ("-O", "^has_journal", "-m", "0", "-i", "163840", "-I", "128")


async def test_persistent_and_refusals_over_ttrpc(tmp_path: Path, go_ttrpc_client: Path) -> None:
    backend = FakeBackend(PG_DEVICE)
    server = await serve(tmp_path, backend)
    persistent = {"deviceId": "252:16", "sourceType": "encrypted", "key": str(PGDATA.key)}
    try:
        results = await go_calls(
            go_ttrpc_client,
            tmp_path / "cdh.sock",
            [
                call(persistent),
                call(KATA_EMPTYDIR),  # no key, but the device is pgdata's disk
                call({**KATA_EMPTYDIR, "bogus": "1"}),
                call(persistent, mount="/etc"),
            ],
        )
    finally:
        await server.close()
    assert results[0].code == 0
    assert [type(p) for p in backend.plans] == [PersistentMount]
    assert [(r.code, r.message.split(":")[0]) for r in results[1:]] == [
        (Code.PERMISSION_DENIED, "SecureMount refused (contract-disk)"),
        (Code.INVALID_ARGUMENT, "SecureMount refused (option-keys)"),
        (Code.PERMISSION_DENIED, "SecureMount refused (mount-point)"),
    ]
