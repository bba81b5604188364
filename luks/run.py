"""The one runner for external tools (cryptsetup, lvm, mkfs, blkid, dmsetup, ...).

Rules it enforces:
- argv is a list, never a shell string;
- every call has a timeout, enforced with SIGKILL on the whole process group (cryptsetup ignores
  SIGTERM while a KDF runs);
- secrets go in through stdin or a memfd (`secret_fd`), never argv or env; the environment is a
  small fixed one, not the daemon's;
- output is captured with a size cap; stderr is decoded and redacted before it can reach an
  exception or a log line.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from luks.errors import StorageError
from luks.secret import Secret

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_OUTPUT = 4 * 1024 * 1024
_REDACTED = "<redacted>"


class ToolError(StorageError):
    """An external command failed or timed out."""


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: str
    seconds: float

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")


def _redact(text: str, redact: Sequence[str]) -> str:
    for r in redact:
        if r:
            text = text.replace(r, _REDACTED)
    return text


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no message"


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    stdin: bytes | bytearray | Secret | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    redact: Sequence[str] = (),
    max_output: int = MAX_OUTPUT,
) -> Result:
    """Run `argv` with a hard timeout; raise ToolError on failure (when `check`) or timeout."""
    if not argv:
        raise ValueError("empty argv")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    argv = tuple(argv)
    exe = argv[0]
    resolved = exe if "/" in exe else shutil.which(exe, path=SAFE_PATH)
    if resolved is None or not os.access(resolved, os.X_OK):
        raise ToolError(f"{exe}: command not found; install the package that provides it")
    full_env = {"PATH": SAFE_PATH, "LC_ALL": "C", "LANG": "C"}
    if env:
        full_env.update(env)
    data: bytes | bytearray | memoryview | None
    data = stdin.data if isinstance(stdin, Secret) else stdin
    start = time.monotonic()
    proc = subprocess.Popen(
        (resolved, *argv[1:]),
        stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
        pass_fds=tuple(pass_fds),
        start_new_session=True,
        close_fds=True,
    )
    try:
        # communicate() takes any bytes-like (it writes through a memoryview): no copy
        out, err = proc.communicate(input=data, timeout=timeout)  # type: ignore[arg-type]
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise ToolError(
            f"{exe} timed out after {timeout:g}s and was killed ({' '.join(argv[1:3])})"
        ) from None
    except BaseException:
        _kill_group(proc)
        raise
    elapsed = time.monotonic() - start
    if len(out) > max_output:
        raise ToolError(f"{exe} printed more than {max_output} bytes; refusing its output")
    err_text = _redact(err[:max_output].decode("utf-8", errors="replace"), redact)
    result = Result(argv, proc.returncode, out, err_text, elapsed)
    if check and proc.returncode != 0:
        raise ToolError(
            f"{exe} {' '.join(argv[1:2])} failed (exit {proc.returncode}): {_last_line(err_text)}"
        )
    return result


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        proc.kill()


@contextmanager
def secret_fd(secret: Secret | bytes | bytearray, name: str = "cva-secret") -> Iterator[str]:
    """Put a secret in an anonymous memfd; yield a `/proc/self/fd/N` path for a child to read.

    Pass the fd number (`int(path.rsplit('/', 1)[1])`) in `pass_fds`. The memfd lives only in
    memory and is closed (freed) when the block ends.
    """
    data = secret.data if isinstance(secret, Secret) else secret
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
        os.lseek(fd, 0, os.SEEK_SET)
        yield f"/proc/self/fd/{fd}"
    finally:
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
