"""The CDH front: installed as the relay of the ttRPC server on kata-agent's CDH socket.

Limits (on top of the server's own: connections, calls in flight per connection, frame and
header timeouts):

- request size: cva's own methods keep the server's cap (`local_max_bytes`, whatever the server
  was built with); a forwarded request may be up to `FORWARD_MAX_BYTES` (2 MiB). Why larger: an
  `UnsealSecret` request carries a whole sealed secret (a JWS over the secret value; Kubernetes
  caps a Secret at 1 MiB, which base64 in the JWS makes about 1.4 MiB), and CDH, not cva, owns
  those calls. PullImage and GetResource requests are small; their answers (a resource, an
  unsealed secret) may be up to the ttRPC limit of 4 MiB, which kata-agent's client enforces.
  The server's frame cap is raised to `FORWARD_MAX_BYTES` only when an upstream is configured.
- calls in flight: at most `max_forwarded` forwarded calls at once over every connection
  (RESOURCE_EXHAUSTED beyond, answered at once); each has its own connection to CDH.
- deadline: the caller's `timeout_nano`, forwarded unchanged, and enforced here capped at
  `[cdh] timeout` (default 1800 s: kata-agent gives an image pull 1200 s); a call without one
  gets that cap. cva's own methods keep the server's `max_timeout` (`[timeouts] call`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent._proto.ttrpc import ttrpc_pb2
from agent.cdh import upstream as upstream_call
from agent.cdh.route import Route, route
from agent.log import get_logger
from agent.rpc.ttrpc import REQUEST_ENVELOPE_BYTES, CallContext, Code, RpcError, TtrpcServer

log = get_logger("cva.cdh")

FORWARD_MAX_BYTES = 2 << 20
DEFAULT_MAX_FORWARDED = 32
DEFAULT_FORWARD_TIMEOUT = 1800.0


@dataclass(frozen=True)
class FrontLimits:
    local_max_bytes: int  # cva's own methods
    forward_max_bytes: int = FORWARD_MAX_BYTES
    max_forwarded: int = DEFAULT_MAX_FORWARDED
    forward_timeout: float = DEFAULT_FORWARD_TIMEOUT


class CdhFront:
    """Routes each call (agent.cdh.route) and forwards what is CDH's to `upstream`."""

    def __init__(self, server: TtrpcServer, upstream: Path | None, limits: FrontLimits) -> None:
        self._server = server
        self._upstream = upstream
        self._limits = limits
        self._forwarding = 0

    @property
    def upstream(self) -> Path | None:
        return self._upstream

    async def relay(self, raw: bytes, request: ttrpc_pb2.Request, ctx: CallContext) -> bytes | None:
        decision = route(
            request.service,
            request.method,
            bytes(request.payload),
            served=self._server.methods,
            upstream=self._upstream is not None,
        )
        full = _clip(decision.full_method)
        if decision.route is Route.LOCAL:
            if len(raw) > self._limits.local_max_bytes:
                raise RpcError(
                    Code.RESOURCE_EXHAUSTED,
                    f"message length {len(raw)} exceed maximum message size of "
                    f"{self._limits.local_max_bytes}",
                )
            return None
        if decision.route is Route.UNKNOWN_CVA_METHOD:
            return None  # the server answers UNIMPLEMENTED as for any unknown method
        if decision.route is Route.SECURE_MOUNT_NOT_ALLOWED:
            raise RpcError(  # UNIMPLEMENTED: what it always answered when not allowed
                Code.UNIMPLEMENTED,
                "SecureMount refused (securemount-not-allowed): block-device SecureMount is"
                " cva's and the contract's [api] allow names neither SecureMount nor"
                " SecureMountEphemeral; it is never forwarded to CDH",
            )
        if decision.route is Route.NO_UPSTREAM or self._upstream is None:
            raise RpcError(
                Code.UNIMPLEMENTED,
                f"{full}: cva does not serve it and no CDH upstream is configured"
                " ([cdh] upstream in /etc/cva/config.toml)",
            )
        return await self._forward(raw, request, full)

    async def _forward(self, raw: bytes, request: ttrpc_pb2.Request, full: str) -> bytes:
        assert self._upstream is not None
        limits = self._limits
        if len(raw) > limits.forward_max_bytes:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                f"message length {len(raw)} exceed maximum message size of "
                f"{limits.forward_max_bytes}",
            )
        if request.timeout_nano < 0:
            raise RpcError(Code.DEADLINE_EXCEEDED, "deadline exceeded")
        timeout = limits.forward_timeout
        if request.timeout_nano > 0:
            timeout = min(timeout, request.timeout_nano / 1e9)
        if self._forwarding >= limits.max_forwarded:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                f"more than {limits.max_forwarded} calls in flight to the CDH upstream",
            )
        self._forwarding += 1
        try:
            answer = await upstream_call.forward(self._upstream, raw, timeout=timeout)
        except RpcError as exc:
            log.warning("cdh_forward_failed", method=full, code=exc.rpc_code.name)
            raise
        finally:
            self._forwarding -= 1
        log.info("cdh_forwarded", method=full, request_bytes=len(raw), answer_bytes=len(answer))
        return answer


def install_cdh_front(
    server: TtrpcServer,
    upstream: Path | None,
    *,
    forward_timeout: float = DEFAULT_FORWARD_TIMEOUT,
    max_forwarded: int = DEFAULT_MAX_FORWARDED,
) -> CdhFront:
    """Make `server` (with cva's own services registered) a front for CDH: its own methods keep
    its request cap, other calls go to `upstream` (see the module doc for the limits)."""
    limits = FrontLimits(
        local_max_bytes=server.max_message_bytes,
        max_forwarded=max_forwarded,
        forward_timeout=forward_timeout,
    )
    if upstream is not None:  # responses and frames: room for the forwarded cap
        server.max_message_bytes = max(
            server.max_message_bytes, limits.forward_max_bytes + REQUEST_ENVELOPE_BYTES
        )
    front = CdhFront(server, upstream, limits)
    # the server admits a forwarded call (a method no handler serves) up to the forward cap;
    # cva's own methods keep their registered caps
    server.set_relay(
        front.relay, max_request_bytes=limits.forward_max_bytes if upstream is not None else None
    )
    return front


def _clip(name: str, limit: int = 200) -> str:
    return name if len(name) <= limit else name[:limit] + "..."
