"""The real containerd ttRPC client as a test peer, and a raw-frame client for hostile tests.

`go_client()` builds `tests/ttrpc_client/main.go` with Debian's golang-go against Debian's
golang-github-containerd-ttrpc-dev (GOPATH mode over /usr/share/gocode, no network) once, and
caches the binary under ~/.cache/cva-ttrpc-client/<hash of the Go source and go version>/.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from agent.rpc.ttrpc import HEADER_LENGTH, FrameHeader, parse_header

GO_SOURCE = Path(__file__).resolve().parent / "ttrpc_client" / "main.go"
GOPATH = Path("/usr/share/gocode")
TTRPC_SOURCE = GOPATH / "src" / "github.com" / "containerd" / "ttrpc"
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cva-ttrpc-client"


class GoClientUnavailable(Exception):
    """golang-go or golang-github-containerd-ttrpc-dev is missing."""


def _go_env(gocache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(
        GO111MODULE="off",  # GOPATH mode: imports resolve from Debian's /usr/share/gocode
        GOPATH=str(GOPATH),
        GOCACHE=str(gocache),
        GOPROXY="off",
        GOFLAGS="",
        CGO_ENABLED="0",
    )
    env.setdefault("HOME", str(Path.home()))
    return env


def go_client() -> Path:
    """Path of the built client binary (built on first use, then cached)."""
    go = shutil.which("go")
    if go is None or not TTRPC_SOURCE.is_dir():
        raise GoClientUnavailable(
            "the Go ttrpc client needs golang-go and golang-github-containerd-ttrpc-dev"
        )
    version = subprocess.run(
        [go, "version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    digest = hashlib.sha256(GO_SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    out_dir = CACHE_ROOT / digest
    binary = out_dir / "cva-ttrpc-client"
    if binary.is_file():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cva-ttrpc-client-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copy(GO_SOURCE, src / "main.go")
        built = Path(tmp) / "cva-ttrpc-client"
        proc = subprocess.run(
            [go, "build", "-o", str(built), "."],
            cwd=src,
            env=_go_env(CACHE_ROOT / "gocache"),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"go build of the ttrpc test client failed:\n{proc.stderr}")
        tmp_binary = out_dir / f".cva-ttrpc-client.{os.getpid()}"
        shutil.copy(built, tmp_binary)
        tmp_binary.replace(binary)  # atomic: concurrent builders never see half a binary
    return binary


@dataclass(frozen=True)
class GoCall:
    service: str
    method: str
    payload: bytes = b""
    timeout_nano: int = 0
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GoResult:
    code: int  # ttRPC status code; -1 = no status (transport error)
    message: str
    payload: bytes
    transport_error: str


def go_job(socket_path: str | Path, calls: list[GoCall], *, deadline_ms: int = 20000) -> str:
    """The client's stdin: one JSON job (every call on one connection to `socket_path`)."""
    return json.dumps(
        {
            "socket": str(socket_path),
            "deadline_ms": deadline_ms,
            "calls": [
                {
                    "service": c.service,
                    "method": c.method,
                    "payload_hex": c.payload.hex(),
                    "timeout_nano": c.timeout_nano,
                    "metadata": c.metadata,
                }
                for c in calls
            ],
        }
    )


def parse_go_results(stdout: str | bytes) -> list[GoResult]:
    """The client's stdout: one result per call, in the job's order."""
    return [
        GoResult(
            code=r["code"],
            message=r["message"],
            payload=bytes.fromhex(r["payload_hex"]),
            transport_error=r["transport_error"],
        )
        for r in json.loads(stdout)
    ]


async def go_calls(
    binary: Path, socket_path: Path, calls: list[GoCall], *, deadline_ms: int = 20000
) -> list[GoResult]:
    """Run every call concurrently on ONE connection of the Go client."""
    job = go_job(socket_path, calls, deadline_ms=deadline_ms)
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        proc.communicate(job.encode()), timeout=deadline_ms / 1000 + 30
    )
    if proc.returncode != 0:
        raise RuntimeError(f"go ttrpc client failed ({proc.returncode}): {err.decode()}")
    return parse_go_results(out)


class RawConnection:
    """A bare unix-socket peer that writes whatever bytes a test wants."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> RawConnection:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self, timeout: float = 10.0) -> tuple[FrameHeader, bytes] | None:
        """The next frame, or None at EOF."""
        try:
            async with asyncio.timeout(timeout):
                head = await self.reader.readexactly(HEADER_LENGTH)
                header = parse_header(head)
                return header, await self.reader.readexactly(header.length)
        except asyncio.IncompleteReadError:
            return None

    async def at_eof(self, timeout: float = 10.0) -> bool:
        """True when the server closed the connection (reads until EOF)."""
        async with asyncio.timeout(timeout):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionError:
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
