"""The committed ttRPC / CDH protobuf code is fresh and keeps containerd's and CDH's wire shape."""

from __future__ import annotations

from agent._proto.cdh import api_pb2
from agent._proto.ttrpc import ttrpc_pb2
from tests.tools import gen_proto


def test_generated_code_is_fresh() -> None:
    stale = [p for p in gen_proto.stale_files() if p.startswith(("ttrpc/", "cdh/"))]
    assert stale == [], "stale generated code: run `make proto` and commit"


def test_request_field_numbers_match_containerd() -> None:
    # service=1, method=2 (strings), payload=3 (bytes), timeout_nano=4 (varint), metadata=5
    wire = (
        b"\x0a\x03a.B"
        + b"\x12\x01C"
        + b"\x1a\x02\x01\x02"
        + b"\x20\x80\x94\xeb\xdc\x03"
        + b"\x2a\x06\x0a\x01k\x12\x01v"
    )
    req = ttrpc_pb2.Request.FromString(wire)
    assert (req.service, req.method, req.payload, req.timeout_nano) == (
        "a.B",
        "C",
        b"\x01\x02",
        10**9,
    )
    assert [(kv.key, kv.value) for kv in req.metadata] == [("k", "v")]
    assert req.SerializeToString() == wire


def test_response_status_is_google_rpc_status_shaped() -> None:
    resp = ttrpc_pb2.Response(payload=b"p")
    resp.status.code = 12
    resp.status.message = "method X"
    assert resp.SerializeToString() == b"\x0a\x0c\x08\x0c\x12\x08method X\x12\x01p"


def test_cdh_names_match_what_kata_agent_calls() -> None:
    service = api_pb2.DESCRIPTOR.services_by_name["SecureMountService"]
    assert service.full_name == "api.SecureMountService"
    assert [m.name for m in service.methods] == ["SecureMount"]
    fields = {f.name: f.number for f in api_pb2.SecureMountRequest.DESCRIPTOR.fields}
    assert fields == {"volume_type": 1, "options": 2, "flags": 3, "mount_point": 4}
    # CDH's response is empty: cva's mount_path is an addition its clients skip
    assert api_pb2.SecureMountResponse.FromString(b"") == api_pb2.SecureMountResponse()
