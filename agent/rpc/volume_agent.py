"""cva.v1.VolumeAgent request -> VolumeManager -> response, shared by the gRPC and ttRPC fronts.

Each front does its own transport (deadline, status encoding) and calls `check_allowed` (the
contract's `[api] allow` list, agent.policy) before it decodes the request, then one of `METHODS`.
`status_for` is the one refusal -> status mapping (the table in agent.rpc.grpc_service's
docstring); the ttRPC front answers with the same codes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from agent import policy
from agent._proto.cva.v1 import agent_pb2
from agent.errors import REFUSALS
from agent.keysource import is_transient
from agent.log import get_logger
from agent.volumes import (
    BoundVolume,
    ShuttingDown,
    VolumeManager,
    VolumeState,
    VolumeStatus,
)

log = get_logger("cva.volume_rpc")

_STATE = {
    VolumeState.ABSENT: agent_pb2.VOLUME_STATE_ABSENT,
    VolumeState.INITIALIZING: agent_pb2.VOLUME_STATE_INITIALIZING,
    VolumeState.READY: agent_pb2.VOLUME_STATE_READY,
    VolumeState.OPEN: agent_pb2.VOLUME_STATE_OPEN,
    VolumeState.MOUNTED: agent_pb2.VOLUME_STATE_MOUNTED,
    VolumeState.BOUND: agent_pb2.VOLUME_STATE_BOUND,
    VolumeState.CLOSED: agent_pb2.VOLUME_STATE_CLOSED,
    VolumeState.PROVING_BLANK: agent_pb2.VOLUME_STATE_PROVING_BLANK,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status a refusal maps to (see the module docstring)."""
    if isinstance(exc, policy.PolicyDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, policy.RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, policy.ContainerNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, ShuttingDown) or is_transient(exc):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, REFUSALS):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def bound_to_pb(b: BoundVolume) -> agent_pb2.BoundVolume:
    return agent_pb2.BoundVolume(
        name=b.name,
        state=_STATE[b.state],
        guest_path=str(b.guest_path),
        container_path=b.container_path,
        created=b.created,
        device=b.device,
        read_only=b.read_only,
    )


def status_to_pb(s: VolumeStatus) -> agent_pb2.VolumeStatus:
    return agent_pb2.VolumeStatus(
        name=s.name,
        state=_STATE[s.state],
        guest_path=str(s.guest_path) if s.guest_path else "",
        device=s.device or "",
        container_ids=list(s.container_ids),
        containers=list(s.containers),
        scan_what=s.scan.what if s.scan else "",
        scan_done=s.scan.done if s.scan else 0,
        scan_total=s.scan.total if s.scan else 0,
        scan_percent=s.scan.percent if s.scan else 0,
    )


def full_method(method: str) -> str:
    """`PrepareVolumes` -> `/cva.v1.VolumeAgent/PrepareVolumes` (gRPC's spelling)."""
    return f"/{policy.SERVICE}/{method}"


def check_allowed(manager: VolumeManager, method_path: str) -> None:
    """Raise policy.PolicyDenied unless the contract allows `/service/method`."""
    policy.check_rpc_allowed(method_path, manager.contract.api)


async def prepare_volumes(
    manager: VolumeManager, request: agent_pb2.PrepareVolumesRequest
) -> agent_pb2.PrepareVolumesResponse:
    cid = request.container_id
    bound = await manager.prepare(cid)
    log.info("volumes_prepared", container_id=cid, volumes=[b.name for b in bound])
    return agent_pb2.PrepareVolumesResponse(
        container_id=cid, volumes=[bound_to_pb(b) for b in bound]
    )


async def release_volumes(
    manager: VolumeManager, request: agent_pb2.ReleaseVolumesRequest
) -> agent_pb2.ReleaseVolumesResponse:
    cid = request.container_id
    rel = await manager.release(cid)
    log.info("volumes_released", container_id=cid, released=rel.released, closed=rel.closed)
    return agent_pb2.ReleaseVolumesResponse(
        container_id=cid, released=list(rel.released), closed=list(rel.closed)
    )


async def list_volumes(
    manager: VolumeManager, _request: agent_pb2.ListVolumesRequest
) -> agent_pb2.ListVolumesResponse:
    statuses = await manager.list()
    return agent_pb2.ListVolumesResponse(volumes=[status_to_pb(s) for s in statuses])


@dataclass(frozen=True)
class VolumeMethod:
    request_type: type[Message]
    call: Callable[[VolumeManager, Any], Awaitable[Message]]


METHODS: dict[str, VolumeMethod] = {
    "PrepareVolumes": VolumeMethod(agent_pb2.PrepareVolumesRequest, prepare_volumes),
    "ReleaseVolumes": VolumeMethod(agent_pb2.ReleaseVolumesRequest, release_volumes),
    "ListVolumes": VolumeMethod(agent_pb2.ListVolumesRequest, list_volumes),
}
