"""Benchmark (not a test): one shared KBS session vs a naive attest-per-key client.

Fetches 1, 8 and 64 resources from the loopback KBS, serially and concurrently, with
`agent.kbs.client.KbsClient` (one RCAR handshake, then one GET per key, single flight) and with a
naive client that runs a full handshake for every key (a fresh KbsClient per resource, as a tool
that does not keep sessions would). Prints request counts, wall time and the naive/shared ratios.

    python bench/kbs_bench.py [--tee-key ECDH-ES+A256KW-P256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog

from agent.kbs.client import KbsClient
from tests.kbs.fixtures import kbs_uri, sample_attester
from tests.kbs.server import LoopbackKbs

SIZES = (1, 8, 64)


async def shared(url: str, uris: list[str], concurrent: bool, alg: str) -> None:
    async with KbsClient(url, attester=sample_attester(), key_algorithm=alg) as c:
        if concurrent:
            for s in await asyncio.gather(*(c.get_resource(kbs_uri(u)) for u in uris)):
                s.wipe()
        else:
            for u in uris:
                (await c.get_resource(kbs_uri(u))).wipe()


async def naive_one(url: str, uri: str, alg: str) -> None:
    async with KbsClient(url, attester=sample_attester(), key_algorithm=alg) as c:
        (await c.get_resource(kbs_uri(uri))).wipe()


async def naive(url: str, uris: list[str], concurrent: bool, alg: str) -> None:
    if concurrent:
        await asyncio.gather(*(naive_one(url, u, alg) for u in uris))
    else:
        for u in uris:
            await naive_one(url, u, alg)


def measure(kbs: LoopbackKbs, fn, uris: list[str], concurrent: bool, alg: str, repeat: int):  # type: ignore[no-untyped-def]
    times, counts = [], []
    for _ in range(repeat):
        kbs.reset_log()
        t0 = time.perf_counter()
        asyncio.run(fn(kbs.url, uris, concurrent, alg))
        times.append(time.perf_counter() - t0)
        counts.append(len(kbs.requests))
    return statistics.median(times), max(counts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tee-key", default="ECDH-ES+A256KW-P256")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))
    uris = [f"kbs:///bench/key/k{i}" for i in range(max(SIZES))]
    with LoopbackKbs({u: bytes([i % 256]) * 32 for i, u in enumerate(uris)}) as kbs:
        measure(kbs, shared, uris[:8], True, args.tee_key, 1)  # warm-up (imports, key paths)
        print(f"loopback KBS {kbs.url}, key {args.tee_key}, median of {args.repeat}")
        print(
            f"{'N':>3} {'mode':<10} {'shared req':>10} {'shared ms':>10} "
            f"{'naive req':>10} {'naive ms':>10} {'req ratio':>9} {'time ratio':>10}"
        )
        for n in SIZES:
            for concurrent in (False, True):
                mode = "concurrent" if concurrent else "serial"
                st, sc = measure(kbs, shared, uris[:n], concurrent, args.tee_key, args.repeat)
                nt, nc = measure(kbs, naive, uris[:n], concurrent, args.tee_key, args.repeat)
                print(
                    f"{n:>3} {mode:<10} {sc:>10} {st * 1000:>10.1f} {nc:>10} {nt * 1000:>10.1f} "
                    f"{nc / sc:>8.2f}x {nt / st:>9.2f}x"
                )
                assert sc == 2 + n, f"shared client used {sc} requests for {n} keys"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
