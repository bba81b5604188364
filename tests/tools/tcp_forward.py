"""Test-only TCP front for cva inside the VM guest: `python -m tests.tools.tcp_forward PORT SOCK`.

qemu's user-mode `hostfwd` delivers to the guest's NIC address, not to its loopback, and cva's
config accepts loopback TCP only; so the VM suite runs this next to cva: it listens on
0.0.0.0:PORT in the guest and splices every connection to cva's unix socket with the same
`SpliceListener` the vsock front door uses (the host side then dials 127.0.0.1:HOSTPORT).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

from agent.vsock import SpliceListener


async def serve(port: int, target: Path, host: str = "0.0.0.0") -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(16)
    sock.setblocking(False)
    front = SpliceListener(sock, target, log=lambda e, **kw: print(e, kw, flush=True))
    await front.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"tcp_forward: {host}:{port} -> {target}", flush=True)
    await stop.wait()
    await front.close()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), Path(sys.argv[2])))
