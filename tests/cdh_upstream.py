"""A stand-in for the real CDH behind cva's front: a unix-socket ttRPC peer that records every
frame it receives, byte for byte, and answers each method with a scripted raw
`ttrpc.Response` (also byte for byte), so tests can check that cva forwards requests and relays
answers unchanged. Run as a module it serves until killed (for guest and daemon tests):
`python -m tests.cdh_upstream SOCKET RECORD_DIR`."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from agent._proto.ttrpc import ttrpc_pb2
from agent.rpc.ttrpc import HEADER_LENGTH, MessageType, encode_frame, parse_header


def response(payload: bytes = b"", *, code: int = 0, message: str = "") -> bytes:
    """A serialized ttrpc.Response (status only when code != 0)."""
    resp = ttrpc_pb2.Response(payload=payload)
    if code:
        resp.status.code = code
        resp.status.message = message
    return resp.SerializeToString()


@dataclass(frozen=True)
class Received:
    stream_id: int
    frame_payload: bytes  # the serialized ttrpc.Request as it arrived

    @property
    def request(self) -> ttrpc_pb2.Request:
        return ttrpc_pb2.Request.FromString(self.frame_payload)


@dataclass
class StandInCdh:
    """answers: "service/method" -> raw Response bytes; unknown methods get UNIMPLEMENTED.
    hold: methods whose answer waits until `release` is set."""

    answers: dict[str, bytes] = field(default_factory=dict)
    hold: frozenset[str] = frozenset()
    received: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Event = field(default_factory=asyncio.Event)
    record_dir: Path | None = None
    _server: asyncio.Server | None = None

    async def start(self, path: Path) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = parse_header(await reader.readexactly(HEADER_LENGTH))
                payload = await reader.readexactly(header.length)
                got = Received(header.stream_id, payload)
                self.received.append(got)
                if self.record_dir is not None:
                    n = len(self.received)
                    (self.record_dir / f"request-{n:03d}.bin").write_bytes(payload)
                req = got.request
                full = f"{req.service}/{req.method}"
                if full in self.hold:
                    self.held.set()
                    await self.release.wait()
                answer = self.answers.get(full) or response(code=12, message=f"method {full}")
                writer.write(encode_frame(header.stream_id, MessageType.RESPONSE, answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _main(path: Path, record: Path) -> None:
    record.mkdir(parents=True, exist_ok=True)
    answers = {}
    for item in record.glob("answer-*.bin"):  # answer-<service>-<method>.bin
        _, service, method = item.stem.split("-", 2)
        answers[f"{service}/{method}"] = item.read_bytes()
    cdh = StandInCdh(answers=answers, record_dir=record)
    await cdh.start(path)
    (record / "ready").write_text("1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(Path(sys.argv[1]), Path(sys.argv[2])))
