"""Keyed SecureMount for disks the contract cannot name (`disk = "securemount"`), and the
named-disk keyed path, with cloud-api-adaptor's exact request (SPEC e.9): the contract rules,
the pure decision, the order (a key the contract does not list is refused before the device is
looked at) and the backend (the device the request names is the one opened, nothing else's)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent import contract as C
from agent import policy
from agent._proto.cdh import api_pb2
from agent.mountpoints import MountRules, parse_root
from agent.rpc.ttrpc import CallContext, Code, RpcError
from agent.securemount.decisions import (
    DeviceIdentity,
    DeviceSelector,
    EphemeralMount,
    PersistentMount,
    SecureMountPolicy,
    SecureMountRefused,
    SecureMountService,
    parse_secure_mount,
    plan_secure_mount,
)
from agent.securemount.volumes import ManagerSecureMountBackend
from agent.volumes import OpenedVolume, ScanProgress, VolumeManager
from luks.secret import Secret
from tests.daemon_support import FakeGuest, FakeKeySource, MemoryBackend, contract, volume

CLOUD_ROOT = parse_root("/run/cloud-volumes/*")
RULES = MountRules.build((CLOUD_ROOT,))
KEYED = SecureMountPolicy(persistent=True)
BASE = """
version = 1
[kbs]
url = "https://kbs.example:8080"
[api]
allow = ["SecureMount"]
"""


def cloud_volume(name: str = "data", **kw: object) -> C.Volume:
    vol = dataclasses.replace(volume(name), disk=C.DiskRef("securemount", ""), mount="")
    return dataclasses.replace(vol, key=C.KbsResourceUri("default", "cloud", name), **kw)  # type: ignore[arg-type]


DATA = cloud_volume()
PG = volume("pg")  # a named disk: serial:pg
PG_DISK = DeviceIdentity("/dev/vdb", 252, 16, "pg", "/sys/devices/pci0000:00/0000:00:05.0")
CLOUD_DISK = DeviceIdentity("/dev/vdc", 252, 32, None, "/sys/devices/pci0000:00/0000:00:06.0")
OTHER_DISK = DeviceIdentity("/dev/vdd", 252, 48, None, "/sys/devices/pci0000:00/0000:00:07.0")


def caa(
    key: str, device: str, name: str = "data", *, source: str = "empty", fs: str = "ext4"
) -> tuple[dict[str, str], str]:
    """cloud-api-adaptor's forwarder, exactly (SPEC e.9): options and mount point."""
    options = {
        "devicePath": device,
        "sourceType": source,
        "targetType": "fileSystem",
        "encryptionType": "luks2",
        "filesystemType": fs,
        "key": key,
        "mapperName": f"caa-{name}",
    }
    return options, f"/run/cloud-volumes/{name}"


def decide(
    options: dict[str, str],
    mount: str,
    device: DeviceIdentity,
    volumes: tuple[C.Volume, ...] = (DATA, PG),
    rules: MountRules = RULES,
) -> PersistentMount | EphemeralMount:
    params = parse_secure_mount("block-device", options, [], mount, rules=rules)
    return plan_secure_mount(
        params, device, volumes, policy=KEYED, header_dir=Path("/h"), rules=rules
    )


# -- the contract ------------------------------------------------------------------------------


def test_contract_securemount_disk() -> None:
    c = C.parse_contract(
        BASE
        + """
[[volumes]]
name = "data"
key = "kbs:///default/cloud/data"
disk = "securemount"
filesystem = "xfs"
create = true
[[volumes]]
name = "logs"
key = "kbs:///default/cloud/logs"
disk = "securemount"
"""
    )
    data, logs = c.volumes
    assert data.via_securemount and logs.via_securemount
    assert (str(data.disk), data.mount, data.filesystem, data.create) == (
        "securemount",
        "",
        "xfs",
        True,
    )
    # PrepareVolumes never opens them: only a SecureMount request names their disk
    assert policy.volumes_for_container(c, "anything") == ()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ('mount = "/data"', "mount"),
        ('lvm = { vg = "v", lv = "l", size = "1G" }', "lvm"),
        ('containers = ["app"]', "containers"),
        ('disk = "securemount:x"', "disk"),
    ],
)
def test_contract_securemount_refusals(extra: str, field: str) -> None:
    doc = BASE + '[[volumes]]\nname = "data"\nkey = "kbs:///a/b/c"\n'
    if not extra.startswith("disk"):
        doc += 'disk = "securemount"\n'
    with pytest.raises(C.ContractError) as info:
        C.parse_contract(doc + extra + "\n")
    assert info.value.field.endswith(field)


def test_contract_securemount_key_is_its_own() -> None:
    doc = (
        BASE
        + """
[[volumes]]
name = "data"
key = "kbs:///a/b/c"
disk = "securemount"
[[volumes]]
name = "pg"
key = "kbs:///a/b/c"
disk = "serial:pg"
mount = "/pg"
"""
    )
    with pytest.raises(C.ContractError, match="matched by its key alone"):
        C.parse_contract(doc)


# -- the decision ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["empty", "encrypted"])
@pytest.mark.parametrize("create", [True, False])
def test_caa_request_opens_the_securemount_volume(source: str, create: bool) -> None:
    vol = dataclasses.replace(DATA, create=create)
    options, mount = caa(str(vol.key), "/dev/vdc", source=source)
    plan = decide(options, mount, CLOUD_DISK, volumes=(vol, PG))
    assert isinstance(plan, PersistentMount)
    assert (plan.volume.name, plan.device, plan.mount_point) == ("data", CLOUD_DISK, mount)
    # sourceType is a hint: the contract alone says whether a blank disk may be formatted
    assert plan.allow_create is create


def test_cloud_volumes_is_opt_in_in_the_image_config() -> None:
    options, mount = caa(str(DATA.key), "/dev/vdc")
    with pytest.raises(SecureMountRefused) as info:
        decide(options, mount, CLOUD_DISK, rules=MountRules())
    assert (info.value.rpc_code, info.value.rule) == (Code.PERMISSION_DENIED, "mount-point")


@pytest.mark.parametrize(("asked", "has"), [("xfs", "ext4"), ("ext3", "ext4"), ("ext4", "xfs")])
def test_filesystem_type_must_be_the_contracts(asked: str, has: str) -> None:
    vol = dataclasses.replace(DATA, filesystem=has)
    options, mount = caa(str(vol.key), "/dev/vdc", fs=asked)
    with pytest.raises(SecureMountRefused) as info:
        decide(options, mount, CLOUD_DISK, volumes=(vol,))
    assert info.value.rule == "filesystem-type"


def test_absent_filesystem_type_means_cdhs_ext4() -> None:
    vol = dataclasses.replace(DATA, filesystem="xfs")
    options, mount = caa(str(vol.key), "/dev/vdc")
    del options["filesystemType"]
    with pytest.raises(SecureMountRefused, match="filesystemType=ext4"):
        decide(options, mount, CLOUD_DISK, volumes=(vol,))
    options["filesystemType"] = "xfs"
    assert isinstance(decide(options, mount, CLOUD_DISK, volumes=(vol,)), PersistentMount)


def test_a_named_contract_disk_is_never_a_securemount_volumes() -> None:
    options, mount = caa(str(DATA.key), "/dev/vdb")
    with pytest.raises(SecureMountRefused) as info:
        decide(options, mount, PG_DISK)
    assert (info.value.rpc_code, info.value.rule) == (Code.PERMISSION_DENIED, "contract-disk")


def test_mapper_name_does_not_name_anything() -> None:
    options, mount = caa(str(DATA.key), "/dev/vdc")
    a = decide(options, mount, CLOUD_DISK)
    b = decide({**options, "mapperName": "caa-other"}, mount, CLOUD_DISK)
    assert a == b


def test_ephemeral_requests_ignore_securemount_volumes_and_stay_ext4() -> None:
    options = {"deviceId": "252:48", "sourceType": "empty", "filesystemType": "ext4"}
    mount = "/run/kata-containers/sandbox/storage/e"
    plan = plan_secure_mount(
        parse_secure_mount("block-device", options, [], mount),
        OTHER_DISK,
        (DATA, PG),
        policy=SecureMountPolicy(ephemeral=True),
        header_dir=Path("/h"),
    )
    assert isinstance(plan, EphemeralMount)
    with pytest.raises(SecureMountRefused) as info:
        plan_secure_mount(
            parse_secure_mount("block-device", {**options, "filesystemType": "xfs"}, [], mount),
            OTHER_DISK,
            (DATA,),
            policy=SecureMountPolicy(ephemeral=True),
            header_dir=Path("/h"),
        )
    assert info.value.rule == "filesystem-type"


@pytest.mark.parametrize("source", ["empty", "encrypted"])
def test_named_disk_keyed_path_with_caas_exact_request(source: str) -> None:
    """CAA sends devicePath (never deviceId): the named-disk path serves it as before."""
    named = dataclasses.replace(PG, mount="/pg")
    options, mount = caa(str(named.key), "/dev/vdb", name="pg", source=source)
    plan = decide(options, mount, PG_DISK, volumes=(DATA, named))
    assert isinstance(plan, PersistentMount)
    assert (plan.volume.name, plan.device.path) == ("pg", "/dev/vdb")
    assert plan.allow_create is (source == "empty")
    with pytest.raises(SecureMountRefused) as info:
        decide(options, mount, CLOUD_DISK, volumes=(DATA, named))  # not pg's disk
    assert info.value.rule == "device-not-contract-disk"


# -- the order: the key before any device ------------------------------------------------------


class NoDevices:
    def __init__(self) -> None:
        self.resolved: list[DeviceSelector] = []

    async def resolve_device(self, selector: DeviceSelector) -> DeviceIdentity:
        self.resolved.append(selector)
        raise AssertionError("a device was looked at")

    async def mount_persistent(self, plan: PersistentMount) -> str:
        raise AssertionError("mounted")

    async def mount_ephemeral(self, plan: EphemeralMount) -> str:
        raise AssertionError("mounted")

    async def sweep(self) -> None:
        return None


CTX = CallContext("api.SecureMountService", "SecureMount", 1, (), 10.0)


@pytest.mark.parametrize("allowed", [True, False])
async def test_a_key_not_in_the_contract_is_refused_before_the_device(allowed: bool) -> None:
    backend = NoDevices()
    service = SecureMountService(
        backend,
        (DATA, PG),
        policy=SecureMountPolicy(persistent=allowed, ephemeral=True),
        header_dir=Path("/h"),
        mount_rules=RULES,
    )
    options, mount = caa("kbs:///default/cloud/not-listed", "/dev/vdc")
    request = api_pb2.SecureMountRequest(
        volume_type="block-device", options=options, mount_point=mount
    )
    with pytest.raises(SecureMountRefused) as info:
        await service.secure_mount(request, CTX)
    rule = "key-not-in-contract" if allowed else "persistent-not-allowed"
    assert (info.value.rpc_code, info.value.rule) == (Code.PERMISSION_DENIED, rule)
    assert backend.resolved == []


# -- the backend -------------------------------------------------------------------------------


class DiskRecording(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.disks: list[tuple[str, C.DiskRef, bool]] = []

    def open(
        self, vol: C.Volume, secret: Secret, progress: ScanProgress | None = None
    ) -> OpenedVolume:
        self.disks.append((vol.name, vol.disk, vol.create))
        return super().open(vol, secret, progress)


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.storage = DiskRecording()
        self.keys = FakeKeySource()
        self.manager = VolumeManager(
            contract(DATA, PG, allow=("SecureMount",)),
            self.storage,
            self.keys,
            rootfs_base=tmp_path / "kata",
        )
        held = dataclasses.replace(OTHER_DISK, holders=("dm-7",))
        self.guest = FakeGuest({(252, 16): PG_DISK, (252, 32): CLOUD_DISK, (252, 48): held})
        self.backend = ManagerSecureMountBackend(
            self.manager, tmp_path / "state", ops=self.guest.ops()
        )
        self.service = SecureMountService(
            self.backend, (DATA, PG), policy=KEYED, header_dir=tmp_path / "h", mount_rules=RULES
        )

    async def call(self, options: dict[str, str], mount: str) -> str:
        request = api_pb2.SecureMountRequest(
            volume_type="block-device", options=options, mount_point=mount
        )
        return (await self.service.secure_mount(request, CTX)).mount_path


async def test_backend_opens_the_device_the_request_names(tmp_path: Path) -> None:
    world = World(tmp_path)
    options, mount = caa(str(DATA.key), "/dev/vdc")
    assert await world.call(options, mount) == mount
    assert world.storage.disks == [("data", C.DiskRef("securemount", "/dev/vdc"), True)]
    assert world.keys.requests == [str(DATA.key)]
    # the same request again (CAA on a restarted pod): OK, nothing opened twice
    assert await world.call(options, mount) == mount
    assert len(world.storage.disks) == 1
    # the same volume on another disk, while open on this one: refused
    moved, other_mount = caa(str(DATA.key), "/dev/vdd", name="again")
    with pytest.raises(RpcError) as info:
        await world.call(moved, other_mount)
    assert info.value.rpc_code == Code.FAILED_PRECONDITION and "in-use" in str(info.value)
    assert len(world.storage.disks) == 1


async def test_backend_refuses_a_held_device(tmp_path: Path) -> None:
    world = World(tmp_path)
    options, mount = caa(str(DATA.key), "/dev/vdd")
    with pytest.raises(RpcError, match="device-in-use"):
        await world.call(options, mount)
    assert world.storage.disks == [] and world.keys.requests == []
