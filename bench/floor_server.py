"""The floor for a Python gRPC daemon: a bare grpc.aio server with cva's serving imports.

`python -m bench.floor_server SOCKET` imports what `cva serve` needs to serve its API (grpc,
grpc.aio, the generated VolumeAgent protos, grpc_health, structlog), registers the health
service, listens on a unix socket, sends READY=1 to $NOTIFY_SOCKET by hand and waits for
SIGTERM. No trust establishment, no contract, no storage code: what is left when cva's own work
is taken away. `bench.footprint` compares `cva serve` against it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import grpc
import structlog
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from agent._proto.cva.v1 import agent_pb2, agent_pb2_grpc  # noqa: F401 - the same protos

FLOOR_IMPORTS = (
    "grpc",
    "grpc.aio",
    "grpc_health.v1",
    "structlog",
    "agent._proto.cva.v1.agent_pb2",
    "agent._proto.cva.v1.agent_pb2_grpc",
)


def notify(message: str) -> None:
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


async def serve(path: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    structlog.get_logger("floor").debug("ready")
    notify("READY=1")
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
