"""CDH's SecureMount (SPEC.md section e) mapped onto cva's volumes: pure decisions.

kata-agent calls `api.SecureMountService/SecureMount` with `volume_type = "block-device"`, an
`options` map (SPEC e.2), mount `flags` and a `mount_point`. Every value is hostile input: it comes
from the pod spec the host hands kata-agent. This module validates it and decides, without I/O:

- **persistent**: the request names a `key` (`kbs:///repo/type/tag`) and a device the contract
  knows -> that contract volume, opened (or created when provably blank and the contract says
  `create = true`, and `sourceType = empty`) with cva's own profile and mounted at `mount_point`.
  Unlike CDH, `sourceType = empty` never reformats an existing volume: cva's state machine decides.
  A volume whose `containers` list is non-empty is refused: over SecureMount cva cannot tell which
  container will see the mount, so it cannot enforce the list.
- **ephemeral**: no `key` (what kata-agent sends for encrypted emptyDir, `sourceType = empty`) ->
  a fresh volume: random key held only in memory, LUKS2 header detached in guest tmpfs (so the
  host never sees a header, and nothing survives the VM), cva's profile, integrity as requested
  with the fast-init rules (no wipe; `lazy_itable_init=0`). Never on a disk the contract names.
- **refused**: a `SecureMountRefused` carrying a ttRPC status code and the rule's name.

Both kinds must be enabled by the daemon's `SecureMountPolicy` (default: nothing). The I/O lives
behind `SecureMountBackend` (the daemon implements it); `SecureMountService` glues request ->
decision -> backend and serves it on a `TtrpcServer`.
"""

from __future__ import annotations

import posixpath
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

from agent._proto.cdh import api_pb2
from agent.contract import SECUREMOUNT_DISK, ContractError, parse_kbs_uri
from agent.errors import InputError
from agent.mountpoints import MountPointError, MountRules, normalise_request_path
from agent.rpc.ttrpc import CallContext, Code, TtrpcServer
from luks.disk import BlockInfo
from luks.disk import matches as disk_matches

SECURE_MOUNT_METHOD = "api.SecureMountService/SecureMount"
CDH_SOCKET_PATH = "/run/confidential-containers/cdh.sock"  # where kata-agent dials CDH
VOLUME_TYPE_BLOCK_DEVICE = "block-device"
OPTION_KEYS = frozenset(
    {
        "deviceId",
        "devicePath",
        "sourceType",
        "encryptionType",
        "key",
        "dataIntegrity",
        "mapperName",
        "targetType",
        "filesystemType",
        "mkfsOpts",
    }
)
MOUNT_FLAGS = frozenset({"ro", "rw", "nodev", "nosuid", "noexec", "noatime", "relatime"})
EPHEMERAL_MAPPER_PREFIX = "cva-eph-"
MAX_VALUE_CHARS = 4096
MAX_MKFS_TOKENS = 32
DEFAULT_MOUNT_RULES = MountRules()  # kata's two places (agent.mountpoints); the daemon adds config
_DEVICE_ID = re.compile(r"([0-9]{1,7}):([0-9]{1,10})")
_MAPPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,100}")
_EXT4_FEATURES = re.compile(r"\^?[a-z0-9_]{1,32}(,\^?[a-z0-9_]{1,32}){0,31}")
_EXT4_EXTENDED = frozenset(
    {
        "lazy_itable_init",
        "lazy_journal_init",
        "nodiscard",
        "stride",
        "stripe_width",
        "stripe-width",
        "packed_meta_blocks",
        "num_backup_sb",
        "assume_storage_prezeroed",
    }
)
_EXTENDED_VALUE = re.compile(r"[0-9]{1,10}")

SourceType = Literal["empty", "encrypted"]
TargetType = Literal["filesystem", "device"]
FsType = Literal["ext4", "xfs", "ext3"]  # what CDH's callers send (CAA: ext4 | ext3 | xfs)
FILESYSTEM_TYPES: tuple[FsType, ...] = ("ext4", "xfs", "ext3")
CDH_DEFAULT_FILESYSTEM: FsType = "ext4"  # CDH's default when filesystemType is absent


class SecureMountRefused(InputError):
    """A SecureMount request cva will not serve; the message names the rule."""

    def __init__(self, code: Code, rule: str, message: str) -> None:
        super().__init__(f"SecureMount refused ({rule}): {message}")
        self.rpc_code = code
        self.rule = rule


def _refuse(code: Code, rule: str, message: str) -> SecureMountRefused:
    return SecureMountRefused(code, rule, message)


# -- the request ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSelector:
    """Which guest block device the request means: `deviceId` (MAJ:MIN) wins over `devicePath`."""

    device_id: tuple[int, int] | None
    device_path: str | None

    def __str__(self) -> str:
        if self.device_id is not None:
            return f"{self.device_id[0]}:{self.device_id[1]}"
        return str(self.device_path)


@dataclass(frozen=True)
class SecureMountParams:
    """A validated SecureMount request (nothing decided yet)."""

    device: DeviceSelector
    source_type: SourceType
    key: str | None
    integrity: bool | None  # None: not given
    mapper_name: str | None
    target: TargetType
    filesystem: FsType | None  # None: not given
    mkfs_args: tuple[str, ...]
    mount_point: str
    read_only: bool
    mount_flags: tuple[str, ...]


def parse_secure_mount(
    volume_type: str,
    options: Mapping[str, str],
    flags: Sequence[str],
    mount_point: str,
    *,
    rules: MountRules = DEFAULT_MOUNT_RULES,
) -> SecureMountParams:
    """Validate a SecureMount request (SPEC e.2); raises `SecureMountRefused` naming the rule.
    The mount point is checked first: a request for a place cva never mounts is refused
    before anything else is looked at."""
    checked_mount_point = _mount_point(mount_point, rules)
    if volume_type != VOLUME_TYPE_BLOCK_DEVICE:
        raise _refuse(
            Code.UNIMPLEMENTED,
            "volume-type",
            f"volume_type {_show(volume_type)} is not served; cva serves "
            f"{VOLUME_TYPE_BLOCK_DEVICE!r} only",
        )
    unknown = sorted(set(options) - OPTION_KEYS)
    if unknown:
        raise _refuse(
            Code.INVALID_ARGUMENT,
            "option-keys",
            f"unknown option {_show(unknown[0])}; known: {', '.join(sorted(OPTION_KEYS))}",
        )
    for name, value in options.items():
        if len(value) > MAX_VALUE_CHARS or "\x00" in value:
            raise _refuse(
                Code.INVALID_ARGUMENT,
                "option-value",
                f"option {name} is longer than {MAX_VALUE_CHARS} characters or holds NUL",
            )
    return SecureMountParams(
        device=_device_selector(options),
        source_type=_source_type(options.get("sourceType")),
        key=_key(options),
        integrity=_bool_option(options, "dataIntegrity"),
        mapper_name=_mapper_name(options.get("mapperName")),
        target=_target(options.get("targetType")),
        filesystem=_filesystem(options.get("filesystemType")),
        mkfs_args=_mkfs_args(options.get("mkfsOpts")),
        mount_point=checked_mount_point,
        read_only=_read_only(flags),
        mount_flags=tuple(flags),
    )


def _show(value: str) -> str:
    """A hostile string, quoted and shortened for an error line."""
    return repr(value[:64] + ("..." if len(value) > 64 else ""))


def _device_selector(options: Mapping[str, str]) -> DeviceSelector:
    device_id = options.get("deviceId")
    device_path = options.get("devicePath")
    if device_id is None and device_path is None:
        raise _refuse(Code.INVALID_ARGUMENT, "device", "deviceId or devicePath is required")
    parsed_id: tuple[int, int] | None = None
    if device_id is not None:
        m = _DEVICE_ID.fullmatch(device_id)
        if m is None:
            raise _refuse(
                Code.INVALID_ARGUMENT,
                "device",
                f"deviceId {_show(device_id)} is not MAJOR:MINOR",
            )
        parsed_id = (int(m.group(1)), int(m.group(2)))
        if parsed_id[0] >= 1 << 12 or parsed_id[1] >= 1 << 20:
            raise _refuse(Code.INVALID_ARGUMENT, "device", f"deviceId {device_id} is out of range")
        device_path = None  # deviceId wins (SPEC e.2)
    if device_path is not None and (
        not device_path.startswith("/dev/") or posixpath.normpath(device_path) != device_path
    ):
        raise _refuse(
            Code.INVALID_ARGUMENT,
            "device",
            f"devicePath {_show(device_path)} is not a normalized path under /dev",
        )
    return DeviceSelector(device_id=parsed_id, device_path=device_path)


def _source_type(value: str | None) -> SourceType:
    if value == "empty":
        return "empty"
    if value == "encrypted":
        return "encrypted"
    raise _refuse(
        Code.INVALID_ARGUMENT,
        "source-type",
        f"sourceType must be 'empty' or 'encrypted', not {_show(value or '')}",
    )


def _key(options: Mapping[str, str]) -> str | None:
    encryption = options.get("encryptionType", "luks2")
    if encryption == "zfs":
        raise _refuse(Code.UNIMPLEMENTED, "encryption-type", "encryptionType zfs is not served")
    if encryption != "luks2":
        raise _refuse(
            Code.INVALID_ARGUMENT,
            "encryption-type",
            f"encryptionType must be 'luks2', not {_show(encryption)}",
        )
    key = options.get("key")
    if key is None:
        return None
    if key.startswith("sealed.") or key.startswith("file://"):
        raise _refuse(
            Code.UNIMPLEMENTED,
            "key-scheme",
            "cva takes volume keys from the KBS only (kbs:///repo/type/tag); sealed secrets "
            "and file:// keys are not served",
        )
    try:
        uri = parse_kbs_uri(key, "key")
    except ContractError as exc:
        raise _refuse(Code.INVALID_ARGUMENT, "key-scheme", exc.rule) from exc
    return str(uri)  # canonical form, compared with the contract's str(volume.key)


def _bool_option(options: Mapping[str, str], name: str) -> bool | None:
    value = options.get(name)
    if value is None:
        return None
    if value in ("true", "false"):
        return value == "true"
    raise _refuse(
        Code.INVALID_ARGUMENT, "data-integrity", f"{name} must be 'true' or 'false', not {value!r}"
    )


def _mapper_name(value: str | None) -> str | None:
    if value is None:
        return None
    if _MAPPER_NAME.fullmatch(value) is None or value in (".", ".."):
        raise _refuse(
            Code.INVALID_ARGUMENT,
            "mapper-name",
            f"mapperName {_show(value)} must match {_MAPPER_NAME.pattern}",
        )
    if value.startswith("cva"):
        raise _refuse(
            Code.INVALID_ARGUMENT, "mapper-name", "mapperName must not start with 'cva' (reserved)"
        )
    return value


def _target(value: str | None) -> TargetType:
    if value is None or value == "fileSystem":
        return "filesystem"
    if value == "device":
        return "device"
    raise _refuse(
        Code.INVALID_ARGUMENT,
        "target-type",
        f"targetType must be 'fileSystem' or 'device', not {_show(value)}",
    )


def _filesystem(value: str | None) -> FsType | None:
    if value is None:
        return None
    for known in FILESYSTEM_TYPES:
        if value == known:
            return known
    raise _refuse(
        Code.INVALID_ARGUMENT,
        "filesystem-type",
        f"filesystemType must be one of {', '.join(FILESYSTEM_TYPES)}, not {_show(value)}",
    )


def _mkfs_args(value: str | None) -> tuple[str, ...]:
    """mkfs.ext4 arguments from an allow-list (kata sends `-O ^has_journal -m 0 -i 163840
    -I 128` or `-E lazy_journal_init`); anything else is refused."""
    if value is None:
        return ()
    tokens = value.split()
    if len(tokens) > MAX_MKFS_TOKENS or len(tokens) % 2:
        raise _refuse(
            Code.INVALID_ARGUMENT,
            "mkfs-opts",
            f"mkfsOpts must be at most {MAX_MKFS_TOKENS // 2} '-X value' pairs",
        )
    for flag, arg in zip(tokens[::2], tokens[1::2], strict=True):
        if not _mkfs_pair_ok(flag, arg):
            raise _refuse(
                Code.INVALID_ARGUMENT,
                "mkfs-opts",
                f"mkfsOpts {_show(flag + ' ' + arg)} is not allowed (allowed: -O features, "
                "-E extended options, -m, -i, -I, -b, -N with plain values)",
            )
    return tuple(tokens)


def _mkfs_pair_ok(flag: str, arg: str) -> bool:
    if flag == "-O":
        return _EXT4_FEATURES.fullmatch(arg) is not None
    if flag == "-E":
        for item in arg.split(","):
            name, sep, val = item.partition("=")
            if name not in _EXT4_EXTENDED or (sep and _EXTENDED_VALUE.fullmatch(val) is None):
                return False
        return True
    if not arg.isdigit() or len(arg) > 10:
        return False
    number = int(arg)
    if flag == "-m":
        return number <= 50
    if flag == "-i":
        return 1024 <= number <= 67108864
    if flag == "-I":
        return number in (128, 256, 512, 1024)
    if flag == "-b":
        return number == 4096  # the dm-crypt sector size: smaller ext4 blocks cannot work
    if flag == "-N":
        return 1 <= number <= 2**32 - 1
    return False


def _mount_point(value: str, rules: MountRules) -> str:
    """The request's mount point, normalised (one trailing slash dropped), on the allow-list."""
    try:
        path = normalise_request_path(value)
    except MountPointError as exc:
        raise _refuse(Code.INVALID_ARGUMENT, "mount-point", str(exc)) from None
    refusal = rules.refusal(path)
    if refusal is not None:
        raise _refuse(Code.PERMISSION_DENIED, "mount-point", f"mount_point {refusal}")
    return path


def _read_only(flags: Sequence[str]) -> bool:
    for flag in flags:
        if flag not in MOUNT_FLAGS:
            raise _refuse(
                Code.INVALID_ARGUMENT,
                "flags",
                f"mount flag {_show(flag)} is not allowed; "
                f"allowed: {', '.join(sorted(MOUNT_FLAGS))}",
            )
    if "ro" in flags and "rw" in flags:
        raise _refuse(Code.INVALID_ARGUMENT, "flags", "mount flags 'ro' and 'rw' contradict")
    return "ro" in flags


# -- the device and the contract -----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceIdentity:
    """What the guest knows about the requested device (found by the daemon through sysfs)."""

    path: str  # /dev/vdb
    major: int
    minor: int
    serial: str | None  # virtio-blk serial (/sys/dev/block/M:m/serial)
    sysfs_path: str  # resolved /sys/devices/... path of the block device
    holders: tuple[str, ...] = ()  # devices stacked on it (/sys/dev/block/M:m/holders)

    def matches(self, kind: str, value: str) -> bool:
        """True when this device is the contract's disk `kind:value` (DiskRef): the storage
        layer's one matcher (luks.disk.matches), the same that finds a contract volume's disk."""
        info = BlockInfo(posixpath.basename(self.path), self.serial or "", self.sysfs_path)
        return disk_matches(kind, value, info)


class ContractDisk(Protocol):
    """The part of `agent.contract.DiskRef` used here."""

    @property
    def kind(self) -> str: ...
    @property
    def value(self) -> str: ...


class ContractVolume(Protocol):
    """The part of `agent.contract.Volume` used here."""

    @property
    def name(self) -> str: ...
    @property
    def key(self) -> object: ...  # KbsResourceUri; str(key) == "kbs:///repo/type/tag"
    @property
    def disk(self) -> ContractDisk: ...
    @property
    def filesystem(self) -> str: ...
    @property
    def containers(self) -> tuple[str, ...]: ...
    @property
    def create(self) -> bool: ...
    @property
    def integrity(self) -> bool: ...
    @property
    def read_only(self) -> bool: ...


@dataclass(frozen=True)
class SecureMountPolicy:
    """Which SecureMount kinds the daemon serves (derived from the measured contract)."""

    persistent: bool = False
    ephemeral: bool = False


# The contract's `[api] allow` names that enable the two kinds (agent.contract.API_METHODS).
ALLOW_PERSISTENT = "SecureMount"
ALLOW_EPHEMERAL = "SecureMountEphemeral"


def policy_from_allow(allow: frozenset[str]) -> SecureMountPolicy:
    """The SecureMount policy a contract's `[api] allow` list grants."""
    return SecureMountPolicy(
        persistent=ALLOW_PERSISTENT in allow, ephemeral=ALLOW_EPHEMERAL in allow
    )


@dataclass(frozen=True)
class PersistentMount:
    """Open (or create, when allowed and blank) contract volume `volume` at `mount_point`."""

    volume: ContractVolume
    device: DeviceIdentity
    mount_point: str
    read_only: bool
    allow_create: bool  # sourceType=empty and the contract's create = true
    rules: MountRules = DEFAULT_MOUNT_RULES  # checked again on the kernel-resolved path


@dataclass(frozen=True)
class EphemeralMount:
    """Format `device` as a fresh volume with a random in-memory key and a detached header."""

    device: DeviceIdentity
    mapper_name: str
    header_path: Path  # in guest tmpfs; the device never carries a LUKS header
    integrity: bool  # dm-integrity hmac(sha256): no wipe, pre-write what mkfs reads
    target: TargetType  # filesystem: mkfs + mount; device: symlink /dev/mapper/<name>
    filesystem: Literal["ext4"]
    mkfs_args: tuple[str, ...]  # allow-listed; with integrity, lazy_itable_init=0 is forced
    mount_point: str
    read_only: bool
    rules: MountRules = DEFAULT_MOUNT_RULES  # checked again on the kernel-resolved path


def plan_secure_mount(
    params: SecureMountParams,
    device: DeviceIdentity,
    volumes: Sequence[ContractVolume],
    *,
    policy: SecureMountPolicy,
    header_dir: Path,
    new_mapper_name: Callable[[], str] | None = None,
    rules: MountRules = DEFAULT_MOUNT_RULES,
) -> PersistentMount | EphemeralMount:
    """Decide what a validated request means for this contract, or refuse naming the rule."""
    if params.key is not None:
        return replace(_plan_persistent(params, device, volumes, policy), rules=rules)
    return replace(
        _plan_ephemeral(
            params,
            device,
            volumes,
            policy=policy,
            header_dir=header_dir,
            new_mapper_name=new_mapper_name,
        ),
        rules=rules,
    )


def _disk_text(vol: ContractVolume) -> str:
    return f"{vol.disk.kind}:{vol.disk.value}"


def via_securemount(vol: ContractVolume) -> bool:
    """`disk = "securemount"`: the request names the device (agent.contract)."""
    return vol.disk.kind == SECUREMOUNT_DISK


def keyed_volumes(
    params: SecureMountParams, volumes: Sequence[ContractVolume], policy: SecureMountPolicy
) -> list[ContractVolume]:
    """The contract volumes a keyed request may mean, or a refusal: called before the device is
    looked at, so a key the contract does not list never gets a device touched."""
    if not policy.persistent:
        raise _refuse(
            Code.PERMISSION_DENIED,
            "persistent-not-allowed",
            "the contract does not allow contract volumes over SecureMount",
        )
    with_key = [v for v in volumes if str(v.key) == params.key]
    if not with_key:
        raise _refuse(
            Code.PERMISSION_DENIED,
            "key-not-in-contract",
            f"key {_show(params.key or '')} is not the key of any contract volume",
        )
    return with_key


def _named_disk_of(
    device: DeviceIdentity, volumes: Sequence[ContractVolume]
) -> ContractVolume | None:
    """The contract volume whose named disk (serial / pci / scsi) `device` is, if any."""
    for vol in volumes:
        if not via_securemount(vol) and device.matches(vol.disk.kind, vol.disk.value):
            return vol
    return None


def _plan_persistent(
    params: SecureMountParams,
    device: DeviceIdentity,
    volumes: Sequence[ContractVolume],
    policy: SecureMountPolicy,
) -> PersistentMount:
    with_key = keyed_volumes(params, volumes, policy)
    on_device = [
        v for v in with_key if via_securemount(v) or device.matches(v.disk.kind, v.disk.value)
    ]
    if not on_device:
        names = ", ".join(f"{v.name} ({_disk_text(v)})" for v in with_key)
        raise _refuse(
            Code.PERMISSION_DENIED,
            "device-not-contract-disk",
            f"device {device.path} ({device.major}:{device.minor}) is not the disk of the "
            f"contract volume(s) with that key: {names}",
        )
    if len(on_device) > 1:
        raise _refuse(
            Code.FAILED_PRECONDITION,
            "ambiguous-volume",
            f"contract volumes {', '.join(v.name for v in on_device)} share this key and disk",
        )
    vol = on_device[0]
    if via_securemount(vol):
        named = _named_disk_of(device, volumes)
        if named is not None:
            raise _refuse(
                Code.PERMISSION_DENIED,
                "contract-disk",
                f"device {device.path} is the disk of contract volume {named.name} "
                f"({_disk_text(named)}); securemount volume {vol.name} cannot be put on it",
            )
    if vol.containers:
        raise _refuse(
            Code.PERMISSION_DENIED,
            "containers-restricted",
            f"contract volume {vol.name} is limited to containers {', '.join(vol.containers)}; "
            "SecureMount cannot tell which container gets the mount",
        )
    if params.target != "filesystem":
        raise _refuse(
            Code.INVALID_ARGUMENT,
            "target-type",
            f"contract volume {vol.name} is served as a filesystem only (targetType=fileSystem)",
        )
    asked = params.filesystem
    if asked is None and via_securemount(vol):
        asked = CDH_DEFAULT_FILESYSTEM  # what CDH would make: it must be the contract's too
    if asked is not None and asked != vol.filesystem:
        raise _refuse(
            Code.INVALID_ARGUMENT,
            "filesystem-type",
            f"filesystemType={asked} but contract volume {vol.name} is {vol.filesystem}",
        )
    if params.integrity is not None and params.integrity != vol.integrity:
        raise _refuse(
            Code.PERMISSION_DENIED,
            "data-integrity",
            f"dataIntegrity={str(params.integrity).lower()} but contract volume {vol.name} has "
            f"integrity = {str(vol.integrity).lower()}",
        )
    if params.mkfs_args:
        raise _refuse(
            Code.INVALID_ARGUMENT,
            "mkfs-opts",
            f"mkfsOpts apply to ephemeral volumes only; cva formats {vol.name} with its profile",
        )
    # sourceType is a hint. A named disk keeps the old rule (create only for "empty"); for a
    # securemount volume the contract alone decides (CAA sends "empty" whenever the disk does
    # not start with the LUKS magic): the state machine opens a disk with cva's header whatever
    # the hint, and formats a disk proven blank only when the contract says create = true.
    hinted = params.source_type == "empty"
    return PersistentMount(
        volume=vol,
        device=device,
        mount_point=params.mount_point,
        read_only=params.read_only or vol.read_only,
        allow_create=vol.create if via_securemount(vol) else hinted and vol.create,
    )


def _plan_ephemeral(
    params: SecureMountParams,
    device: DeviceIdentity,
    volumes: Sequence[ContractVolume],
    *,
    policy: SecureMountPolicy,
    header_dir: Path,
    new_mapper_name: Callable[[], str] | None,
) -> EphemeralMount:
    if not policy.ephemeral:
        raise _refuse(
            Code.PERMISSION_DENIED,
            "ephemeral-not-allowed",
            "the contract does not allow ephemeral encrypted volumes over SecureMount",
        )
    if params.source_type != "empty":
        raise _refuse(
            Code.INVALID_ARGUMENT,
            "source-type",
            "sourceType=encrypted needs a key: without one only a new (empty) volume can be made",
        )
    if params.filesystem not in (None, "ext4"):
        raise _refuse(
            Code.INVALID_ARGUMENT,
            "filesystem-type",
            f"filesystemType={params.filesystem}: ephemeral volumes are ext4 (CDH's only value)",
        )
    for vol in volumes:
        if via_securemount(vol):
            continue  # no disk of its own: a disk cva holds for it is refused by its record
        if device.matches(vol.disk.kind, vol.disk.value):
            raise _refuse(
                Code.PERMISSION_DENIED,
                "contract-disk",
                f"device {device.path} is the disk of contract volume {vol.name} "
                f"({_disk_text(vol)}); an ephemeral volume would format it",
            )
    if params.mapper_name is not None:
        for vol in volumes:
            if params.mapper_name == vol.name:
                raise _refuse(
                    Code.INVALID_ARGUMENT,
                    "mapper-name",
                    f"mapperName {_show(params.mapper_name)} is the name of contract volume"
                    f" {vol.name}; an ephemeral volume must not be named like one (its events"
                    " would read as that volume's); omit mapperName or choose another",
                )
    integrity = bool(params.integrity)
    mapper = params.mapper_name or (new_mapper_name or _random_mapper_name)()
    return EphemeralMount(
        device=device,
        mapper_name=mapper,
        header_path=header_dir / f"{mapper}.header",
        integrity=integrity,
        target=params.target,
        filesystem="ext4",
        mkfs_args=ephemeral_mkfs_args(params.mkfs_args, integrity=integrity),
        mount_point=params.mount_point,
        read_only=params.read_only,
    )


def _random_mapper_name() -> str:
    return EPHEMERAL_MAPPER_PREFIX + uuid.uuid4().hex


def ephemeral_mkfs_args(args: tuple[str, ...], *, integrity: bool) -> tuple[str, ...]:
    """The allow-listed mkfs.ext4 args with every `-E` merged into one (mkfs keeps only the last
    -E) and, with integrity, `lazy_itable_init=0` unless the caller set it (DESIGN section 7)."""
    plain: list[str] = []
    extended: list[str] = []
    for flag, arg in zip(args[::2], args[1::2], strict=True):
        if flag == "-E":
            extended.extend(arg.split(","))
        else:
            plain.extend((flag, arg))
    if integrity and not any(e.partition("=")[0] == "lazy_itable_init" for e in extended):
        extended.append("lazy_itable_init=0")
    if extended:
        plain.extend(("-E", ",".join(extended)))
    return tuple(plain)


# -- the service ---------------------------------------------------------------------------------


class SecureMountBackend(Protocol):
    """The I/O side, implemented by the daemon."""

    async def resolve_device(self, selector: DeviceSelector) -> DeviceIdentity:
        """Find the block device (sysfs); raise a CvaError (NOT_FOUND-like) when absent."""
        ...

    async def mount_persistent(self, plan: PersistentMount) -> str:
        """Fetch the key, open/create, mount at plan.mount_point; returns the mounted path."""
        ...

    async def mount_ephemeral(self, plan: EphemeralMount) -> str:
        """Random key, detached header, format, mkfs, mount (or symlink); returns the path."""
        ...

    async def sweep(self) -> None:
        """Release what is no longer at its mount point (kata-agent unmounted it)."""
        ...


class SecureMountService:
    """`api.SecureMountService/SecureMount` over ttRPC: validate, decide, hand to the backend."""

    def __init__(
        self,
        backend: SecureMountBackend,
        volumes: Sequence[ContractVolume],
        *,
        policy: SecureMountPolicy,
        header_dir: Path,
        mount_rules: MountRules = DEFAULT_MOUNT_RULES,
    ) -> None:
        self._backend = backend
        self._volumes = tuple(volumes)
        self._policy = policy
        self._header_dir = header_dir
        self._rules = mount_rules

    async def secure_mount(
        self, request: api_pb2.SecureMountRequest, ctx: CallContext
    ) -> api_pb2.SecureMountResponse:
        params = parse_secure_mount(
            request.volume_type,
            dict(request.options),
            list(request.flags),
            request.mount_point,
            rules=self._rules,
        )
        if params.key is not None:
            keyed_volumes(params, self._volumes, self._policy)  # before the device is looked at
        device = await self._backend.resolve_device(params.device)
        plan = plan_secure_mount(
            params,
            device,
            self._volumes,
            policy=self._policy,
            header_dir=self._header_dir,
            rules=self._rules,
        )
        if isinstance(plan, PersistentMount):
            path = await self._backend.mount_persistent(plan)
        else:
            path = await self._backend.mount_ephemeral(plan)
        return api_pb2.SecureMountResponse(mount_path=path)

    def register(self, server: TtrpcServer) -> None:
        server.register_unary(SECURE_MOUNT_METHOD, api_pb2.SecureMountRequest, self.secure_mount)
