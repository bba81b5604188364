"""cva as a front for CDH (agent.cdh): containerd's Go ttrpc client calls cva's CDH socket; what
cva does not serve reaches a stand-in CDH (tests/cdh_upstream.py) byte for byte, and the stand-in's
answers and error statuses come back unchanged -- also while a long SecureMount is in flight.
Refused and block-device SecureMount calls never reach it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from agent import contract as C
from agent._proto.cdh import api_pb2
from agent._proto.ttrpc import ttrpc_pb2
from agent.cdh.front import FORWARD_MAX_BYTES, CdhFront, install_cdh_front
from agent.mountpoints import MountRules, parse_root
from agent.rpc.ttrpc import Code, MessageType, TtrpcServer, encode_frame
from agent.rpc.ttrpc_service import build_ttrpc_server
from agent.securemount.decisions import DeviceIdentity
from agent.securemount.volumes import ManagerSecureMountBackend
from agent.volumes import VolumeManager
from luks.secret import Secret
from tests.cdh_upstream import StandInCdh, response
from tests.daemon_support import FakeGuest, FakeKeySource, MemoryBackend, contract, volume
from tests.ttrpc_peer import GoCall, GoResult, RawConnection, go_calls

PG = volume("pg")
PG_DEVICE = DeviceIdentity("/dev/vdb", 252, 16, "pg", "/sys/devices/pci0000:00/0000:00:05.0")
MOUNT = "/run/kata-containers/sandbox/storage/pg"


def pb_bytes(field: int, value: bytes) -> bytes:
    """One length-delimited protobuf field (CDH's request messages are string/bytes fields)."""
    tag = bytes([field << 3 | 2])
    n, length = len(value), b""
    while True:
        byte = n & 0x7F
        n >>= 7
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            return tag + length + value


# CDH's requests as kata-agent sends them (SPEC e.9; GC api.proto): ImagePullRequest{image_url=1,
# bundle_path=2}, UnsealSecretInput{secret=1}, GetResourceRequest{ResourcePath=1}
PULL = GoCall(
    "api.ImagePullService",
    "PullImage",
    pb_bytes(1, b"quay.io/example/app@sha256:" + b"ab" * 32)
    + pb_bytes(2, b"/run/kata-containers/c1/rootfs"),
    timeout_nano=1_200_000_000_000,
    metadata={"containerd-namespace": "k8s.io"},
)
UNSEAL = GoCall(
    "api.SealedSecretService",
    "UnsealSecret",
    pb_bytes(1, b"sealed.eyJhbGciOiJFUzI1NiJ9." + b"x" * 3000 + b".sig"),
    timeout_nano=50_000_000_000,
)
RESOURCE = GoCall(
    "api.GetResourceService",
    "GetResource",
    pb_bytes(1, b"kbs:///default/vfio/cert"),
    timeout_nano=50_000_000_000,
)
# kata's ImagePullResponse is empty; CDH's carries manifest_digest (field 1): relayed as is
ANSWERS = {
    "api.ImagePullService/PullImage": response(pb_bytes(1, b"sha256:" + b"cd" * 32)),
    "api.SealedSecretService/UnsealSecret": response(code=7, message="unseal: policy denied"),
    "api.GetResourceService/GetResource": response(pb_bytes(1, b"\x00resource\xff" * 4000)),
}


class GatedKeys(FakeKeySource):
    """Keys that wait for `go`: a SecureMount that stays in flight until the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.go = asyncio.Event()

    async def get_resource(self, uri: C.KbsResourceUri) -> Secret:
        self.entered.set()
        await self.go.wait()
        return await super().get_resource(uri)


@dataclass
class Front:
    sock: Path
    server: TtrpcServer
    front: CdhFront
    cdh: StandInCdh
    cdh_sock: Path
    keys: GatedKeys


@pytest.fixture
def allow() -> tuple[str, ...]:
    return ("PrepareVolumes", "ListVolumes", "SecureMount")


@pytest.fixture
def local_cap() -> int | None:
    return None  # the server's own cap, as built


@pytest.fixture
async def front(
    tmp_path: Path, allow: tuple[str, ...], local_cap: int | None
) -> AsyncIterator[Front]:
    keys = GatedKeys()
    manager = VolumeManager(
        contract(PG, allow=allow), MemoryBackend(), keys, rootfs_base=tmp_path / "kata"
    )
    devices = FakeGuest({(252, 16): PG_DEVICE})
    adapter = ManagerSecureMountBackend(manager, tmp_path / "state", ops=devices.ops())
    server = build_ttrpc_server(
        manager, call_timeout=30.0, securemount_backend=adapter, header_dir=tmp_path / "hdr"
    )
    if local_cap is not None:
        server.max_message_bytes = local_cap  # a front built with a smaller cap (issue 21)
    cdh_sock = tmp_path / "cdh-upstream.sock"
    cdh = StandInCdh(answers=dict(ANSWERS))
    await cdh.start(cdh_sock)
    installed = install_cdh_front(server, cdh_sock, max_forwarded=4)
    sock = tmp_path / "cdh.sock"
    await server.listen_unix(sock)
    try:
        yield Front(sock, server, installed, cdh, cdh_sock, keys)
    finally:
        keys.go.set()
        cdh.release.set()
        await server.close(grace=1.0)
        await cdh.close()


def secure_mount(options: dict[str, str], volume_type: str = "block-device") -> GoCall:
    req = api_pb2.SecureMountRequest(volume_type=volume_type, options=options, mount_point=MOUNT)
    return GoCall("api.SecureMountService", "SecureMount", req.SerializeToString())


KEYED = {"devicePath": "/dev/vdb", "sourceType": "empty", "key": str(PG.key)}


async def direct(binary: Path, sock: Path, calls: list[GoCall]) -> list[bytes]:
    """What the stand-in receives from the Go client with nobody in between."""
    cdh = StandInCdh(answers=dict(ANSWERS))
    await cdh.start(sock)
    try:
        await go_calls(binary, sock, calls)
    finally:
        await cdh.close()
    by_method = {r.request.method: r.frame_payload for r in cdh.received}
    return [by_method[c.method] for c in calls]


def same_answer(result: GoResult, answer: bytes) -> None:
    expected = ttrpc_pb2.Response.FromString(answer)
    assert (result.code, result.message) == (expected.status.code, expected.status.message)
    assert result.payload == expected.payload
    assert result.transport_error == ""


async def test_pull_unseal_resource_reach_cdh_byte_exact(
    front: Front, go_ttrpc_client: Path, tmp_path: Path
) -> None:
    calls = [PULL, UNSEAL, RESOURCE]
    results = await go_calls(go_ttrpc_client, front.sock, calls)
    for call, result in zip(calls, results, strict=True):
        same_answer(result, ANSWERS[f"{call.service}/{call.method}"])
    assert results[1].code == Code.PERMISSION_DENIED  # CDH's error status, unchanged
    got = {r.request.method: r for r in front.cdh.received}
    assert sorted(got) == ["GetResource", "PullImage", "UnsealSecret"]
    for call in calls:
        req = got[call.method].request
        assert (req.service, req.payload, req.timeout_nano) == (
            call.service,
            call.payload,
            call.timeout_nano,
        )
        assert {kv.key: kv.value for kv in req.metadata} == call.metadata
    # byte for byte what the Go client sends CDH when nobody is in between
    expected = await direct(go_ttrpc_client, tmp_path / "direct.sock", calls)
    assert [got[c.method].frame_payload for c in calls] == expected


async def test_answers_are_relayed_byte_for_byte(front: Front) -> None:
    """A status with details and a payload with fields kata's proto does not know: the raw
    Response bytes reach the client exactly as CDH wrote them."""
    detail = any_pb2.Any(type_url="type.googleapis.com/x.Detail", value=b"\x08\x01")
    resp = ttrpc_pb2.Response(payload=pb_bytes(1, b"digest") + pb_bytes(15, b"future field"))
    resp.status.code = 9
    resp.status.message = "pull: manifest unknown"
    resp.status.details.append(detail)
    raw_answer = resp.SerializeToString()
    front.cdh.answers["api.ImagePullService/PullImage"] = raw_answer
    conn = await RawConnection.open(front.sock)
    try:
        request = ttrpc_pb2.Request(service=PULL.service, method=PULL.method, payload=PULL.payload)
        sent = request.SerializeToString() + pb_bytes(9, b"unknown request field")
        await conn.send(encode_frame(7, MessageType.REQUEST, sent))
        frame = await conn.read_frame()
    finally:
        await conn.close()
    assert frame is not None
    header, payload = frame
    assert (header.stream_id, header.type) == (7, MessageType.RESPONSE)
    assert payload == raw_answer
    assert [r.frame_payload for r in front.cdh.received] == [sent]


async def test_forwarding_goes_on_while_a_long_secure_mount_is_in_flight(
    front: Front, go_ttrpc_client: Path
) -> None:
    mounting = asyncio.create_task(
        go_calls(go_ttrpc_client, front.sock, [secure_mount(KEYED)], deadline_ms=60000)
    )
    await asyncio.wait_for(front.keys.entered.wait(), 30)  # the SecureMount is in flight
    results = await go_calls(go_ttrpc_client, front.sock, [PULL, UNSEAL, RESOURCE])
    for call, result in zip([PULL, UNSEAL, RESOURCE], results, strict=True):
        same_answer(result, ANSWERS[f"{call.service}/{call.method}"])
    assert not mounting.done()
    front.keys.go.set()
    [mounted] = await mounting
    assert (mounted.code, mounted.message) == (0, ""), mounted.message
    assert api_pb2.SecureMountResponse.FromString(mounted.payload).mount_path == MOUNT
    assert all(r.request.service != "api.SecureMountService" for r in front.cdh.received)


async def test_a_long_forwarded_call_does_not_hold_up_secure_mount(
    front: Front, go_ttrpc_client: Path
) -> None:
    front.cdh.hold = frozenset({"api.ImagePullService/PullImage"})
    pulling = asyncio.create_task(go_calls(go_ttrpc_client, front.sock, [PULL]))
    await asyncio.wait_for(front.cdh.held.wait(), 30)
    front.keys.go.set()
    [mounted] = await go_calls(go_ttrpc_client, front.sock, [secure_mount(KEYED)])
    assert mounted.code == 0, mounted.message
    assert not pulling.done()
    front.cdh.release.set()
    [pulled] = await pulling
    same_answer(pulled, ANSWERS["api.ImagePullService/PullImage"])


async def test_refused_and_block_device_calls_never_reach_cdh(
    front: Front, go_ttrpc_client: Path
) -> None:
    front.keys.go.set()
    other_key = {**KEYED, "key": "kbs:///default/other/luks"}
    results = await go_calls(
        go_ttrpc_client,
        front.sock,
        [
            secure_mount(other_key),  # a key the contract does not list
            secure_mount({**KEYED, "filesystemType": "xfs"}),  # not the contract's filesystem
            GoCall("api.SecureMountService", "SecureMount", b"\xff\xff"),  # does not decode
            GoCall("cva.v1.VolumeAgent", "ReleaseVolumes", b""),  # not in [api] allow
            GoCall("cva.v1.VolumeAgent", "Nope", b""),  # cva's namespace: never CDH's
        ],
    )
    codes = [Code(r.code) for r in results]
    assert codes == [
        Code.PERMISSION_DENIED,
        Code.INVALID_ARGUMENT,
        Code.INVALID_ARGUMENT,
        Code.PERMISSION_DENIED,
        Code.UNIMPLEMENTED,
    ], [r.message for r in results]
    assert "key-not-in-contract" in results[0].message
    assert front.cdh.received == []
    assert front.keys.requests == []


async def test_other_volume_types_are_cdhs(front: Front, go_ttrpc_client: Path) -> None:
    oss = secure_mount({"akId": "x"}, volume_type="alibaba-cloud-oss")
    front.cdh.answers["api.SecureMountService/SecureMount"] = response(
        api_pb2.SecureMountResponse(mount_path=MOUNT).SerializeToString()
    )
    [res] = await go_calls(go_ttrpc_client, front.sock, [oss])
    assert res.code == 0, res.message
    [got] = front.cdh.received
    assert got.request.payload == oss.payload


@pytest.mark.parametrize("allow", [("PrepareVolumes",)])
async def test_block_device_secure_mount_not_allowed_is_refused_not_forwarded(
    front: Front, go_ttrpc_client: Path
) -> None:
    [res] = await go_calls(go_ttrpc_client, front.sock, [secure_mount(KEYED)])
    assert res.code == Code.UNIMPLEMENTED
    assert "securemount-not-allowed" in res.message
    assert front.cdh.received == []


@pytest.mark.parametrize("local_cap", [16 << 10])
async def test_size_caps_local_and_forwarded(front: Front, go_ttrpc_client: Path) -> None:
    big = b"y" * (20 << 10)
    unseal = GoCall(UNSEAL.service, UNSEAL.method, pb_bytes(1, b"sealed." + big))
    mount = secure_mount({**KEYED, "mapperName": "a" * 4000, "mkfsOpts": "-m 1 " * 3000})
    assert len(mount.payload) > 16 << 10
    too_big = GoCall(RESOURCE.service, RESOURCE.method, b"\x0a" + b"z" * FORWARD_MAX_BYTES)
    results = await go_calls(go_ttrpc_client, front.sock, [unseal, mount, too_big])
    assert results[0].code == Code.PERMISSION_DENIED  # forwarded: CDH's answer
    assert results[1].code == Code.RESOURCE_EXHAUSTED  # cva's own method keeps its 16 KiB cap
    assert "16384" in results[1].message
    assert results[2].code == Code.RESOURCE_EXHAUSTED
    assert [r.request.method for r in front.cdh.received] == ["UnsealSecret"]
    assert front.keys.requests == []


async def test_forwarded_calls_in_flight_are_bounded(front: Front) -> None:
    front.cdh.hold = frozenset({"api.ImagePullService/PullImage"})
    conn = await RawConnection.open(front.sock)
    try:
        for stream in (1, 3, 5, 7, 9):  # max_forwarded = 4: the fifth is refused at once
            req = ttrpc_pb2.Request(service=PULL.service, method=PULL.method, payload=b"")
            await conn.send(encode_frame(stream, MessageType.REQUEST, req.SerializeToString()))
        frame = await conn.read_frame()
        assert frame is not None
        first = ttrpc_pb2.Response.FromString(frame[1])
        assert (frame[0].stream_id, first.status.code) == (9, Code.RESOURCE_EXHAUSTED)
        assert "CDH upstream" in first.status.message
        front.cdh.release.set()
        answered = set()
        for _ in range(4):
            frame = await conn.read_frame()
            assert frame is not None
            assert ttrpc_pb2.Response.FromString(frame[1]).status.code == 0
            answered.add(frame[0].stream_id)
        assert answered == {1, 3, 5, 7}
    finally:
        await conn.close()


async def test_the_callers_deadline_bounds_a_forwarded_call(front: Front) -> None:
    front.cdh.hold = frozenset({f"{RESOURCE.service}/{RESOURCE.method}"})
    conn = await RawConnection.open(front.sock)
    try:
        short = ttrpc_pb2.Request(
            service=RESOURCE.service, method=RESOURCE.method, timeout_nano=200_000_000
        )
        await conn.send(encode_frame(1, MessageType.REQUEST, short.SerializeToString()))
        frame = await conn.read_frame()
        assert frame is not None
        late = ttrpc_pb2.Response.FromString(frame[1])
        assert late.status.code == Code.DEADLINE_EXCEEDED
        assert "did not answer within 0.2s" in late.status.message
        [got] = front.cdh.received
        assert got.request.timeout_nano == 200_000_000  # forwarded as the caller set it
    finally:
        await conn.close()


async def test_no_upstream_and_unreachable_upstream_name_it(
    tmp_path: Path, go_ttrpc_client: Path
) -> None:
    manager = VolumeManager(
        contract(PG, allow=("PrepareVolumes",)),
        MemoryBackend(),
        FakeKeySource(),
        rootfs_base=tmp_path / "kata",
    )
    results = {}
    for name, upstream in (("unset", None), ("gone", tmp_path / "no-cdh.sock")):
        server = build_ttrpc_server(
            manager, call_timeout=30.0, securemount_backend=None, header_dir=tmp_path / "h"
        )
        install_cdh_front(server, upstream)
        sock = tmp_path / f"{name}.sock"
        await server.listen_unix(sock)
        try:
            results[name] = await go_calls(go_ttrpc_client, sock, [PULL, UNSEAL])
        finally:
            await server.close()
    for res in results["unset"]:
        assert res.code == Code.UNIMPLEMENTED
        assert "no CDH upstream is configured ([cdh] upstream" in res.message
    for res in results["gone"]:
        assert res.code == Code.UNAVAILABLE
        assert f"unix://{tmp_path / 'no-cdh.sock'}" in res.message
        assert "[cdh] upstream" in res.message


async def test_cva_serve_forwards_to_the_configured_upstream(
    tmp_path: Path, go_ttrpc_client: Path
) -> None:
    """The daemon process (`cva serve` through the harness) with `[cdh] upstream`: kata-agent's
    image pull reaches the stand-in CDH through cva's socket, VolumeAgent stays cva's."""
    from tests.integration.test_daemon_process import _start

    sock, cdh_sock = tmp_path / "cdh" / "cdh.sock", tmp_path / "cdh-upstream.sock"
    cdh = StandInCdh(answers=dict(ANSWERS))
    await cdh.start(cdh_sock)
    p = _start(
        tmp_path,
        {"volumes": [{"name": "pg", "containers": ["postgres"]}], "allow": ["ListVolumes"]},
        listen_extra=f'ttrpc = "unix://{sock}"\n[cdh]\nupstream = "unix://{cdh_sock}"',
    )
    try:
        await asyncio.to_thread(p.messages, "READY=1")
        listed = GoCall("cva.v1.VolumeAgent", "ListVolumes", b"")
        pulled, unsealed, mine = await go_calls(go_ttrpc_client, sock, [PULL, UNSEAL, listed])
        same_answer(pulled, ANSWERS["api.ImagePullService/PullImage"])
        same_answer(unsealed, ANSWERS["api.SealedSecretService/UnsealSecret"])
        assert mine.code == 0, mine.message
        assert sorted(r.request.method for r in cdh.received) == ["PullImage", "UnsealSecret"]
    finally:
        p.proc.terminate()
        await asyncio.to_thread(p.proc.wait, 30)
        p.notify.close()
        await cdh.close()


def caa_call(key: str, device: str, name: str, *, source: str = "empty") -> GoCall:
    """cloud-api-adaptor's SecureMount request, exactly (SPEC e.9)."""
    options = {
        "devicePath": device,
        "sourceType": source,
        "targetType": "fileSystem",
        "encryptionType": "luks2",
        "filesystemType": "ext4",
        "key": key,
        "mapperName": f"caa-{name}",
    }
    req = api_pb2.SecureMountRequest(
        volume_type="block-device",
        options=options,
        flags=[],
        mount_point=f"/run/cloud-volumes/{name}",
    )
    return GoCall("api.SecureMountService", "SecureMount", req.SerializeToString())


async def test_caa_requests_for_a_named_disk_and_a_securemount_volume(
    tmp_path: Path, go_ttrpc_client: Path
) -> None:
    """CAA sends devicePath, never deviceId: the named-disk keyed path (pg on serial:pg) and a
    `disk = "securemount"` volume both serve its exact request; each opens on its own disk."""

    cloud = dataclasses.replace(
        volume("cloud"), disk=C.DiskRef("securemount", ""), mount="", create=False
    )
    storage = MemoryBackend()
    keys = FakeKeySource()
    manager = VolumeManager(
        contract(PG, cloud, allow=("SecureMount",)), storage, keys, rootfs_base=tmp_path / "k"
    )
    cloud_disk = DeviceIdentity("/dev/vdc", 252, 32, None, "/sys/devices/pci0000:00/0000:00:06.0")
    devices = FakeGuest({(252, 16): PG_DEVICE, (252, 32): cloud_disk})
    rules = MountRules.build((parse_root("/run/cloud-volumes/*"),))
    adapter = ManagerSecureMountBackend(manager, tmp_path / "state", ops=devices.ops())
    server = build_ttrpc_server(
        manager,
        call_timeout=30.0,
        securemount_backend=adapter,
        header_dir=tmp_path / "h",
        mount_rules=rules,
    )
    install_cdh_front(server, None)
    sock = tmp_path / "cdh.sock"
    await server.listen_unix(sock)
    try:
        named, keyed, swapped = await go_calls(
            go_ttrpc_client,
            sock,
            [
                caa_call(str(PG.key), "/dev/vdb", "pg", source="encrypted"),
                caa_call(str(cloud.key), "/dev/vdc", "cloud"),
                caa_call(str(PG.key), "/dev/vdc", "pg2"),  # pg's key on another disk
            ],
        )
    finally:
        await server.close()
    assert (named.code, named.message) == (0, "")
    assert (keyed.code, keyed.message) == (0, "")
    assert swapped.code == Code.PERMISSION_DENIED and "device-not-contract-disk" in swapped.message
    assert sorted(keys.requests) == sorted([str(PG.key), str(cloud.key)])
    assert {t for _s, t, _ro in devices.binds} == {
        Path("/run/cloud-volumes/pg"),
        Path("/run/cloud-volumes/cloud"),
    }
