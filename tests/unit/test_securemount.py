"""SecureMount request -> persistent / ephemeral / refused, one test per mapping and rule."""

from __future__ import annotations

import base64
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent._proto.cdh import api_pb2
from agent.mountpoints import MountRules, parse_root
from agent.rpc.ttrpc import CallContext, Code, status_for
from agent.securemount.decisions import (
    DEFAULT_MOUNT_RULES,
    EPHEMERAL_MAPPER_PREFIX,
    OPTION_KEYS,
    DeviceIdentity,
    DeviceSelector,
    EphemeralMount,
    PersistentMount,
    SecureMountParams,
    SecureMountPolicy,
    SecureMountRefused,
    SecureMountService,
    ephemeral_mkfs_args,
    parse_secure_mount,
    plan_secure_mount,
)

HEADERS = Path("/run/cva/ephemeral")
BOTH = SecureMountPolicy(persistent=True, ephemeral=True)
MOUNT = "/run/kata-containers/sandbox/storage/vol1"


@dataclass(frozen=True)
class Uri:  # stands in for agent.contract.KbsResourceUri
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Disk:
    kind: str
    value: str


@dataclass(frozen=True)
class Vol:  # the fields of agent.contract.Volume that SecureMount reads
    name: str
    key: Uri
    disk: Disk
    filesystem: str = "ext4"
    containers: tuple[str, ...] = ()
    create: bool = True
    integrity: bool = False
    read_only: bool = False


PGDATA = Vol("pgdata", Uri("kbs:///default/pgdata/luks"), Disk("serial", "pgdisk"))
LOGS = Vol(
    "logs",
    Uri("kbs:///default/logs/luks"),
    Disk("pci", "0000:00:06.0"),
    filesystem="xfs",
    integrity=True,
    create=False,
)
SCSI = Vol("scsi", Uri("kbs:///default/scsi/luks"), Disk("scsi", "0:0:0:1"))
VOLUMES = (PGDATA, LOGS, SCSI)

PG_DEVICE = DeviceIdentity(
    path="/dev/vdb",
    major=252,
    minor=16,
    serial="pgdisk",
    sysfs_path="/sys/devices/pci0000:00/0000:00:05.0/virtio2/block/vdb",
)
LOGS_DEVICE = DeviceIdentity(
    path="/dev/vdc",
    major=252,
    minor=32,
    serial=None,
    sysfs_path="/sys/devices/pci0000:00/0000:00:06.0/virtio3/block/vdc",
)
SCSI_DEVICE = DeviceIdentity(
    path="/dev/sda",
    major=8,
    minor=0,
    serial=None,
    sysfs_path="/sys/devices/pci0000:00/0000:00:07.0/host0/target0:0:0/0:0:0:1/block/sda",
)
BLANK_DEVICE = DeviceIdentity(
    path="/dev/vdd",
    major=252,
    minor=48,
    serial="kata-emptydir",
    sysfs_path="/sys/devices/pci0000:00/0000:00:08.0/virtio4/block/vdd",
)

# What kata-agent sends for an encrypted block emptyDir (SPEC e.2).
KATA_EMPTYDIR = {
    "deviceId": "252:48",
    "sourceType": "empty",
    "targetType": "fileSystem",
    "filesystemType": "ext4",
    "mkfsOpts": "-O ^has_journal -m 0 -i 163840 -I 128",
    "encryptionType": "luks2",
    "dataIntegrity": "false",
}


def parse(options: dict[str, str], flags: tuple[str, ...] = (), mount: str = MOUNT):
    return parse_secure_mount("block-device", options, flags, mount)


def refused(
    options: dict[str, str], flags: tuple[str, ...] = (), mount: str = MOUNT
) -> SecureMountRefused:
    with pytest.raises(SecureMountRefused) as info:
        parse(options, flags, mount)
    return info.value


def plan(
    options: dict[str, str],
    device: DeviceIdentity,
    *,
    policy: SecureMountPolicy = BOTH,
    flags: tuple[str, ...] = (),
    volumes: tuple[Vol, ...] = VOLUMES,
) -> PersistentMount | EphemeralMount:
    return plan_secure_mount(
        parse(options, flags),
        device,
        volumes,
        policy=policy,
        header_dir=HEADERS,
        new_mapper_name=lambda: "cva-eph-fixed",
    )


def plan_refused(options: dict[str, str], device: DeviceIdentity, **kw: object):
    with pytest.raises(SecureMountRefused) as info:
        plan(options, device, **kw)  # type: ignore[arg-type]
    return info.value


def persistent_request(vol: Vol = PGDATA, **extra: str) -> dict[str, str]:
    return {"deviceId": "252:16", "sourceType": "encrypted", "key": str(vol.key), **extra}


# -- ephemeral -----------------------------------------------------------------------------------


def test_kata_emptydir_request_is_an_ephemeral_volume() -> None:
    p = plan(KATA_EMPTYDIR, BLANK_DEVICE)
    assert p == EphemeralMount(
        device=BLANK_DEVICE,
        mapper_name="cva-eph-fixed",
        header_path=HEADERS / "cva-eph-fixed.header",
        integrity=False,
        target="filesystem",
        filesystem="ext4",
        mkfs_args=("-O", "^has_journal", "-m", "0", "-i", "163840", "-I", "128"),
        mount_point=MOUNT,
        read_only=False,
    )


def test_ephemeral_default_mapper_name_is_random_and_prefixed() -> None:
    params = parse(KATA_EMPTYDIR)
    names = {
        plan_secure_mount(params, BLANK_DEVICE, (), policy=BOTH, header_dir=HEADERS).mapper_name
        for _ in range(3)
    }
    assert len(names) == 3
    assert all(n.startswith(EPHEMERAL_MAPPER_PREFIX) for n in names)


def test_ephemeral_with_integrity_forces_lazy_itable_init_0_into_one_E() -> None:
    opts = {**KATA_EMPTYDIR, "dataIntegrity": "true", "mkfsOpts": "-E lazy_journal_init"}
    p = plan(opts, BLANK_DEVICE)
    assert isinstance(p, EphemeralMount)
    assert p.integrity
    assert p.mkfs_args == ("-E", "lazy_journal_init,lazy_itable_init=0")


@pytest.mark.parametrize(
    ("args", "integrity", "expected"),
    [
        ((), False, ()),
        ((), True, ("-E", "lazy_itable_init=0")),
        (("-E", "lazy_itable_init=1"), True, ("-E", "lazy_itable_init=1")),  # the caller's choice
        (
            ("-E", "nodiscard", "-m", "0", "-E", "lazy_journal_init"),
            False,
            ("-m", "0", "-E", "nodiscard,lazy_journal_init"),
        ),
    ],
)
def test_ephemeral_mkfs_args(args, integrity, expected) -> None:
    assert ephemeral_mkfs_args(args, integrity=integrity) == expected


def test_ephemeral_device_target_and_given_mapper_name_and_ro() -> None:
    opts = {
        "devicePath": "/dev/vdd",
        "sourceType": "empty",
        "targetType": "device",
        "mapperName": "emptydir-1",
    }
    p = plan(opts, BLANK_DEVICE, flags=("ro", "nodev"))
    assert isinstance(p, EphemeralMount)
    assert (p.target, p.mapper_name, p.header_path, p.read_only) == (
        "device",
        "emptydir-1",
        HEADERS / "emptydir-1.header",
        True,
    )


def test_ephemeral_mapper_name_of_a_contract_volume_is_refused() -> None:
    """Issue 21 #5c: an ephemeral volume named like a contract volume is refused."""
    for vol in VOLUMES:
        err = plan_refused({**KATA_EMPTYDIR, "mapperName": vol.name}, BLANK_DEVICE)
        assert (err.rpc_code, err.rule) == (Code.INVALID_ARGUMENT, "mapper-name")
        assert f"contract volume {vol.name}" in str(err)
    ok = plan({**KATA_EMPTYDIR, "mapperName": VOLUMES[0].name + "-x"}, BLANK_DEVICE)
    assert isinstance(ok, EphemeralMount)


def test_ephemeral_not_allowed_by_policy() -> None:
    err = plan_refused(KATA_EMPTYDIR, BLANK_DEVICE, policy=SecureMountPolicy(persistent=True))
    assert (err.rpc_code, err.rule) == (Code.PERMISSION_DENIED, "ephemeral-not-allowed")


def test_ephemeral_open_without_key_is_refused() -> None:
    err = plan_refused({**KATA_EMPTYDIR, "sourceType": "encrypted"}, BLANK_DEVICE)
    assert (err.rpc_code, err.rule) == (Code.INVALID_ARGUMENT, "source-type")


@pytest.mark.parametrize(
    "device", [PG_DEVICE, LOGS_DEVICE, SCSI_DEVICE], ids=["serial", "pci", "scsi"]
)
def test_ephemeral_never_formats_a_contract_disk(device: DeviceIdentity) -> None:
    err = plan_refused(KATA_EMPTYDIR, device)
    assert (err.rpc_code, err.rule) == (Code.PERMISSION_DENIED, "contract-disk")
    assert device.path in str(err)


# -- persistent ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "create", "allow_create"),
    [("encrypted", True, False), ("empty", True, True), ("empty", False, False)],
)
def test_persistent_contract_volume(source: str, create: bool, allow_create: bool) -> None:
    vol = replace(PGDATA, create=create)
    p = plan(persistent_request(vol, sourceType=source), PG_DEVICE, volumes=(vol, LOGS))
    assert p == PersistentMount(
        volume=vol, device=PG_DEVICE, mount_point=MOUNT, read_only=False, allow_create=allow_create
    )


def test_persistent_read_only_from_flag_or_contract() -> None:
    p = plan(persistent_request(), PG_DEVICE, flags=("ro",))
    assert isinstance(p, PersistentMount) and p.read_only
    ro = replace(PGDATA, read_only=True)
    p = plan(persistent_request(ro), PG_DEVICE, volumes=(ro,))
    assert isinstance(p, PersistentMount) and p.read_only


def test_persistent_matched_by_pci_and_scsi_path() -> None:
    p = plan(persistent_request(LOGS, dataIntegrity="true"), LOGS_DEVICE)
    assert isinstance(p, PersistentMount) and p.volume is LOGS
    p = plan(persistent_request(SCSI), SCSI_DEVICE)
    assert isinstance(p, PersistentMount) and p.volume is SCSI


def test_persistent_accepts_matching_optional_fields() -> None:
    opts = persistent_request(
        filesystemType="ext4",
        dataIntegrity="false",
        targetType="fileSystem",
        encryptionType="luks2",
        mapperName="ignored-name",
    )
    assert isinstance(plan(opts, PG_DEVICE), PersistentMount)


@pytest.mark.parametrize(
    ("options", "device", "policy", "code", "rule"),
    [
        (
            persistent_request(),
            PG_DEVICE,
            SecureMountPolicy(ephemeral=True),
            Code.PERMISSION_DENIED,
            "persistent-not-allowed",
        ),
        (
            persistent_request(key="kbs:///default/other/luks"),
            PG_DEVICE,
            BOTH,
            Code.PERMISSION_DENIED,
            "key-not-in-contract",
        ),
        (
            persistent_request(),
            BLANK_DEVICE,
            BOTH,
            Code.PERMISSION_DENIED,
            "device-not-contract-disk",
        ),
        (
            persistent_request(),
            LOGS_DEVICE,
            BOTH,  # pgdata's key on logs' disk
            Code.PERMISSION_DENIED,
            "device-not-contract-disk",
        ),
        (
            persistent_request(targetType="device"),
            PG_DEVICE,
            BOTH,
            Code.INVALID_ARGUMENT,
            "target-type",
        ),
        (
            persistent_request(LOGS, filesystemType="ext4"),
            LOGS_DEVICE,
            BOTH,
            Code.INVALID_ARGUMENT,
            "filesystem-type",
        ),
        (
            persistent_request(dataIntegrity="true"),
            PG_DEVICE,
            BOTH,
            Code.PERMISSION_DENIED,
            "data-integrity",
        ),
        (
            persistent_request(LOGS, dataIntegrity="false"),
            LOGS_DEVICE,
            BOTH,
            Code.PERMISSION_DENIED,
            "data-integrity",
        ),
        (persistent_request(mkfsOpts="-m 0"), PG_DEVICE, BOTH, Code.INVALID_ARGUMENT, "mkfs-opts"),
    ],
)
def test_persistent_refusals(options, device, policy, code, rule) -> None:
    err = plan_refused(options, device, policy=policy)
    assert (err.rpc_code, err.rule) == (code, rule)
    assert f"({rule})" in str(err)


def test_persistent_refused_when_contract_limits_containers() -> None:
    vol = replace(PGDATA, containers=("postgres",))
    err = plan_refused(persistent_request(vol), PG_DEVICE, volumes=(vol,))
    assert (err.rpc_code, err.rule) == (Code.PERMISSION_DENIED, "containers-restricted")
    assert "postgres" in str(err)


def test_persistent_refused_when_ambiguous() -> None:
    twin = replace(PGDATA, name="pgtwin")
    err = plan_refused(persistent_request(), PG_DEVICE, volumes=(PGDATA, twin))
    assert (err.rpc_code, err.rule) == (Code.FAILED_PRECONDITION, "ambiguous-volume")


# -- request validation --------------------------------------------------------------------------


def test_volume_type_other_than_block_device() -> None:
    with pytest.raises(SecureMountRefused) as info:
        parse_secure_mount("aliyun-oss", KATA_EMPTYDIR, (), MOUNT)
    assert (info.value.rpc_code, info.value.rule) == (Code.UNIMPLEMENTED, "volume-type")


def test_device_id_wins_over_device_path() -> None:
    p = parse({**KATA_EMPTYDIR, "devicePath": "/dev/vdz"})
    assert p.device == DeviceSelector(device_id=(252, 48), device_path=None)
    assert str(p.device) == "252:48"


@pytest.mark.parametrize(
    ("options", "code", "rule"),
    [
        ({**KATA_EMPTYDIR, "sourceTyp": "empty"}, Code.INVALID_ARGUMENT, "option-keys"),
        ({**KATA_EMPTYDIR, "mkfsOpts": "x" * 5000}, Code.INVALID_ARGUMENT, "option-value"),
        ({**KATA_EMPTYDIR, "mapperName": "a\x00b"}, Code.INVALID_ARGUMENT, "option-value"),
        ({"sourceType": "empty"}, Code.INVALID_ARGUMENT, "device"),
        ({**KATA_EMPTYDIR, "deviceId": "252"}, Code.INVALID_ARGUMENT, "device"),
        ({**KATA_EMPTYDIR, "deviceId": "252:16:1"}, Code.INVALID_ARGUMENT, "device"),
        ({**KATA_EMPTYDIR, "deviceId": "-1:0"}, Code.INVALID_ARGUMENT, "device"),
        ({**KATA_EMPTYDIR, "deviceId": " 252:16"}, Code.INVALID_ARGUMENT, "device"),
        ({**KATA_EMPTYDIR, "deviceId": "4096:0"}, Code.INVALID_ARGUMENT, "device"),
        ({**KATA_EMPTYDIR, "deviceId": "1:1048576"}, Code.INVALID_ARGUMENT, "device"),
        ({"devicePath": "/etc/passwd", "sourceType": "empty"}, Code.INVALID_ARGUMENT, "device"),
        ({"devicePath": "/dev/../etc/x", "sourceType": "empty"}, Code.INVALID_ARGUMENT, "device"),
        ({"devicePath": "vdb", "sourceType": "empty"}, Code.INVALID_ARGUMENT, "device"),
        ({"deviceId": "1:2"}, Code.INVALID_ARGUMENT, "source-type"),
        ({"deviceId": "1:2", "sourceType": "EMPTY"}, Code.INVALID_ARGUMENT, "source-type"),
        ({**KATA_EMPTYDIR, "encryptionType": "zfs"}, Code.UNIMPLEMENTED, "encryption-type"),
        ({**KATA_EMPTYDIR, "encryptionType": "luks1"}, Code.INVALID_ARGUMENT, "encryption-type"),
        ({**KATA_EMPTYDIR, "key": "sealed.eyJ.eyJ.sig"}, Code.UNIMPLEMENTED, "key-scheme"),
        ({**KATA_EMPTYDIR, "key": "file:///etc/key"}, Code.UNIMPLEMENTED, "key-scheme"),
        ({**KATA_EMPTYDIR, "key": "https://kbs/x"}, Code.INVALID_ARGUMENT, "key-scheme"),
        ({**KATA_EMPTYDIR, "key": "kbs:///only/two"}, Code.INVALID_ARGUMENT, "key-scheme"),
        ({**KATA_EMPTYDIR, "key": "kbs://host/a/b/c"}, Code.INVALID_ARGUMENT, "key-scheme"),
        ({**KATA_EMPTYDIR, "key": "kbs:///a/../c"}, Code.INVALID_ARGUMENT, "key-scheme"),
        ({**KATA_EMPTYDIR, "key": "kbs:///a/b/c?x"}, Code.INVALID_ARGUMENT, "key-scheme"),
        ({**KATA_EMPTYDIR, "dataIntegrity": "yes"}, Code.INVALID_ARGUMENT, "data-integrity"),
        ({**KATA_EMPTYDIR, "mapperName": "../x"}, Code.INVALID_ARGUMENT, "mapper-name"),
        ({**KATA_EMPTYDIR, "mapperName": "cva-pgdata"}, Code.INVALID_ARGUMENT, "mapper-name"),
        ({**KATA_EMPTYDIR, "targetType": "filesystem"}, Code.INVALID_ARGUMENT, "target-type"),
        ({**KATA_EMPTYDIR, "filesystemType": "btrfs"}, Code.INVALID_ARGUMENT, "filesystem-type"),
        ({**KATA_EMPTYDIR, "mkfsOpts": "-d /etc"}, Code.INVALID_ARGUMENT, "mkfs-opts"),
        ({**KATA_EMPTYDIR, "mkfsOpts": "-O ^has_journal;id"}, Code.INVALID_ARGUMENT, "mkfs-opts"),
        ({**KATA_EMPTYDIR, "mkfsOpts": "-E root_owner=0:0"}, Code.INVALID_ARGUMENT, "mkfs-opts"),
        (
            {**KATA_EMPTYDIR, "mkfsOpts": "-E lazy_itable_init=x"},
            Code.INVALID_ARGUMENT,
            "mkfs-opts",
        ),
        ({**KATA_EMPTYDIR, "mkfsOpts": "-m 99"}, Code.INVALID_ARGUMENT, "mkfs-opts"),
        ({**KATA_EMPTYDIR, "mkfsOpts": "-I 100"}, Code.INVALID_ARGUMENT, "mkfs-opts"),
        ({**KATA_EMPTYDIR, "mkfsOpts": "-m"}, Code.INVALID_ARGUMENT, "mkfs-opts"),
        ({**KATA_EMPTYDIR, "mkfsOpts": "-m 0 " * 17}, Code.INVALID_ARGUMENT, "mkfs-opts"),
    ],
)
def test_option_refusals(options: dict[str, str], code: Code, rule: str) -> None:
    err = refused(options)
    assert (err.rpc_code, err.rule) == (code, rule)
    assert "\x00" not in str(err)
    assert len(str(err)) < 400


def test_good_key_forms() -> None:
    assert parse({**KATA_EMPTYDIR, "key": "kbs:///a/b/c"}).key == "kbs:///a/b/c"
    assert parse({**KATA_EMPTYDIR, "key": "kbs+sealed:///a/b/c"}).key is not None


@pytest.mark.parametrize(
    ("flags", "rule"), [(("bind",), "flags"), (("ro", "rw"), "flags"), (("ro\x00",), "flags")]
)
def test_flag_refusals(flags: tuple[str, ...], rule: str) -> None:
    assert refused(KATA_EMPTYDIR, flags=flags).rule == rule


# every mount point issue 13 found accepted on main, and the places around kata's own
HOSTILE_MOUNT_POINTS = (
    "/",
    "/run",
    "/run/kata-containers",
    "/run/confidential-containers",
    "/run/systemd/system",
    "/var/lib",
    "/root",
    "/opt/venv/lib/python3.11/site-packages",
    "/etc",
    "/proc/self",
    "/run/cva/volumes/pgdata",
    "/usr/lib",
    "/etcetera",
    "/run/kata-containers/shared/containers/x/rootfs/data",
    "/run/kata-containers/0123abcd",  # a bundle directory: <rootfs_base>/<container id>
    "/run/kata-containers/sandbox",
    "/run/kata-containers/sandbox/storage",
    "/run/kata-containers/sandbox/storage/a/b",
    "/run/kata-containers/sandbox/storage/a.b",
    "/run/kata-containers/image/sub",
    "/run/kata-containers/images",
)
NOT_NORMALISED = (
    "",
    "relative/path",
    "run/kata-containers/image/",
    "/a/../etc",
    "/run/kata-containers/sandbox/storage/../../image",
    "/run/kata-containers/image//",
    "//run/kata-containers/image",
    "/run/kata-containers/./image",
    "/run/kata-containers/image/.",
    "/run/kata-containers/image\x00",
    "/run/kata-containers//image",
)


@pytest.mark.parametrize("mount", HOSTILE_MOUNT_POINTS)
def test_mount_points_outside_the_allow_list_are_refused(mount: str) -> None:
    for sent in (mount, mount + "/"):
        err = refused(KATA_EMPTYDIR, mount=sent)
        assert (err.rpc_code, err.rule) == (Code.PERMISSION_DENIED, "mount-point"), sent


@pytest.mark.parametrize("mount", NOT_NORMALISED)
def test_mount_points_not_normalised_are_refused(mount: str) -> None:
    err = refused(KATA_EMPTYDIR, mount=mount)
    assert (err.rpc_code, err.rule) == (Code.INVALID_ARGUMENT, "mount-point")


# kata-agent's two SecureMount calls, exactly as it sends them (SPEC e.5)
KATA_IMAGE_STORE = {
    "deviceId": "252:48",
    "sourceType": "empty",
    "targetType": "fileSystem",
    "filesystemType": "ext4",
    "mkfsOpts": "-E lazy_journal_init",
    "encryptionType": "luks2",
    "dataIntegrity": "true",
}
EMPTYDIR_ID = base64.urlsafe_b64encode(b"/dev/vdd").decode()  # the Go runtime's <id>


@pytest.mark.parametrize(
    ("options", "sent", "mounted"),
    [
        (KATA_IMAGE_STORE, "/run/kata-containers/image/", "/run/kata-containers/image"),
        (KATA_IMAGE_STORE, "/run/kata-containers/image", "/run/kata-containers/image"),
        *(
            (
                {**KATA_EMPTYDIR, "dataIntegrity": integrity},
                f"/run/kata-containers/sandbox/storage/{EMPTYDIR_ID}",
                f"/run/kata-containers/sandbox/storage/{EMPTYDIR_ID}",
            )
            for integrity in ("true", "false")
        ),
    ],
)
def test_kata_agents_real_requests_are_accepted(
    options: dict[str, str], sent: str, mounted: str
) -> None:
    p = plan_secure_mount(
        parse(options, mount=sent), BLANK_DEVICE, VOLUMES, policy=BOTH, header_dir=HEADERS
    )
    assert isinstance(p, EphemeralMount)
    assert p.mount_point == mounted
    assert p.integrity == (options["dataIntegrity"] == "true")
    assert p.rules == DEFAULT_MOUNT_RULES


def test_image_config_roots_widen_the_allow_list_and_reach_the_plan() -> None:
    rules = MountRules.build((parse_root("/mnt/scratch/*"),))
    params = parse_secure_mount("block-device", KATA_EMPTYDIR, (), "/mnt/scratch/x1", rules=rules)
    p = plan_secure_mount(
        params, BLANK_DEVICE, VOLUMES, policy=BOTH, header_dir=HEADERS, rules=rules
    )
    assert p.rules == rules
    assert refused(KATA_EMPTYDIR, mount="/mnt/scratch/x1").rule == "mount-point"


def test_refusal_maps_to_a_ttrpc_status_naming_the_rule() -> None:
    err = refused({**KATA_EMPTYDIR, "encryptionType": "zfs"})
    code, message = status_for(err)
    assert code == Code.UNIMPLEMENTED
    assert message == "SecureMount refused (encryption-type): encryptionType zfs is not served"


# -- properties ----------------------------------------------------------------------------------

_values = st.one_of(
    st.sampled_from(
        [
            "empty",
            "encrypted",
            "252:16",
            "/dev/vdb",
            "true",
            "luks2",
            "ext4",
            "fileSystem",
            "device",
            "kbs:///a/b/c",
            "-m 0",
            "-E lazy_itable_init=0",
        ]
    ),
    st.text(max_size=40),
)
_options = st.dictionaries(
    st.one_of(st.sampled_from(sorted(OPTION_KEYS)), st.text(max_size=12)), _values, max_size=10
)


@given(
    volume_type=st.one_of(st.just("block-device"), st.text(max_size=20)),
    options=_options,
    flags=st.lists(
        st.one_of(st.sampled_from(["ro", "rw", "nodev"]), st.text(max_size=8)), max_size=3
    ),
    mount=st.one_of(st.just(MOUNT), st.text(max_size=40)),
    device=st.sampled_from([PG_DEVICE, LOGS_DEVICE, SCSI_DEVICE, BLANK_DEVICE]),
)
def test_any_request_is_a_plan_or_a_clean_refusal(
    volume_type: str,
    options: dict[str, str],
    flags: list[str],
    mount: str,
    device: DeviceIdentity,
) -> None:
    try:
        params = parse_secure_mount(volume_type, options, flags, mount)
        assert isinstance(params, SecureMountParams)
        result = plan_secure_mount(params, device, VOLUMES, policy=BOTH, header_dir=HEADERS)
    except SecureMountRefused as err:
        assert err.rpc_code != Code.OK
        assert "\n" not in str(err)
        return
    assert isinstance(result, PersistentMount | EphemeralMount)
    if isinstance(result, EphemeralMount):
        assert not any(device.matches(v.disk.kind, v.disk.value) for v in VOLUMES)
        assert result.header_path.parent == HEADERS
        assert "/" not in result.mapper_name


# -- the service glue ----------------------------------------------------------------------------


class FakeBackend:
    def __init__(self, device: DeviceIdentity) -> None:
        self.device = device
        self.plans: list[PersistentMount | EphemeralMount] = []

    async def resolve_device(self, selector: DeviceSelector) -> DeviceIdentity:
        return self.device

    async def mount_persistent(self, plan: PersistentMount) -> str:
        self.plans.append(plan)
        return plan.mount_point

    async def mount_ephemeral(self, plan: EphemeralMount) -> str:
        self.plans.append(plan)
        return plan.mount_point

    async def sweep(self) -> None:
        return None


CTX = CallContext(
    service="api.SecureMountService", method="SecureMount", stream_id=1, metadata=(), timeout=10.0
)


async def test_service_hands_the_plan_to_the_backend() -> None:
    backend = FakeBackend(BLANK_DEVICE)
    svc = SecureMountService(backend, VOLUMES, policy=BOTH, header_dir=HEADERS)
    req = api_pb2.SecureMountRequest(
        volume_type="block-device", options=KATA_EMPTYDIR, mount_point=MOUNT
    )
    resp = await svc.secure_mount(req, CTX)
    assert resp.mount_path == MOUNT
    [p] = backend.plans
    assert isinstance(p, EphemeralMount)


async def test_service_refuses_before_touching_storage() -> None:
    backend = FakeBackend(PG_DEVICE)
    svc = SecureMountService(backend, VOLUMES, policy=BOTH, header_dir=HEADERS)
    req = api_pb2.SecureMountRequest(
        volume_type="block-device", options=KATA_EMPTYDIR, mount_point=MOUNT
    )
    with pytest.raises(SecureMountRefused, match=r"\(contract-disk\)"):
        await svc.secure_mount(req, CTX)
    assert backend.plans == []


def test_policy_from_allow_defaults_to_nothing() -> None:
    from agent.securemount.decisions import policy_from_allow

    default = frozenset({"PrepareVolumes", "ReleaseVolumes", "ListVolumes"})
    assert policy_from_allow(default) == SecureMountPolicy()
    assert policy_from_allow(default | {"SecureMount"}) == SecureMountPolicy(persistent=True)
    assert policy_from_allow(frozenset({"SecureMountEphemeral"})) == SecureMountPolicy(
        ephemeral=True
    )
