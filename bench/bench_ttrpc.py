"""Round-trip latency of cva's ttRPC server over a unix socket (`python -m bench.bench_ttrpc`).

A raw Python client sends one Echo call at a time (latency), then keeps 32 calls in flight on one
connection (throughput). Prints JSON.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from agent._proto.ttrpc import ttrpc_pb2
from agent.rpc.ttrpc import CallContext, MessageType, TtrpcServer, encode_frame, parse_header

CALLS = 5000
INFLIGHT = 32


async def _echo(payload: bytes, ctx: CallContext) -> bytes:
    return payload


def _request(stream_id: int) -> bytes:
    req = ttrpc_pb2.Request(service="bench.Echo", method="Echo", payload=b"x" * 64)
    return encode_frame(stream_id, MessageType.REQUEST, req.SerializeToString())


async def _read(reader: asyncio.StreamReader) -> int:
    header = parse_header(await reader.readexactly(10))
    await reader.readexactly(header.length)
    return header.stream_id


async def main() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.sock"
        server = TtrpcServer()
        server.register("bench.Echo/Echo", _echo)
        await server.listen_unix(path)
        reader, writer = await asyncio.open_unix_connection(str(path))
        latencies = []
        sid = 1
        for _ in range(CALLS):
            t = time.perf_counter()
            writer.write(_request(sid))
            await _read(reader)
            latencies.append(time.perf_counter() - t)
            sid += 2
        t = time.perf_counter()
        for _ in range(INFLIGHT):
            writer.write(_request(sid))
            sid += 2
        for _ in range(CALLS - INFLIGHT):
            await _read(reader)
            writer.write(_request(sid))
            sid += 2
        for _ in range(INFLIGHT):
            await _read(reader)
        elapsed = time.perf_counter() - t
        writer.close()
        await server.close()
    latencies.sort()
    return {
        "calls": CALLS,
        "latency_p50_us": statistics.median(latencies) * 1e6,
        "latency_p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "pipelined_calls_per_s": CALLS / elapsed,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
