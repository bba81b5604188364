"""CI fails when the committed generated code no longer matches protos/ (run `make proto`)."""

from __future__ import annotations

from tests.tools import gen_proto


def test_committed_generated_code_is_fresh() -> None:
    assert gen_proto.stale_files() == [], "stale generated code: run `make proto` and commit"


def test_generated_modules_import_from_their_real_package() -> None:
    from agent._proto.cva.v1 import agent_pb2, agent_pb2_grpc

    assert agent_pb2.DESCRIPTOR.package == "cva.v1"
    assert agent_pb2_grpc.VolumeAgentServicer is not None
    text = (gen_proto.OUT_DIR / "cva" / "v1" / "agent_pb2_grpc.py").read_text()
    assert "from cva.v1 import" not in text
