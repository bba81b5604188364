"""A tiny HTTP server on 127.0.0.1 for the harness's own network test.

GET /hello answers `cva-vm-echo <path>`; every request is appended to --log (if given).
    python -m tests.vm.echo_server --port P
"""

from __future__ import annotations

import argparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GREETING = b"cva-vm-echo"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = GREETING + b" " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
