"""The loopback KBS in its own process, for timing (`python -m bench.kbs_server_proc N DELAY`).

Serves kbs:///bench/key/k0..k{N-1} (32 bytes each) on 127.0.0.1, every answer delayed DELAY
seconds (0 = none), prints its URL on stdout and serves until stdin closes. In its own process
the server's JWE work does not share the client's GIL, as with a real KBS.
"""

from __future__ import annotations

import sys

from tests.kbs.server import Fault, LoopbackKbs


def main(argv: list[str]) -> int:
    count, delay = int(argv[0]), float(argv[1])
    resources = {f"kbs:///bench/key/k{i}": bytes([i % 256]) * 32 for i in range(count)}
    with LoopbackKbs(resources) as kbs:
        if delay > 0:
            kbs.inject(Fault("*", "slow", times=10**9, delay=delay))
        print(kbs.url, flush=True)
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
