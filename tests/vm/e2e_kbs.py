"""The loopback Trustee KBS as a process for the VM E2E tests and the demo (host side only).

    python -m tests.vm.e2e_kbs --port P --cert PEM --key PEM --uri kbs:///r/t/g \
        --resource-file FILE [--initdata-digest HEX] [--deny]

Like `python -m tests.kbs.server`, but the resource bytes come from a 0600 file (not argv),
the init-data digest the KBS accepts can be registered, and `--deny` starts it with a policy
that refuses the resource. A separate process, so that stopping it really drops every
connection (an in-process server keeps serving kept-alive connections after `stop()`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tests.kbs.server import LoopbackKbs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.e2e_kbs")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--resource-file", required=True)
    parser.add_argument("--initdata-digest", default=None)
    parser.add_argument("--deny", action="store_true")
    args = parser.parse_args(argv)
    with open(args.resource_file, "rb") as handle:
        resource = handle.read()
    digest = bytes.fromhex(args.initdata_digest) if args.initdata_digest else None
    kbs = LoopbackKbs(
        {args.uri: resource},
        host="127.0.0.1",
        port=args.port,
        tls=(args.cert, args.key),
        expected_initdata_digest=digest,
    )
    if args.deny:
        kbs.deny(args.uri)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    kbs.start()
    print(f"e2e_kbs: {kbs.url} serving {args.uri}{' (denied)' if args.deny else ''}", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        kbs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
