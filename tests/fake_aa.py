"""A fake Attestation Agent: a raw ttRPC server on a unix socket (its own framing code, not
cva's), answering `attestation_agent.AttestationAgentService/ExtendRuntimeMeasurement`.

It records each request's payload bytes exactly as received; tests decode them with a protobuf
descriptor built from the upstream field numbers (`upstream_classes`), never with cva's code.
Modes: "ok", "not-enabled", "not-supported", "status" (a ttRPC error status), "silent" (reads
the request, never answers), "close" (closes without answering).
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_HEADER = struct.Struct(">IIBB")


def upstream_classes() -> tuple[Any, Any, Any, Any]:
    """(ExtendRuntimeMeasurementRequest, ...Response, ttrpc Request, ttrpc Response) built from
    the upstream field numbers (GC attestation-agent.proto; containerd ttrpc request.proto)."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="fake-aa.proto", package="attestation_agent", syntax="proto3"
    )
    req = fdp.message_type.add(name="ExtendRuntimeMeasurementRequest")
    for name, number in (("Domain", 1), ("Operation", 2), ("Content", 3)):
        req.field.add(name=name, number=number, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    req.oneof_decl.add(name="_RegisterIndex")
    req.field.add(
        name="RegisterIndex",
        number=4,
        type=_F.TYPE_UINT64,
        label=_F.LABEL_OPTIONAL,
        proto3_optional=True,
        oneof_index=0,
    )
    enum = fdp.enum_type.add(name="RuntimeMeasurementResult")
    for name, number in (("OK", 0), ("NOT_SUPPORTED", 1), ("NOT_ENABLED", 2)):
        enum.value.add(name=name, number=number)
    resp = fdp.message_type.add(name="ExtendRuntimeMeasurementResponse")
    resp.field.add(
        name="Result",
        number=1,
        type=_F.TYPE_ENUM,
        type_name=".attestation_agent.RuntimeMeasurementResult",
        label=_F.LABEL_OPTIONAL,
    )
    tt = descriptor_pb2.FileDescriptorProto(
        name="fake-ttrpc.proto", package="faketrpc", syntax="proto3"
    )
    treq = tt.message_type.add(name="Request")
    treq.field.add(name="service", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    treq.field.add(name="method", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    treq.field.add(name="payload", number=3, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
    treq.field.add(name="timeout_nano", number=4, type=_F.TYPE_INT64, label=_F.LABEL_OPTIONAL)
    status = tt.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=_F.TYPE_INT32, label=_F.LABEL_OPTIONAL)
    status.field.add(name="message", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    tresp = tt.message_type.add(name="Response")
    tresp.field.add(
        name="status",
        number=1,
        type=_F.TYPE_MESSAGE,
        type_name=".faketrpc.Status",
        label=_F.LABEL_OPTIONAL,
    )
    tresp.field.add(name="payload", number=2, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    pool.Add(tt)
    get = message_factory.GetMessageClass
    return (
        get(pool.FindMessageTypeByName("attestation_agent.ExtendRuntimeMeasurementRequest")),
        get(pool.FindMessageTypeByName("attestation_agent.ExtendRuntimeMeasurementResponse")),
        get(pool.FindMessageTypeByName("faketrpc.Request")),
        get(pool.FindMessageTypeByName("faketrpc.Response")),
    )


class FakeAA:
    def __init__(self, path: Path, mode: str = "ok") -> None:
        self.path = path
        self.mode = mode
        self.calls: list[tuple[str, str, bytes]] = []  # (service, method, payload bytes)
        self._classes = upstream_classes()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self.path.unlink(missing_ok=True)

    def _recv(self, conn: socket.socket, size: int) -> bytes:
        out = b""
        while len(out) < size:
            chunk = conn.recv(size - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def _serve(self) -> None:
        _req_cls, resp_cls, treq_cls, tresp_cls = self._classes
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    length, stream, _mtype, _flags = _HEADER.unpack(self._recv(conn, 10))
                    body = self._recv(conn, length)
                except (EOFError, OSError):
                    continue
                treq = treq_cls.FromString(body)
                self.calls.append((treq.service, treq.method, bytes(treq.payload)))
                if self.mode == "silent":
                    self._stop.wait(15)
                    continue
                if self.mode == "close":
                    continue
                tresp = tresp_cls()
                if self.mode == "status":
                    tresp.status.code = 12
                    tresp.status.message = "method ExtendRuntimeMeasurement\nnot here"
                else:
                    result = {"ok": 0, "not-supported": 1, "not-enabled": 2}[self.mode]
                    tresp.payload = resp_cls(Result=result).SerializeToString()
                out = tresp.SerializeToString()
                conn.sendall(_HEADER.pack(len(out), stream, 2, 0) + out)

    def decoded(self) -> list[Any]:
        """The requests, decoded with the upstream descriptor."""
        req_cls = self._classes[0]
        return [req_cls.FromString(payload) for _s, _m, payload in self.calls]
