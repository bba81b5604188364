"""A small gRPC client for the VolumeAgent API (`cva prepare|release|list`, tests, the demo).

Addresses are grpc target strings: `unix:/run/cva/grpc.sock` (the default, inside the guest),
`unix-abstract:NAME`, or `127.0.0.1:PORT` (a loopback TCP listener or a forwarded port).
Failures become one-line CvaErrors naming the gRPC status and the server's message.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from agent._proto.cva.v1 import agent_pb2, agent_pb2_grpc
from agent.errors import CvaError

DEFAULT_ADDRESS = "unix:/run/cva/grpc.sock"
DEFAULT_TIMEOUT = 300.0


class RpcFailed(CvaError):
    """The server answered with a non-OK status."""

    def __init__(self, rpc: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{rpc}: {code.name}: {details}")
        self.code = code
        self.details = details


def to_json_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )


class AgentClient:
    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = agent_pb2_grpc.VolumeAgentStub(self._channel)
        self._address = address
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, name: str, fn: Any, request: Message) -> Any:
        try:
            return fn(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = (exc.details() if hasattr(exc, "details") else None) or "no details"
            if code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
                details = f"cannot reach cva at {self._address} ({details.splitlines()[0][:200]})"
            raise RpcFailed(name, code, " ".join(details.split())) from None

    def prepare(self, container_id: str) -> agent_pb2.PrepareVolumesResponse:
        req = agent_pb2.PrepareVolumesRequest(container_id=container_id)
        resp: agent_pb2.PrepareVolumesResponse = self._call(
            "PrepareVolumes", self._stub.PrepareVolumes, req
        )
        return resp

    def release(self, container_id: str) -> agent_pb2.ReleaseVolumesResponse:
        req = agent_pb2.ReleaseVolumesRequest(container_id=container_id)
        resp: agent_pb2.ReleaseVolumesResponse = self._call(
            "ReleaseVolumes", self._stub.ReleaseVolumes, req
        )
        return resp

    def list(self) -> agent_pb2.ListVolumesResponse:
        resp: agent_pb2.ListVolumesResponse = self._call(
            "ListVolumes", self._stub.ListVolumes, agent_pb2.ListVolumesRequest()
        )
        return resp
