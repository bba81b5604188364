"""Host-facing policy: which RPCs the host may call, and which volumes a container gets.

Pure decisions (no I/O) except `read_container_name`, which reads the guest-side OCI bundle.
Order per request: the RPC against the contract's `[api] allow` list (default deny), then the
container id against kata's id rules, then the container name from the guest-side bundle (never
from the request), then the volumes the contract maps to that name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from agent.errors import CvaError, InputError

if TYPE_CHECKING:
    from agent.contract import ApiPolicy, Contract, Volume

SERVICE = "cva.v1.VolumeAgent"
HEALTH_SERVICE = "grpc.health.v1.Health"
VOLUME_RPCS = frozenset({"PrepareVolumes", "ReleaseVolumes", "ListVolumes"})
# Health reports only SERVING / NOT_SERVING and changes nothing: always callable, so the runtime
# and systemd can probe the agent whatever the contract allows.
HEALTH_RPCS = frozenset({"Check", "Watch"})

# kata's verify_id: ^[a-zA-Z0-9][a-zA-Z0-9_.-]+$ (cva: ASCII only, and it must fit one path
# component because it names /run/kata-containers/<cid>)
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{1,254}")
# Kubernetes container names are DNS-1123 labels
_CONTAINER_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
NAME_ANNOTATION = "io.kubernetes.cri.container-name"
MAX_OCI_CONFIG_BYTES = 4 * 1024 * 1024


class RequestError(InputError):
    """The host's request is malformed (gRPC INVALID_ARGUMENT)."""


class PolicyDenied(CvaError):
    """The contract does not allow this RPC (gRPC PERMISSION_DENIED)."""


class ContainerNotFound(CvaError):
    """No guest-side bundle for the container id (gRPC NOT_FOUND)."""


class BundleError(CvaError):
    """The guest-side bundle exists but cannot be used (gRPC FAILED_PRECONDITION)."""


class RpcName(NamedTuple):  # a NamedTuple: the prestart hook imports this module, keep it light
    service: str
    method: str


def split_method(full_method: str) -> RpcName | None:
    """`/pkg.Service/Method` -> RpcName; anything else -> None."""
    parts = full_method.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
        return None
    return RpcName(parts[1], parts[2])


def check_rpc_allowed(full_method: str, api: ApiPolicy) -> None:
    """Raise PolicyDenied unless the contract's allow list (or the health exemption) admits it."""
    rpc = split_method(full_method)
    if rpc is not None:
        if rpc.service == HEALTH_SERVICE and rpc.method in HEALTH_RPCS:
            return
        if rpc.service == SERVICE and rpc.method in VOLUME_RPCS and rpc.method in api.allow:
            return
    shown = full_method[:120].encode("ascii", "replace").decode()
    raise PolicyDenied(f"RPC {shown} is not allowed by the contract's [api] allow list")


def validate_container_id(cid: str) -> str:
    """Kata's container id rules; raises RequestError naming the rule."""
    if not cid:
        raise RequestError("container_id is empty; pass the kata container id")
    if _CONTAINER_ID.fullmatch(cid) is None:
        raise RequestError(
            "container_id must match [A-Za-z0-9][A-Za-z0-9_.-]+ and be at most 255 characters"
        )
    return cid


def oci_config_json(config: bytes, error: type[CvaError]) -> object:
    """The decoded JSON of an OCI runtime config (hostile bytes: size-capped); raises `error`
    when it is too large or not JSON."""
    if len(config) > MAX_OCI_CONFIG_BYTES:
        raise error(f"OCI config.json is larger than {MAX_OCI_CONFIG_BYTES} bytes")
    try:
        return json.loads(config)
    except (ValueError, RecursionError):
        raise error("OCI config.json is not valid JSON") from None


def container_name_from_oci(config: bytes) -> str:
    """The CRI container name annotation of an OCI runtime config (hostile bytes)."""
    doc = oci_config_json(config, BundleError)
    annotations = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(annotations, dict):
        raise BundleError("OCI config.json has no annotations object")
    name = annotations.get(NAME_ANNOTATION)
    if not isinstance(name, str):
        raise BundleError(f"OCI config.json has no {NAME_ANNOTATION} annotation")
    if _CONTAINER_NAME.fullmatch(name) is None:
        raise BundleError(f"{NAME_ANNOTATION} is not a valid container name (DNS-1123 label)")
    return name


def bundle_dir(rootfs_base: Path, cid: str) -> Path:
    return rootfs_base / validate_container_id(cid)


def read_container_name(rootfs_base: Path, cid: str) -> str:
    """Read `<rootfs_base>/<cid>/config.json` (no symlinks followed) and return the name."""
    return container_name_from_oci(read_bundle_config(rootfs_base, cid))


def read_bundle_config(rootfs_base: Path, cid: str) -> bytes:
    """The bytes of `<rootfs_base>/<cid>/config.json` (no symlinks followed, size-capped)."""
    path = bundle_dir(rootfs_base, cid) / "config.json"
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ContainerNotFound(
            f"no container {cid} in {rootfs_base} (call after the container is created)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleError(f"{path} is a symlink; refusing it") from None
        raise BundleError(f"cannot read {path} ({exc.strerror})") from None
    try:
        if not _is_regular(fd):
            raise BundleError(f"{path} is not a regular file")
        data = os.read(fd, MAX_OCI_CONFIG_BYTES + 1)
        chunks = [data]
        while data and sum(map(len, chunks)) <= MAX_OCI_CONFIG_BYTES:
            data = os.read(fd, MAX_OCI_CONFIG_BYTES + 1)
            chunks.append(data)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_OCI_CONFIG_BYTES:
        raise BundleError(f"OCI config.json is larger than {MAX_OCI_CONFIG_BYTES} bytes")
    return data


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def volumes_for_container(contract: Contract, container_name: str) -> tuple[Volume, ...]:
    """The contract's volumes mapped to this container name (`containers = []` means all); a
    `disk = "securemount"` volume is never one of them (only a SecureMount request opens it)."""
    return tuple(
        v
        for v in contract.volumes
        if not v.via_securemount and (not v.containers or container_name in v.containers)
    )
