"""Which ttRPC calls on the CDH socket cva answers itself and which go to the real CDH (pure).

The rules, in order (`route`):

1. `cva.*` services are cva's own: never forwarded (an unknown one is UNIMPLEMENTED here).
2. `api.SecureMountService/SecureMount` with `volume_type = "block-device"` (or a payload that
   does not decode) is always cva's: served when the contract allows SecureMount, otherwise
   refused here -- never forwarded, so the real CDH never formats or opens a block device
   behind cva's back. Other volume types are CDH's (forwarded; without an upstream, cva's
   SecureMount refuses them as it always did).
3. A method cva serves (registered on the server) is dispatched here, with cva's own request
   size cap (`local_max_bytes`); whatever cva refuses is refused here, never forwarded.
4. Anything else is forwarded unchanged when an upstream is configured; without one it is
   UNIMPLEMENTED, naming the missing `[cdh] upstream`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from agent._proto.cdh import api_pb2
from agent.securemount.decisions import SECURE_MOUNT_METHOD, VOLUME_TYPE_BLOCK_DEVICE

CVA_SERVICE_PREFIX = "cva."


class Route(enum.Enum):
    LOCAL = "local"  # dispatch to cva's handler
    FORWARD = "forward"  # to the real CDH, unchanged
    NO_UPSTREAM = "no-upstream"  # would be forwarded, but no upstream is configured
    SECURE_MOUNT_NOT_ALLOWED = "securemount-not-allowed"  # block-device, contract says no
    UNKNOWN_CVA_METHOD = "unknown-cva-method"  # cva.* but not served


@dataclass(frozen=True)
class Decision:
    route: Route
    full_method: str


def is_block_device_secure_mount(payload: bytes) -> bool:
    """True unless the SecureMount payload decodes and names another volume type: a request
    that does not decode is treated as a block device (cva's, refused by its parser)."""
    try:
        request = api_pb2.SecureMountRequest.FromString(payload)
    except (DecodeError, ValueError, RecursionError):
        return True
    return request.volume_type == VOLUME_TYPE_BLOCK_DEVICE


def route(
    service: str, method: str, payload: bytes, *, served: frozenset[str], upstream: bool
) -> Decision:
    """Where the call `service/method` with this inner payload goes (see the module doc)."""
    full = f"{service}/{method}"
    if service.startswith(CVA_SERVICE_PREFIX):
        return Decision(Route.LOCAL if full in served else Route.UNKNOWN_CVA_METHOD, full)
    if full == SECURE_MOUNT_METHOD and is_block_device_secure_mount(payload):
        return Decision(Route.LOCAL if full in served else Route.SECURE_MOUNT_NOT_ALLOWED, full)
    if upstream:
        # another SecureMount volume type is CDH's, even when cva serves block devices
        local = full in served and full != SECURE_MOUNT_METHOD
        return Decision(Route.LOCAL if local else Route.FORWARD, full)
    return Decision(Route.LOCAL if full in served else Route.NO_UPSTREAM, full)
