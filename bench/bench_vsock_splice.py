"""Latency the vsock splice adds to a unary gRPC call (`python -m bench.bench_vsock_splice`).

No vsock loopback exists on the build hosts, so the front door here is a unix listener driven by
the same `SpliceListener` code the AF_VSOCK socket uses; the difference to a direct call is the
splice's cost (two extra socket hops and one copy each way). Prints JSON.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from agent.rpc.vsock import SpliceListener

CALLS = 2000


async def _measure(address: str) -> list[float]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        req = health_pb2.HealthCheckRequest()
        for _ in range(100):  # warm-up
            await stub.Check(req)
        out = []
        for _ in range(CALLS):
            t = time.perf_counter()
            await stub.Check(req)
            out.append(time.perf_counter() - t)
        return out


async def main() -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        private, front = Path(tmp) / "grpc.sock", Path(tmp) / "front.sock"
        server = grpc.aio.server()
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        server.add_insecure_port(f"unix:{private}")
        await server.start()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(front))
        lsock.listen(16)
        lsock.setblocking(False)
        splice = SpliceListener(lsock, private)
        await splice.start()
        direct = await _measure(f"unix:{private}")
        spliced = await _measure(f"unix:{front}")
        await splice.close()
        await server.stop(0)
    med_d, med_s = statistics.median(direct), statistics.median(spliced)
    return {
        "calls": CALLS,
        "direct_median_ms": round(med_d * 1e3, 4),
        "spliced_median_ms": round(med_s * 1e3, 4),
        "added_median_ms": round((med_s - med_d) * 1e3, 4),
        "spliced_p99_ms": round(sorted(spliced)[int(CALLS * 0.99)] * 1e3, 4),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
