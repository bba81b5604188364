"""The container contract: `data."cva.toml"` inside the initdata document (DESIGN §2).

Pure parsing and validation, no I/O. The contract is measured (its bytes are part of the initdata
digest the hardware holds), but it is still written by a person and shipped through the host, so
every field is checked before anything touches a disk: unknown keys, wrong types, names, paths,
KBS URIs, sizes and the combinations between volumes. Each refusal is a `ContractError` whose one
line names the field and the rule it broke.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

from agent.errors import InputError

CONTRACT_KEY = "cva.toml"
CONTRACT_VERSION = 1

# kbs.tee only *requires* a TEE: the image decides it (agent/trust.py), a different one refuses
TEES = ("auto", "tdx", "snp", "tpm", "sample")
FILESYSTEMS = ("ext4", "xfs")
BLANK_CHECKS = ("full", "sampled")  # = luks.blankproof.BLANK_CHECKS (not imported: no storage
# layer before READY=1)
MIB = 1 << 20
# mkfs.xfs (xfsprogs >= 5.19, the guest's 6.1) refuses a data section under 300 MiB
XFS_MIN_BYTES = 300 * MIB
DATA_OFFSET_MIB = 16  # the LUKS2 header region in front of the filesystem (DESIGN §5)
DISK_KINDS = ("serial", "pci", "scsi", "container")
# `disk = "securemount"`: a disk the contract cannot name in advance (a peer-pod disk the cloud
# attaches, a hot-plugged PVC): the volume is delivered only through CDH's SecureMount, matched by
# its exact `key`; the request names the device and the mount point (agent.securemount).
SECUREMOUNT_DISK: Literal["securemount"] = "securemount"
# Host-callable RPCs the contract can allow. `SecureMount` lets CDH's SecureMount interface
# (ttRPC) open contract volumes; `SecureMountEphemeral` lets it create ephemeral encrypted
# volumes (random key, never a contract disk). Neither is allowed by default.
API_METHODS = frozenset(
    {"PrepareVolumes", "ReleaseVolumes", "ListVolumes", "SecureMount", "SecureMountEphemeral"}
)
DEFAULT_API_ALLOW = frozenset({"PrepareVolumes", "ReleaseVolumes", "ListVolumes"})

MAX_VOLUMES = 64
MAX_CONTAINERS = 64
MAX_PATH = 1024
MIN_LV_BYTES = 64 * 1024 * 1024
MAX_LV_BYTES = 1 << 60
FORBIDDEN_MOUNTS = ("/proc", "/sys", "/dev")

VOLUME_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")
CONTAINER_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
LVM_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
LVM_RESERVED = (
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_iorig", "_mimage", "_mlog", "_pmspare",
    "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
)  # fmt: skip
SIZE_RE = re.compile(r"([1-9][0-9]{0,15})([KMGTP])(iB)?")
LVM_SIZE_MAX = "max"  # lvm.size: the LV takes the VG's free space, at create and as the disk grows
SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# Disk references in the one canonical form luks.disk.matches accepts (the same patterns as
# luks.disk.*_REF_RE, repeated so the start path does not import the storage layer;
# tests/unit/test_disk_matcher.py checks that both accept exactly the same strings).
_DEC = r"(?:0|[1-9][0-9]{0,4})"  # decimal as the kernel prints it: no leading zero
SERIAL_RE = re.compile(r"[A-Za-z0-9_.-]{1,20}")
PCI_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]")
SCSI_RE = re.compile(rf"{_DEC}:{_DEC}(?::{_DEC}:{_DEC})?")  # H:C:T:L or kata's T:L
# a container's devicePath: /dev/NAME[/NAME...], no . or .. components (checked below)
CONTAINER_DEVICE_RE = re.compile(r"/dev(?:/[A-Za-z0-9_.-]{1,64}){1,8}")
URI_SEGMENT_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
PLUGIN_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
PEM_CERT = "-----BEGIN CERTIFICATE-----"


class ContractError(InputError):
    """A contract field broke a rule; the message names both."""

    def __init__(self, field: str, rule: str | None = None) -> None:
        self.field = field
        self.rule = rule or ""
        super().__init__(f"contract {field}: {rule}" if rule else f"contract: {field}")


@dataclass(frozen=True)
class KbsResourceUri:
    """`kbs:///repo/type/tag` (plugin None = the KBS `resource` plugin) or `kbs+PLUGIN:///a/b/c`."""

    repo: str
    type: str
    tag: str
    plugin: str | None = None

    def __str__(self) -> str:
        scheme = "kbs" if self.plugin is None else f"kbs+{self.plugin}"
        return f"{scheme}:///{self.repo}/{self.type}/{self.tag}"

    @property
    def plugin_name(self) -> str:
        """The KBS plugin the request goes to (`resource` for plain `kbs://`)."""
        return "resource" if self.plugin is None else self.plugin

    @property
    def path(self) -> str:
        """`repo/type/tag`, as it appears after `/kbs/v0/<plugin>/` in the request URL."""
        return f"{self.repo}/{self.type}/{self.tag}"


@dataclass(frozen=True)
class KbsConfig:
    url: str
    cert: str | None
    tee: str
    insecure_http: bool


@dataclass(frozen=True)
class ApiPolicy:
    allow: frozenset[str] = DEFAULT_API_ALLOW


@dataclass(frozen=True)
class LvmSpec:
    vg: str
    lv: str
    size_bytes: int | None  # None: size = "max", the LV takes the volume group's free space


@dataclass(frozen=True)
class DiskRef:
    # "container": the block device the container's own OCI spec lists at linux.devices[].path
    # == value (Kubernetes volumeDevices[].devicePath), resolved per container (agent.hook.devices)
    # to "devno" (MAJ:MIN, never parsed from a contract) before the storage layer sees it;
    # "securemount": "" in the contract, the device path once a SecureMount request names it
    kind: Literal["serial", "pci", "scsi", "container", "devno", "securemount"]
    value: str

    def __str__(self) -> str:
        if self.kind == SECUREMOUNT_DISK and not self.value:
            return SECUREMOUNT_DISK
        return f"{self.kind}:{self.value}"


@dataclass(frozen=True)
class Volume:
    name: str
    key: KbsResourceUri
    disk: DiskRef
    lvm: LvmSpec | None
    filesystem: Literal["ext4", "xfs"]
    mount: str
    containers: tuple[str, ...]
    create: bool
    integrity: bool
    read_only: bool
    # DESIGN §4: "full" (every byte read as zero before a format) or "sampled" (header region +
    # edge and spread samples only; for huge disks, documented with what it cannot see)
    blank_check: Literal["full", "sampled"] = "full"
    # key rotation (luks.rotation): the key the volume may still be under; fetched from the KBS
    # only when the volume's header is not yet under `key`
    previous_key: KbsResourceUri | None = None
    # a `container:` disk: leave its raw (ciphertext) node in the container's /dev (default: the
    # prestart hook removes it before pivot_root)
    keep_device: bool = False

    def applies_to(self, container: str) -> bool:
        """True when this volume is for `container` (an empty list means every container)."""
        return not self.containers or container in self.containers

    @property
    def via_securemount(self) -> bool:
        """`disk = "securemount"`: opened only by a SecureMount request naming its key."""
        return self.disk.kind == SECUREMOUNT_DISK


@dataclass(frozen=True)
class Contract:
    version: int
    kbs: KbsConfig
    api: ApiPolicy
    volumes: tuple[Volume, ...]

    def volume(self, name: str) -> Volume:
        for vol in self.volumes:
            if vol.name == name:
                return vol
        raise ContractError(f"volumes.{name}", "no such volume in the contract")


# ---------------------------------------------------------------------------------------------
# small value parsers (each raises ContractError naming `field`)

T = TypeVar("T")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _typed(field: str, value: object, kind: type[T], what: str) -> T:
    # bool is an int in Python; TOML keeps them apart, and so do we
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ContractError(field, f"must be {what}, got {type(value).__name__}")
    return value


def _table(field: str, value: object) -> Mapping[str, object]:
    return cast(Mapping[str, object], _typed(field, value, dict, "a table"))


def _check_keys(field: str, table: Mapping[str, object], allowed: tuple[str, ...]) -> None:
    for key in table:
        if key not in allowed:
            where = f"{field}.{key}" if field else key
            raise ContractError(where, f"unknown key (allowed here: {', '.join(allowed)})")


def _required(field: str, table: Mapping[str, object], key: str) -> object:
    if key not in table:
        raise ContractError(f"{field}.{key}" if field else key, "is required")
    return table[key]


def _name(field: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    text = _typed(field, value, str, "a string")
    if not pattern.fullmatch(text):
        raise ContractError(field, f"{_show(text)} must match {rule}")
    return text


def parse_kbs_uri(text: str, field: str = "key") -> KbsResourceUri:
    """Parse `kbs:///repo/type/tag` or `kbs+plugin:///repo/type/tag`; the host must be empty."""
    if not isinstance(text, str):
        raise ContractError(field, f"must be a string, got {type(text).__name__}")
    if not text.isascii() or any(ch.isspace() or ord(ch) < 0x20 for ch in text):
        raise ContractError(field, f"{_show(text)} must be printable ASCII without spaces")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ContractError(field, f"{_show(text)} must be a kbs:///repo/type/tag URI")
    plugin: str | None = None
    if scheme == "kbs":
        plugin = None
    elif scheme.startswith("kbs+") and PLUGIN_RE.fullmatch(scheme[4:]):
        plugin = None if scheme == "kbs+resource" else scheme[4:]  # the same plugin as plain kbs
    else:
        raise ContractError(field, f"{_show(text)}: scheme must be kbs or kbs+PLUGIN")
    if "?" in rest or "#" in rest or "%" in rest:
        raise ContractError(field, f"{_show(text)}: query, fragment and %-escapes are not allowed")
    host, slash, path = rest.partition("/")
    if host:
        raise ContractError(
            field, f"{_show(text)}: the host part must be empty (kbs:///...); the KBS is kbs.url"
        )
    segments = path.split("/") if slash else []
    if len(segments) != 3:
        raise ContractError(field, f"{_show(text)} must have exactly 3 segments repo/type/tag")
    for seg in segments:
        if not URI_SEGMENT_RE.fullmatch(seg) or seg in (".", ".."):
            raise ContractError(
                field,
                f"{_show(text)}: each segment must match [A-Za-z0-9_.-]{{1,128}}, not . or ..",
            )
    return KbsResourceUri(segments[0], segments[1], segments[2], plugin)


def parse_size(text: object, field: str = "size") -> int:
    """ "8G", "512M", "1T", "64MiB" -> bytes (binary units, as LVM reads them)."""
    value = _typed(field, text, str, 'a size string like "8G" or "512M"')
    match = SIZE_RE.fullmatch(value)
    if not match:
        raise ContractError(field, f"{_show(value)} must be a number with unit K, M, G, T or P")
    size = int(match.group(1)) * SIZE_UNITS[match.group(2)]
    if size < MIN_LV_BYTES:
        raise ContractError(field, f"{_show(value)} is below the minimum of 64M")
    if size > MAX_LV_BYTES:
        raise ContractError(field, f"{_show(value)} is above the maximum of 1024P")
    return size


def parse_disk(text: object, field: str = "disk") -> DiskRef:
    value = _typed(field, text, str, 'a string like "serial:NAME"')
    kind, sep, rest = value.partition(":")
    if not sep or kind not in DISK_KINDS:
        raise ContractError(
            field,
            f"{_show(value)} must be serial:ID, pci:DDDD:BB:SS.F, scsi:H:L or container:/dev/PATH",
        )
    if kind == "container":
        parts = rest.split("/")
        if CONTAINER_DEVICE_RE.fullmatch(rest) is None or "." in parts or ".." in parts:
            raise ContractError(
                field,
                f"{_show(value)}: container needs the devicePath of the container's spec, an"
                " absolute normalised path under /dev/ (the PVC's volumeDevices[].devicePath)",
            )
        return DiskRef("container", rest)
    patterns = {"serial": SERIAL_RE, "pci": PCI_RE, "scsi": SCSI_RE}
    rules = {
        "serial": "[A-Za-z0-9_.-]{1,20} (virtio serial)",
        "pci": "DDDD:BB:SS.F in lower-case hex",
        "scsi": "H:C:T:L or T:L in decimal",
    }
    if not patterns[kind].fullmatch(rest):
        raise ContractError(field, f"{_show(value)}: {kind} id must be {rules[kind]}")
    return DiskRef(cast(Literal["serial", "pci", "scsi"], kind), rest)


def parse_mount(text: object, field: str = "mount") -> str:
    """An absolute, normalised path inside the container, not onto / /proc /sys /dev."""
    value = _typed(field, text, str, "a string")
    if not value.startswith("/"):
        raise ContractError(field, f"{_show(value)} must be an absolute path")
    if len(value) > MAX_PATH:
        raise ContractError(field, f"must be at most {MAX_PATH} characters")
    if any(ord(ch) < 0x20 or ch in "\x7f\\" for ch in value):
        raise ContractError(field, f"{_show(value)} must not contain control characters or \\")
    parts = value.split("/")[1:]
    if value != "/" and (value.endswith("/") or "" in parts):
        raise ContractError(field, f"{_show(value)} must be normalised (no // and no trailing /)")
    if "." in parts or ".." in parts:
        raise ContractError(field, f"{_show(value)} must not contain . or .. components")
    if value == "/":
        raise ContractError(field, "must not be / (the container's root)")
    for forbidden in FORBIDDEN_MOUNTS:
        if value == forbidden or value.startswith(forbidden + "/"):
            raise ContractError(field, f"{_show(value)} must not be on or under {forbidden}")
    return value


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# sections


def _parse_kbs(value: object) -> KbsConfig:
    table = _table("kbs", value)
    _check_keys("kbs", table, ("url", "cert", "tee", "insecure_http"))
    url = _typed("kbs.url", _required("kbs", table, "url"), str, "a string")
    if not url.isascii() or any(ch.isspace() or ord(ch) < 0x20 for ch in url):
        raise ContractError("kbs.url", f"{_show(url)} must be printable ASCII without spaces")
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ContractError("kbs.url", f"{_show(url)} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ContractError("kbs.url", f"{_show(url)} must be http(s)://HOST[:PORT][/PATH]")
    if parts.query or parts.fragment or parts.username is not None:
        raise ContractError("kbs.url", f"{_show(url)} must not carry a query, fragment or user")
    cert_value = table.get("cert")
    cert: str | None = None
    if cert_value is not None:
        cert = _typed("kbs.cert", cert_value, str, "a PEM string")
        if PEM_CERT not in cert:
            raise ContractError("kbs.cert", f"must be a PEM certificate ({PEM_CERT} ...)")
        if parts.scheme != "https":
            raise ContractError("kbs.cert", "is a TLS trust anchor but kbs.url is not https")
    tee = _typed("kbs.tee", table.get("tee", "auto"), str, "a string")
    if tee not in TEES:
        raise ContractError("kbs.tee", f"{_show(tee)} must be one of {', '.join(TEES)}")
    insecure_http = _typed("kbs.insecure_http", table.get("insecure_http", False), bool, "a bool")
    plain_remote = parts.scheme == "http" and not _is_loopback(host)
    if plain_remote and tee == "sample":
        raise ContractError(
            "kbs.tee",
            '"sample" (no hardware evidence) is only allowed with https or a loopback kbs.url',
        )
    if plain_remote and not insecure_http:
        raise ContractError(
            "kbs.url",
            f"{_show(url)} is plain http to a non-loopback host; use https"
            " (or set kbs.insecure_http = true explicitly)",
        )
    return KbsConfig(url=url, cert=cert, tee=tee, insecure_http=insecure_http)


def _parse_api(value: object) -> ApiPolicy:
    table = _table("api", value)
    _check_keys("api", table, ("allow",))
    if "allow" not in table:
        return ApiPolicy()
    items = _typed("api.allow", table["allow"], list, "a list of RPC names")
    seen: set[str] = set()
    for i, item in enumerate(items):
        name = _typed(f"api.allow[{i}]", item, str, "a string")
        if name not in API_METHODS:
            raise ContractError(
                f"api.allow[{i}]", f"{_show(name)} must be one of {', '.join(sorted(API_METHODS))}"
            )
        if name in seen:
            raise ContractError(f"api.allow[{i}]", f"{_show(name)} is listed twice")
        seen.add(name)
    return ApiPolicy(allow=frozenset(seen))


def _parse_lvm(field: str, value: object) -> LvmSpec:
    table = _table(field, value)
    _check_keys(field, table, ("vg", "lv", "size"))
    names: dict[str, str] = {}
    for key in ("vg", "lv"):
        sub = f"{field}.{key}"
        name = _name(sub, _required(field, table, key), LVM_NAME_RE, "[a-z0-9][a-z0-9_-]{0,62}")
        if name.startswith(("snapshot", "pvmove")) or any(r in name for r in LVM_RESERVED):
            raise ContractError(sub, f"{_show(name)} uses a name LVM reserves")
        names[key] = name
    raw = _required(field, table, "size")
    try:
        size = None if raw == LVM_SIZE_MAX else parse_size(raw, f"{field}.size")
    except ContractError as exc:
        raise ContractError(exc.field, f'{exc.rule} (or "{LVM_SIZE_MAX}")') from None
    return LvmSpec(vg=names["vg"], lv=names["lv"], size_bytes=size)


VOLUME_KEYS = (
    "name", "key", "disk", "lvm", "filesystem", "mount", "containers", "create", "integrity",
    "read_only", "blank_check", "previous_key", "keep_device",
)  # fmt: skip


def _parse_volume(index: int, value: object) -> Volume:
    field = f"volumes[{index}]"
    table = _table(field, value)
    _check_keys(field, table, VOLUME_KEYS)
    name = _name(
        f"{field}.name", _required(field, table, "name"), VOLUME_NAME_RE, "[a-z0-9][a-z0-9-]{0,30}"
    )
    field = f"volumes[{index}]({name})"
    key = parse_kbs_uri(
        _typed(f"{field}.key", _required(field, table, "key"), str, "a string"), f"{field}.key"
    )
    previous_key = None
    if "previous_key" in table:
        previous_key = parse_kbs_uri(
            _typed(f"{field}.previous_key", table["previous_key"], str, "a string"),
            f"{field}.previous_key",
        )
        if previous_key == key:
            raise ContractError(
                f"{field}.previous_key", "must name another KBS resource than key (the old one)"
            )
    raw_disk = _required(field, table, "disk")
    if raw_disk == SECUREMOUNT_DISK:
        _check_securemount_volume(field, table)
        disk = DiskRef(SECUREMOUNT_DISK, "")
    else:
        disk = parse_disk(raw_disk, f"{field}.disk")
    lvm = _parse_lvm(f"{field}.lvm", table["lvm"]) if "lvm" in table else None
    filesystem = _typed(f"{field}.filesystem", table.get("filesystem", "ext4"), str, "a string")
    if filesystem not in FILESYSTEMS:
        raise ContractError(
            f"{field}.filesystem", f"{_show(filesystem)} must be one of {', '.join(FILESYSTEMS)}"
        )
    mount = (
        ""
        if disk.kind == SECUREMOUNT_DISK
        else parse_mount(_required(field, table, "mount"), f"{field}.mount")
    )
    raw_containers = _typed(
        f"{field}.containers", table.get("containers", []), list, "a list of container names"
    )
    if len(raw_containers) > MAX_CONTAINERS:
        raise ContractError(f"{field}.containers", f"at most {MAX_CONTAINERS} names")
    containers: list[str] = []
    for i, item in enumerate(raw_containers):
        sub = f"{field}.containers[{i}]"
        cname = _name(sub, item, CONTAINER_NAME_RE, "a DNS-1123 label (a-z0-9-, <= 63)")
        if cname in containers:
            raise ContractError(sub, f"{_show(cname)} is listed twice")
        containers.append(cname)
    flags: dict[str, bool] = {}
    for flag in ("create", "integrity", "read_only"):
        flags[flag] = _typed(f"{field}.{flag}", table.get(flag, False), bool, "a bool")
    keep_device = _typed(f"{field}.keep_device", table.get("keep_device", False), bool, "a bool")
    if disk.kind == "container" and len(containers) != 1:
        raise ContractError(
            f"{field}.containers",
            f"a {disk} disk is the device one container's spec lists: name exactly that"
            ' container (containers = ["NAME"])',
        )
    if keep_device and disk.kind != "container":
        raise ContractError(f"{field}.keep_device", "applies only to a container:/dev/... disk")
    blank_check = _typed(f"{field}.blank_check", table.get("blank_check", "full"), str, "a string")
    if blank_check not in BLANK_CHECKS:
        raise ContractError(
            f"{field}.blank_check", f"{_show(blank_check)} must be one of {', '.join(BLANK_CHECKS)}"
        )
    if (
        filesystem == "xfs"
        and lvm is not None
        and lvm.size_bytes is not None  # "max": mkfs.xfs itself refuses a too small VG
        and lvm.size_bytes - DATA_OFFSET_MIB * MIB < XFS_MIN_BYTES
    ):
        raise ContractError(
            f"{field}.lvm.size",
            f"xfs needs at least {XFS_MIN_BYTES // MIB} MiB of filesystem (mkfs.xfs refuses less);"
            f" the LV holds a {DATA_OFFSET_MIB} MiB LUKS header too: give it at least "
            f"{(XFS_MIN_BYTES // MIB) + DATA_OFFSET_MIB}M or use ext4",
        )
    return Volume(
        name=name,
        key=key,
        disk=disk,
        lvm=lvm,
        filesystem=cast(Literal["ext4", "xfs"], filesystem),
        mount=mount,
        containers=tuple(containers),
        create=flags["create"],
        integrity=flags["integrity"],
        read_only=flags["read_only"],
        blank_check=cast(Literal["full", "sampled"], blank_check),
        previous_key=previous_key,
        keep_device=keep_device,
    )


def _check_securemount_volume(field: str, table: Mapping[str, object]) -> None:
    """What a `disk = "securemount"` volume cannot have: the request names the disk and the mount
    point, and SecureMount cannot tell which container gets the mount."""
    if "mount" in table:
        raise ContractError(
            f"{field}.mount",
            'not used with disk = "securemount": the volume is mounted where the SecureMount'
            " request says (its mount_point, inside the image's allowed roots); remove it",
        )
    if "lvm" in table:
        raise ContractError(
            f"{field}.lvm",
            'not allowed with disk = "securemount": the contract cannot tie a VG to a disk it'
            " does not name; the volume is the whole disk the request names",
        )
    if table.get("containers", []):
        raise ContractError(
            f"{field}.containers",
            'must be empty with disk = "securemount": SecureMount cannot tell which container'
            " gets the mount",
        )


def _check_securemount_keys(volumes: tuple[Volume, ...]) -> None:
    """A securemount volume is found by its key alone: no other volume may have that key."""
    for i, vol in enumerate(volumes):
        if not vol.via_securemount:
            continue
        for other in volumes:
            if other is not vol and other.key == vol.key:
                raise ContractError(
                    f"volumes[{i}]({vol.name}).key",
                    f'{vol.key} is also the key of volume {other.name!r}; a disk = "securemount"'
                    " volume is matched by its key alone, so its key must be its own",
                )


def _overlap(a: Volume, b: Volume) -> bool:
    return not a.containers or not b.containers or bool(set(a.containers) & set(b.containers))


def _check_volume_set(volumes: tuple[Volume, ...]) -> None:
    """Rules between volumes: unique names, LVs, disks and mount targets."""
    names: set[str] = set()
    lvs: set[tuple[str, str]] = set()
    vg_of_disk: dict[DiskRef, str | None] = {}
    disk_of_vg: dict[str, DiskRef] = {}
    for i, vol in enumerate(volumes):
        field = f"volumes[{i}]({vol.name})"
        if vol.name in names:
            raise ContractError(f"{field}.name", f"{vol.name!r} is used by two volumes")
        names.add(vol.name)
        if vol.via_securemount:
            continue  # no disk, LVM or mount of its own in the contract (checked by key)
        vg = vol.lvm.vg if vol.lvm else None
        if vol.disk in vg_of_disk:
            other = vg_of_disk[vol.disk]
            if vg is None or other is None:
                raise ContractError(
                    f"{field}.disk", f"{vol.disk} is shared, but a whole-disk volume owns its disk"
                )
            if vg != other:
                raise ContractError(
                    f"{field}.lvm.vg", f"{vol.disk} already holds VG {other!r}; one VG per disk"
                )
        vg_of_disk[vol.disk] = vg
        if vol.lvm is not None:
            if disk_of_vg.setdefault(vol.lvm.vg, vol.disk) != vol.disk:
                raise ContractError(
                    f"{field}.lvm.vg", f"{vol.lvm.vg!r} is already on another disk; one disk per VG"
                )
            lv = (vol.lvm.vg, vol.lvm.lv)
            if lv in lvs:
                raise ContractError(f"{field}.lvm.lv", f"{vol.lvm.vg}/{vol.lvm.lv} is used twice")
            lvs.add(lv)
        for other_vol in volumes[:i]:
            if other_vol.mount == vol.mount and _overlap(vol, other_vol):
                raise ContractError(
                    f"{field}.mount",
                    f"{vol.mount!r} is also the mount of volume {other_vol.name!r}"
                    " for the same container",
                )


def plain_http_remote(url: str) -> bool:
    """Is `url` plain http to a host that is not loopback (reachable through the host)?"""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "http" and not _is_loopback(parts.hostname or "")


def _check_create_needs_authenticated_kbs(kbs: KbsConfig, volumes: tuple[Volume, ...]) -> None:
    """`create = true` only when the key's origin is authenticated. Over plain http the resource
    JWE is encrypted to cva's ephemeral key but not signed: a host in the middle can answer with
    a key of its own, and cva would format a blank disk under it. Opening stays allowed there: a
    wrong key cannot open an existing volume (its header and MAC refuse)."""
    if not plain_http_remote(kbs.url):
        return
    for i, vol in enumerate(volumes):
        if vol.create:
            raise ContractError(
                f"volumes[{i}]({vol.name}).create",
                "true needs an authenticated KBS, but kbs.url is plain http to a non-loopback"
                " host (insecure_http), where the host can hand cva its own key; use https, or"
                " create = false to open existing volumes only",
            )
        if vol.previous_key is not None:  # a rotation would move the volume to the host's key
            raise ContractError(
                f"volumes[{i}]({vol.name}).previous_key",
                "needs an authenticated KBS, but kbs.url is plain http to a non-loopback host"
                " (insecure_http), where the host can hand cva its own key and a rotation would"
                " move the volume to it; use https to rotate",
            )


def contract_from_mapping(doc: Mapping[str, object]) -> Contract:
    """Validate an already-parsed TOML table as a contract."""
    _check_keys("", doc, ("version", "kbs", "api", "volumes"))
    version = _typed("version", _required("", doc, "version"), int, "an integer")
    if version != CONTRACT_VERSION:
        raise ContractError("version", f"{version} is not supported (this cva reads version 1)")
    kbs = _parse_kbs(_required("", doc, "kbs"))
    api = _parse_api(doc["api"]) if "api" in doc else ApiPolicy()
    raw_volumes = _typed("volumes", doc.get("volumes", []), list, "an array of tables")
    if len(raw_volumes) > MAX_VOLUMES:
        raise ContractError("volumes", f"at most {MAX_VOLUMES} volumes")
    volumes = tuple(_parse_volume(i, v) for i, v in enumerate(raw_volumes))
    _check_volume_set(volumes)
    _check_securemount_keys(volumes)
    _check_create_needs_authenticated_kbs(kbs, volumes)
    return Contract(version=version, kbs=kbs, api=api, volumes=volumes)


def parse_contract(text: str) -> Contract:
    """Parse and validate the `cva.toml` text; raises ContractError naming the field and rule."""
    if not isinstance(text, str):
        raise ContractError("cva.toml", f"must be a string, got {type(text).__name__}")
    try:
        doc = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or int() refusing a 5000-digit number
        detail = str(exc).split("\n", 1)[0][:120]
        raise ContractError("cva.toml", f"is not valid TOML ({detail})") from None
    except RecursionError:
        raise ContractError("cva.toml", "is not valid TOML (nested too deeply)") from None
    return contract_from_mapping(doc)
