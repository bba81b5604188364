"""Transport latency (host): the vsock splice's added cost and the ttRPC server's round trip.

Wraps the daemon stream's `bench/bench_vsock_splice.py` (gRPC Health/Check through cva's
SpliceListener vs direct on the private socket) and the ttrpc stream's `bench/bench_ttrpc.py`
(Echo over cva's ttRPC server, compared with the direct gRPC unary call of the same run).
Informational: the issue sets no target on these.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

from bench.results import Result, measured, not_measured

GROUP = "6. Transport latency (host)"


def _vsock() -> tuple[list[Result], float | None]:
    try:
        mod: Any = importlib.import_module("bench.bench_vsock_splice")
    except ImportError as exc:
        reason = f"bench/bench_vsock_splice.py (daemon stream) not in this tree ({exc.name})"
        return [not_measured("gRPC unary via vsock splice: median", reason, group=GROUP)], None
    doc = asyncio.run(mod.main())
    direct = float(doc["direct_median_ms"])
    return [
        measured(
            "gRPC unary via vsock splice: median",
            "ms",
            float(doc["spliced_median_ms"]),
            baseline_name="direct on the private socket",
            baseline=direct,
            note=f"{doc['calls']} calls; splice front on a unix socket (no vsock loopback here); "
            f"p99 {float(doc['spliced_p99_ms']):.3f} ms",
            group=GROUP,
        )
    ], direct


def _ttrpc(grpc_direct_ms: float | None) -> list[Result]:
    try:
        mod: Any = importlib.import_module("bench.bench_ttrpc")
    except ImportError as exc:
        reason = f"bench/bench_ttrpc.py not in this tree ({exc.name})"
        return [not_measured("ttRPC round trip: median", reason, group=GROUP)]
    doc = asyncio.run(mod.main())
    return [
        measured(
            "ttRPC round trip: median",
            "ms",
            float(doc["latency_p50_us"]) / 1000,
            baseline_name=None if grpc_direct_ms is None else "gRPC unary, same socket kind",
            baseline=grpc_direct_ms,
            note=f"{doc['calls']} calls, one in flight; p99 "
            f"{float(doc['latency_p99_us']) / 1000:.3f} ms",
            group=GROUP,
        ),
        measured(
            "ttRPC pipelined throughput",
            "calls/s",
            float(doc["pipelined_calls_per_s"]),
            note="32 calls in flight on one connection",
            group=GROUP,
        ),
    ]


def planned(reason: str) -> list[Result]:
    return [
        not_measured("gRPC unary via vsock splice: median", reason, unit="ms", group=GROUP),
        not_measured("ttRPC round trip: median", reason, unit="ms", group=GROUP),
    ]


def collect() -> list[Result]:
    vsock, direct = _vsock()
    return vsock + _ttrpc(direct)
