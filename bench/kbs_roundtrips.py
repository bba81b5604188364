"""KBS round trips (issue 8 #3): cva's shared-session client vs the naive attest-per-key client.

Uses the kbs stream's `bench/kbs_bench.py` clients against the loopback Trustee-compatible KBS
(sample attester, 1/8/64 resources, serial and concurrent):
- request counts with the KBS in this process (its request log; target 2 + N);
- wall times with the KBS in its own process (`bench.kbs_server_proc`, so its JWE work does not
  share the client's GIL), once as is (answers in about a millisecond on 127.0.0.1) and once with
  every answer delayed LATENCY_S (a KBS one network hop away); concurrent against serial at 64
  keys (target ≥ 4x faster), each against the naive client.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.results import Result, Target, measured, not_measured

REPO = Path(__file__).resolve().parents[1]
GROUP = "3. KBS round trips (host, loopback KBS)"
REPEAT = 3
KEY_ALG = "ECDH-ES+A256KW-P256"
LATENCY_S = 0.010  # a KBS one network hop away: RTT plus verification, per request
SIZES = (1, 8, 64)
CONCURRENCY_TARGET = Target("ratio", "<=", 0.25, "concurrent ≥ 4x faster than serial")


def _requests_target(n: int) -> Target:
    return Target("value", "==", 2 + n, "2 + N")


def planned(reason: str) -> list[Result]:
    out = [
        not_measured(
            f"KBS {n} keys {mode}: requests",
            reason,
            unit="requests",
            group=GROUP,
            target=_requests_target(n),
        )
        for n in SIZES
        for mode in ("serial", "concurrent")
    ]
    out += [
        not_measured(
            f"KBS 64 keys{label}: concurrent vs serial",
            reason,
            unit="ms",
            group=GROUP,
            target=CONCURRENCY_TARGET if label else None,
        )
        for label in ("", f", {int(LATENCY_S * 1000)} ms KBS latency")
    ]
    return out


@contextlib.contextmanager
def _server(count: int, delay: float) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.kbs_server_proc", str(count), str(delay)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError("the loopback KBS process did not start")
        yield url
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _time(kb: Any, fn: Any, url: str, uris: list[str], concurrent: bool) -> float:
    times = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        asyncio.run(fn(url, uris, concurrent, KEY_ALG))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def collect() -> list[Result]:
    try:
        kb: Any = importlib.import_module("bench.kbs_bench")
        from tests.kbs.server import LoopbackKbs
    except ImportError as exc:
        return planned(f"the kbs stream's bench/KBS peer is not in this tree ({exc.name})")
    import logging

    import structlog

    logging.disable(logging.INFO)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    uris = [f"kbs:///bench/key/k{i}" for i in range(max(SIZES))]
    counts: dict[tuple[int, bool, str], int] = {}
    with LoopbackKbs({u: bytes([i % 256]) * 32 for i, u in enumerate(uris)}) as kbs:
        for n in SIZES:
            for concurrent in (False, True):
                for label, fn in (("shared", kb.shared), ("naive", kb.naive)):
                    _, c = kb.measure(kbs, fn, uris[:n], concurrent, KEY_ALG, 1)
                    counts[(n, concurrent, label)] = c
    out: list[Result] = []
    top = max(SIZES)
    for delay in (0.0, LATENCY_S):
        ms = int(delay * 1000)
        label = f", {ms} ms KBS latency" if delay else ""
        note = (f"every KBS answer delayed {ms} ms; " if delay else "") + f"median of {REPEAT}"
        with _server(top, delay) as url:
            asyncio.run(kb.shared(url, uris[:8], True, KEY_ALG))  # warm-up
            times: dict[tuple[int, bool], float] = {}
            for n in SIZES:
                for concurrent in (False, True):
                    mode = "concurrent" if concurrent else "serial"
                    st = _time(kb, kb.shared, url, uris[:n], concurrent)
                    nt = _time(kb, kb.naive, url, uris[:n], concurrent)
                    times[(n, concurrent)] = st
                    if not delay:
                        out.append(
                            measured(
                                f"KBS {n} keys {mode}: requests",
                                "requests",
                                counts[(n, concurrent, "shared")],
                                baseline_name="attest per key",
                                baseline=counts[(n, concurrent, "naive")],
                                target=_requests_target(n),
                                group=GROUP,
                            )
                        )
                    out.append(
                        measured(
                            f"KBS {n} keys {mode}{label}: wall time",
                            "ms",
                            st,
                            baseline_name="attest per key",
                            baseline=nt,
                            note=note,
                            group=GROUP,
                        )
                    )
        out.append(
            measured(
                f"KBS {top} keys{label}: concurrent vs serial",
                "ms",
                times[(top, True)],
                baseline_name="same client, serial",
                baseline=times[(top, False)],
                # with a zero-latency loopback KBS there is nothing to overlap (issue 14 item 4):
                # concurrency is judged with the 10 ms latency row only
                target=CONCURRENCY_TARGET if delay else None,
                note=note,
                group=GROUP,
            )
        )
    return out
