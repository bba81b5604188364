"""Test-only command channel into the VM guest: `python -m tests.vm.guest_control --port P`.

Runs inside the guest (root, stdlib only) while the host drives an end-to-end scenario: the
host reaches it through a qemu `hostfwd` (127.0.0.1 on the host only) and sends one JSON line
per connection, `{"argv": [...], "timeout": S, "input": "..."}`, and gets one JSON line back,
`{"rc": N, "stdout": "...", "stderr": "..."}` (rc -9 after a timeout). `{"op": "exit"}` ends
the server, which ends the guest's job (and so the boot). Connections are served in parallel,
so a long-running command (a journal watcher) does not block the others.

This exists only in the test guest; the product (cva) never runs it.
"""

from __future__ import annotations

import argparse
import json
import socketserver
import subprocess
import sys
import threading

MAX_REQUEST = 1024 * 1024


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST)
        try:
            request = json.loads(line)
        except ValueError:
            self._answer({"rc": -1, "stdout": "", "stderr": "bad request"})
            return
        if request.get("op") == "exit":
            self._answer({"rc": 0, "stdout": "", "stderr": ""})
            threading.Thread(target=self.server.shutdown, daemon=True).start()
            return
        self._answer(_run(request))

    def _answer(self, doc: dict[str, object]) -> None:
        self.wfile.write(json.dumps(doc).encode() + b"\n")
        self.wfile.flush()


def _run(request: dict[str, object]) -> dict[str, object]:
    argv = request.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return {"rc": -1, "stdout": "", "stderr": "argv must be a non-empty list of strings"}
    timeout = float(request.get("timeout", 60))  # type: ignore[arg-type]
    data = request.get("input")
    try:
        done = subprocess.run(  # runs what the host asks (test only)
            argv,
            input=data if isinstance(data, str) else None,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        return {"rc": -9, "stdout": out, "stderr": f"timed out after {timeout:g} s"}
    except OSError as exc:
        return {"rc": -1, "stdout": "", "stderr": str(exc)}
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.guest_control")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="0.0.0.0")  # reached through hostfwd only
    args = parser.parse_args(argv)
    with _Server((args.host, args.port), _Handler) as server:
        print(f"guest_control: listening on {args.host}:{args.port}", flush=True)
        server.serve_forever(poll_interval=0.2)
    print("guest_control: exit requested", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
