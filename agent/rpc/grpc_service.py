"""The gRPC face of cva: the VolumeAgent servicer, the policy interceptor, status mapping.

Every call goes: policy interceptor (the contract's `[api] allow` list, default deny, before the
request is even decoded) -> servicer -> VolumeManager, under a per-call deadline (the config's,
or the client's when shorter). Errors become a gRPC status with the error's one-line message:

INVALID_ARGUMENT   malformed request (container id)
NOT_FOUND          no guest-side bundle for that container id
PERMISSION_DENIED  RPC not allowed by the contract
FAILED_PRECONDITION the volume/header/bundle/KBS answer refuses what was asked
UNAVAILABLE        KBS unreachable, or cva shutting down (retry)
DEADLINE_EXCEEDED  the call's deadline passed (the storage work finishes in the background)
INTERNAL           a bug: the message names only the exception type
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AioHealthServicer

from agent import policy
from agent._proto.cva.v1 import agent_pb2, agent_pb2_grpc
from agent.errors import REFUSALS
from agent.log import get_logger
from agent.rpc import volume_agent
from agent.rpc.volume_agent import status_for
from agent.volumes import VolumeManager

T = TypeVar("T")
log = get_logger("cva.service")

MAX_RECEIVE_BYTES = 16 * 1024  # requests carry one container id
MAX_SEND_BYTES = 4 * 1024 * 1024
MAX_CONCURRENT_RPCS = 64
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
    ("grpc.max_metadata_size", 16 * 1024),
    ("grpc.max_concurrent_streams", 32),
    ("grpc.so_reuseport", 0),
)


class VolumeAgentService(agent_pb2_grpc.VolumeAgentServicer):
    def __init__(self, manager: VolumeManager, *, call_timeout: float) -> None:
        self._manager = manager
        self._call_timeout = call_timeout

    async def _call(
        self, name: str, context: grpc.aio.ServicerContext[Any, Any], work: Awaitable[T]
    ) -> T:
        remaining = context.time_remaining()
        timeout = self._call_timeout
        if remaining is not None and math.isfinite(remaining):
            timeout = min(timeout, max(remaining, 0.0))
        try:
            async with asyncio.timeout(timeout):
                return await work
        except TimeoutError:
            log.warning("rpc_deadline", rpc=name, seconds=round(timeout, 3))
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{name} did not finish within {timeout:g}s; the work continues, call again",
            )
        except REFUSALS as exc:
            code = status_for(exc)
            log.info("rpc_refused", rpc=name, code=code.name, error=exc.message)
            await context.abort(code, exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug: one line to the client, type to the log
            log.error(  # noqa: TRY400 - no traceback: locals may hold key material
                "rpc_internal_error", rpc=name, error_type=type(exc).__name__
            )
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the journal"
            )
        raise AssertionError("unreachable: context.abort raises")

    async def PrepareVolumes(
        self,
        request: agent_pb2.PrepareVolumesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_pb2.PrepareVolumesResponse:
        work = volume_agent.prepare_volumes(self._manager, request)
        return await self._call("PrepareVolumes", context, work)

    async def ReleaseVolumes(
        self,
        request: agent_pb2.ReleaseVolumesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_pb2.ReleaseVolumesResponse:
        work = volume_agent.release_volumes(self._manager, request)
        return await self._call("ReleaseVolumes", context, work)

    async def ListVolumes(
        self,
        request: agent_pb2.ListVolumesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_pb2.ListVolumesResponse:
        return await self._call(
            "ListVolumes", context, volume_agent.list_volumes(self._manager, request)
        )


def _denied_handler(message: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def deny(_request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    return grpc.unary_unary_rpc_method_handler(deny)


class PolicyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks every RPC against the contract's allow list before any handler or decoder runs."""

    def __init__(self, manager: VolumeManager) -> None:
        self._manager = manager

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        try:
            volume_agent.check_allowed(self._manager, method)
        except policy.PolicyDenied as exc:
            log.warning("rpc_denied", method=method[:120])
            return _denied_handler(exc.message)
        return await continuation(handler_call_details)


class AgentServer:
    """grpc.aio server with the VolumeAgent and Health services, policy and limits."""

    def __init__(self, manager: VolumeManager, *, call_timeout: float) -> None:
        self.manager = manager
        self.server = grpc.aio.server(
            interceptors=[PolicyInterceptor(manager)],
            options=SERVER_OPTIONS,
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        agent_pb2_grpc.add_VolumeAgentServicer_to_server(
            VolumeAgentService(manager, call_timeout=call_timeout), self.server
        )
        self.health = AioHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def add_address(self, address: str) -> int:
        """`unix:/path` or `127.0.0.1:PORT` (loopback TCP); returns the bound port (0 for unix)."""
        return self.server.add_insecure_port(address)

    async def start(self) -> None:
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(policy.SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """Stop taking RPCs; running ones get `grace` seconds, then are cancelled."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
