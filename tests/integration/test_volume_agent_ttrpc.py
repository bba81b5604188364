"""cva.v1.VolumeAgent and CDH SecureMount over ttRPC, driven by containerd's Go ttrpc client,
against the daemon's ttRPC server (agent.rpc.ttrpc_service) with the in-memory storage backend and
the fake key source."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent import contract as C
from agent._proto.cdh import api_pb2
from agent._proto.cva.v1 import agent_pb2
from agent.rpc.ttrpc import Code, TtrpcServer
from agent.rpc.ttrpc_service import build_ttrpc_server
from agent.securemount.decisions import DeviceIdentity
from agent.securemount.volumes import ManagerSecureMountBackend
from agent.volumes import OpenedVolume, ScanProgress, VolumeManager
from luks.secret import Secret
from tests.daemon_support import (
    FakeGuest,
    FakeKeySource,
    MemoryBackend,
    contract,
    make_bundle,
    volume,
)
from tests.ttrpc_peer import GoCall, GoResult, go_calls

SERVICE = "cva.v1.VolumeAgent"
PG = volume("pg")
WEB = volume("web", containers=("nginx",))
PG_DEVICE = DeviceIdentity("/dev/vdb", 252, 16, "pg", "/sys/devices/pci0000:00/0000:00:05.0")
WEB_DEVICE = DeviceIdentity("/dev/vdd", 252, 48, "web", "/sys/devices/pci0000:00/0000:00:06.0")
OTHER_DEVICE = DeviceIdentity("/dev/vdc", 252, 32, "scratch", "/sys/devices/pci0000:00/x")


@dataclass
class CreateRecordingBackend(MemoryBackend):
    """MemoryBackend that records the contract's `create` each open saw."""

    create_flags: list[bool] = field(default_factory=list)

    def open(
        self, vol: C.Volume, secret: Secret, progress: ScanProgress | None = None
    ) -> OpenedVolume:
        self.create_flags.append(vol.create)
        return super().open(vol, secret, progress)


@dataclass
class Running:
    sock: Path
    backend: CreateRecordingBackend
    keys: FakeKeySource
    devices: FakeGuest
    kata: Path
    server: TtrpcServer


@pytest.fixture
def allow() -> tuple[str, ...]:
    return ("PrepareVolumes", "ListVolumes", "SecureMount", "SecureMountEphemeral")


@pytest.fixture
async def running(tmp_path: Path, allow: tuple[str, ...]) -> AsyncIterator[Running]:
    backend, keys = CreateRecordingBackend(), FakeKeySource()
    kata = tmp_path / "kata"
    manager = VolumeManager(contract(PG, WEB, allow=allow), backend, keys, rootfs_base=kata)
    devices = FakeGuest({(252, 16): PG_DEVICE, (252, 32): OTHER_DEVICE, (252, 48): WEB_DEVICE})
    adapter = ManagerSecureMountBackend(manager, tmp_path / "state", ops=devices.ops())
    server = build_ttrpc_server(
        manager, call_timeout=30.0, securemount_backend=adapter, header_dir=tmp_path / "hdr"
    )
    sock = tmp_path / "cdh.sock"
    await server.listen_unix(sock)
    try:
        yield Running(sock, backend, keys, devices, kata, server)
    finally:
        await server.close()


def prepare(cid: str) -> GoCall:
    req = agent_pb2.PrepareVolumesRequest(container_id=cid)
    return GoCall(SERVICE, "PrepareVolumes", req.SerializeToString())


EMPTYDIR_OTHER = "/run/kata-containers/sandbox/storage/other"
EMPTYDIR_E = "/run/kata-containers/sandbox/storage/e"


def secure_mount(
    options: dict[str, str], mount: str = "/run/kata-containers/sandbox/storage/pg"
) -> GoCall:
    req = api_pb2.SecureMountRequest(volume_type="block-device", options=options, mount_point=mount)
    return GoCall("api.SecureMountService", "SecureMount", req.SerializeToString())


async def calls(binary: Path, run: Running, *batch: GoCall) -> list[GoResult]:
    return await go_calls(binary, run.sock, list(batch))


async def test_prepare_volumes_over_ttrpc(running: Running, go_ttrpc_client: Path) -> None:
    make_bundle(running.kata, "c1", "nginx")
    [res] = await calls(go_ttrpc_client, running, prepare("c1"))
    assert (res.code, res.message) == (0, "")
    resp = agent_pb2.PrepareVolumesResponse.FromString(res.payload)
    assert resp.container_id == "c1"
    assert sorted(v.name for v in resp.volumes) == ["pg", "web"]
    assert all(v.state == agent_pb2.VOLUME_STATE_BOUND for v in resp.volumes)
    assert {n for n, _ in running.backend.bound} == {"pg", "web"}
    assert running.keys.given and all(len(s) == 0 for s in running.keys.given)  # wiped


async def test_refusals_match_grpc(running: Running, go_ttrpc_client: Path) -> None:
    make_bundle(running.kata, "c1", "nginx")
    release = agent_pb2.ReleaseVolumesRequest(container_id="c1").SerializeToString()
    results = await calls(
        go_ttrpc_client,
        running,
        GoCall(SERVICE, "ReleaseVolumes", release),  # not in [api] allow
        GoCall(SERVICE, "ReleaseVolumes", b"\xff\xff\xff"),  # denied before decoding
        prepare("../etc"),
        prepare("nosuch"),
        GoCall(SERVICE, "PrepareVolumes", b"\xff\xff\xff"),
        GoCall(SERVICE, "Nope"),
    )
    got = [(Code(r.code).name, r.message) for r in results]
    denied = (
        "PERMISSION_DENIED",
        "RPC /cva.v1.VolumeAgent/ReleaseVolumes is not allowed by the contract's [api] allow list",
    )
    assert got[0] == got[1] == denied
    assert got[2][0] == "INVALID_ARGUMENT" and "container_id" in got[2][1]
    assert got[3][0] == "NOT_FOUND" and "no container nosuch" in got[3][1]
    assert got[4][0] == "INVALID_ARGUMENT" and "does not decode" in got[4][1]
    assert got[5][0] == "UNIMPLEMENTED"
    assert running.backend.calls == []


async def test_list_volumes_over_ttrpc(running: Running, go_ttrpc_client: Path) -> None:
    req = agent_pb2.ListVolumesRequest().SerializeToString()
    [res] = await calls(go_ttrpc_client, running, GoCall(SERVICE, "ListVolumes", req))
    assert res.code == 0
    listed = agent_pb2.ListVolumesResponse.FromString(res.payload)
    assert [(v.name, v.state) for v in listed.volumes] == [
        ("pg", agent_pb2.VOLUME_STATE_ABSENT),
        ("web", agent_pb2.VOLUME_STATE_ABSENT),
    ]


async def test_secure_mount_persistent(running: Running, go_ttrpc_client: Path) -> None:
    options = {"deviceId": "252:16", "sourceType": "empty", "key": str(PG.key)}
    ro = {**options, "sourceType": "encrypted"}
    results = await calls(
        go_ttrpc_client,
        running,
        secure_mount(options),
        GoCall("api.SecureMountService", "SecureMount", b"\xff\xff"),
    )
    assert results[0].code == 0, results[0].message
    resp = api_pb2.SecureMountResponse.FromString(results[0].payload)
    assert resp.mount_path == "/run/kata-containers/sandbox/storage/pg"
    assert results[1].code == Code.INVALID_ARGUMENT
    assert running.keys.requests == [str(PG.key)]
    assert running.backend.create_flags == [True]  # sourceType=empty: may create
    assert running.backend.mounted["pg"].guest_path == Path("/run/cva/volumes/pg")
    assert running.devices.binds == [
        (Path("/run/cva/volumes/pg"), Path("/run/kata-containers/sandbox/storage/pg"), False)
    ]
    # a second mount of the same volume reuses the open volume (no second key fetch)
    [again] = await calls(
        go_ttrpc_client, running, secure_mount(ro, mount="/run/kata-containers/sandbox/storage/pg2")
    )
    assert again.code == 0
    assert running.keys.requests == [str(PG.key)]
    assert running.devices.binds[-1] == (
        Path("/run/cva/volumes/pg"),
        Path("/run/kata-containers/sandbox/storage/pg2"),
        False,
    )


async def test_secure_mount_refusals(running: Running, go_ttrpc_client: Path) -> None:
    results = await calls(
        go_ttrpc_client,
        running,
        # WEB is limited to a container: SecureMount cannot say which one
        secure_mount({"deviceId": "252:48", "sourceType": "encrypted", "key": str(WEB.key)}),
        # WEB's key on pg's disk
        secure_mount({"deviceId": "252:16", "sourceType": "encrypted", "key": str(WEB.key)}),
        # a key no contract volume has
        secure_mount({"deviceId": "252:16", "sourceType": "encrypted", "key": "kbs:///a/b/c"}),
        # ephemeral on a contract volume's disk: it would format it
        secure_mount({"deviceId": "252:16", "sourceType": "empty"}, mount=EMPTYDIR_E),
    )
    got = [(Code(r.code).name, r.message) for r in results]
    assert got[0][0] == "PERMISSION_DENIED" and "containers-restricted" in got[0][1]
    assert got[1][0] == "PERMISSION_DENIED" and "device-not-contract-disk" in got[1][1]
    assert got[2][0] == "PERMISSION_DENIED" and "key-not-in-contract" in got[2][1]
    assert got[3][0] == "PERMISSION_DENIED" and "contract-disk" in got[3][1]
    assert running.keys.requests == []
    assert running.devices.binds == []
    assert running.devices.made == []


KATA_EMPTYDIR = {
    "deviceId": "252:32",
    "sourceType": "empty",
    "targetType": "fileSystem",
    "filesystemType": "ext4",
    "mkfsOpts": "-O ^has_journal -m 0 -i 163840 -I 128",
    "encryptionType": "luks2",
    "dataIntegrity": "false",
}


async def test_secure_mount_ephemeral_as_kata_agent_sends_it(
    running: Running, go_ttrpc_client: Path, tmp_path: Path
) -> None:
    mount = "/run/kata-containers/sandbox/storage/emptydir-1"
    [res, again] = await calls(
        go_ttrpc_client, running, secure_mount(KATA_EMPTYDIR, mount=mount)
    ) + await calls(go_ttrpc_client, running, secure_mount(KATA_EMPTYDIR, mount=mount))
    assert (res.code, res.message) == (0, "")
    assert (again.code, again.message) == (0, "")  # a retry finds it in place
    [spec] = running.devices.made
    assert spec.device == Path("/dev/vdc") and not spec.integrity
    assert spec.mapper.startswith("cva-eph-")
    assert spec.header == tmp_path / "hdr" / f"{spec.mapper}.header"
    assert spec.mkfs_args == ("-O", "^has_journal", "-m", "0", "-i", "163840", "-I", "128")
    assert spec.mount_dir == tmp_path / "state" / "securemount" / "mnt" / spec.mapper
    assert running.devices.binds == [(spec.mount_dir, Path(mount), False)]
    assert running.keys.requests == []  # no KBS for an ephemeral volume
    # the same disk at another mount point is refused; so is another disk at this one
    [other_mount] = await calls(
        go_ttrpc_client, running, secure_mount(KATA_EMPTYDIR, mount=EMPTYDIR_OTHER)
    )
    assert other_mount.code == Code.FAILED_PRECONDITION and "already backs" in other_mount.message
    # kata-agent unmounts; the next call sweeps the volume away and the disk may be asked again
    running.devices.unmount(Path(mount))
    [after] = await calls(
        go_ttrpc_client, running, secure_mount(KATA_EMPTYDIR, mount=EMPTYDIR_OTHER)
    )
    assert running.devices.released == [spec.mapper]
    assert after.code == 0
    assert len(running.devices.made) == 2


@pytest.mark.parametrize("allow", [("PrepareVolumes",)])
async def test_secure_mount_not_served_unless_allowed(
    running: Running, go_ttrpc_client: Path
) -> None:
    options = {"deviceId": "252:16", "sourceType": "encrypted", "key": str(PG.key)}
    [res] = await calls(go_ttrpc_client, running, secure_mount(options))
    assert res.code == Code.UNIMPLEMENTED
    assert running.keys.requests == []


async def test_secure_mount_encrypted_source_never_creates(
    running: Running, go_ttrpc_client: Path
) -> None:
    options = {"deviceId": "252:16", "sourceType": "encrypted", "key": str(PG.key)}
    [res] = await calls(go_ttrpc_client, running, secure_mount(options))
    assert res.code == 0, res.message
    assert running.backend.create_flags == [False]  # an existing volume only


def test_contract_accepts_the_securemount_names() -> None:
    assert {"SecureMount", "SecureMountEphemeral"} <= C.API_METHODS
