"""The ttRPC face of cva: cva.v1.VolumeAgent (same handlers and policy as gRPC,
agent.rpc.volume_agent) and, when the contract allows it, CDH's
`api.SecureMountService/SecureMount` (agent.securemount).

VolumeAgent calls are checked against the contract's `[api] allow` list before the payload is
decoded; a refused call gets PERMISSION_DENIED naming the rule. SecureMount is registered only
when `[api] allow` names `SecureMount` or `SecureMountEphemeral` (otherwise: UNIMPLEMENTED, as for
any unknown service). Status codes are the gRPC front's (agent.rpc.volume_agent.status_for), so a
client sees the same code over either protocol.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf.message import DecodeError, Message

from agent.errors import REFUSALS
from agent.log import get_logger
from agent.mountpoints import MountRules
from agent.rpc import volume_agent
from agent.rpc.ttrpc import CallContext, Code, RawHandler, RpcError, TtrpcServer
from agent.rpc.ttrpc import status_for as ttrpc_status_for
from agent.rpc.volume_agent import status_for as grpc_status_for
from agent.securemount.decisions import (
    DEFAULT_MOUNT_RULES,
    SecureMountBackend,
    SecureMountService,
    policy_from_allow,
)
from agent.volumes import VolumeManager

log = get_logger("cva.ttrpc_service")


def status_for(exc: BaseException) -> tuple[Code, str]:
    """A handler's exception as a ttRPC status: explicit rpc codes first, then gRPC's mapping."""
    if isinstance(exc, RpcError) or getattr(exc, "rpc_code", None) is not None:
        code, message = ttrpc_status_for(exc)
        log.info("ttrpc_refused", code=code.name, error=message)
        return code, message
    if isinstance(exc, REFUSALS):
        code = Code(grpc_status_for(exc).value[0])
        log.info("ttrpc_refused", code=code.name, error=exc.message)
        return code, exc.message
    if not isinstance(exc, TimeoutError):
        log.error("ttrpc_internal_error", error_type=type(exc).__name__)
    return ttrpc_status_for(exc)


def _volume_handler(manager: VolumeManager, method: str) -> RawHandler:
    spec = volume_agent.METHODS[method]
    method_path = volume_agent.full_method(method)

    async def handle(payload: bytes, ctx: CallContext) -> Message:
        volume_agent.check_allowed(manager, method_path)  # before the payload is decoded
        request = spec.request_type()
        try:
            request.ParseFromString(payload)
        except (DecodeError, ValueError, RecursionError) as exc:
            raise RpcError(
                Code.INVALID_ARGUMENT, f"ttrpc: {method_path} request payload does not decode"
            ) from exc
        return await spec.call(manager, request)

    return handle


def register_volume_agent(server: TtrpcServer, manager: VolumeManager) -> None:
    """Serve every cva.v1.VolumeAgent method (the allow list is checked per call)."""
    for method in volume_agent.METHODS:
        server.register(volume_agent.full_method(method), _volume_handler(manager, method))


def build_ttrpc_server(
    manager: VolumeManager,
    *,
    call_timeout: float,
    securemount_backend: SecureMountBackend | None,
    header_dir: Path,
    mount_rules: MountRules = DEFAULT_MOUNT_RULES,
) -> TtrpcServer:
    """A TtrpcServer with VolumeAgent and (when allowed and a backend is given) SecureMount."""
    server = TtrpcServer(max_timeout=call_timeout, error_status=status_for)
    register_volume_agent(server, manager)
    sm_policy = policy_from_allow(manager.contract.api.allow)
    if securemount_backend is not None and (sm_policy.persistent or sm_policy.ephemeral):
        SecureMountService(
            securemount_backend,
            manager.contract.volumes,
            policy=sm_policy,
            header_dir=header_dir,
            mount_rules=mount_rules,
        ).register(server)
    return server
