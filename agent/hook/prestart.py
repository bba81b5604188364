"""`cva hook prestart`: the guest prestart hook kata-agent runs before a container starts.

kata-agent (SPEC §e.7) runs every regular executable file in `<guest_hook_path>/prestart/`
with an empty environment, argv `[<file name>, "prestart"]`, the OCI state JSON on stdin, in
the agent's namespaces, after the container's init has set up its rootfs and before it
pivot_roots; it SIGKILLs a hook after 10 s and ignores its exit status. So this process:

1. reads the state (`id`, `pid`, `bundle`) and opens a pidfd of the container's init;
2. asks the daemon over its private socket (`<state_dir>/hook.sock`, SOCK_SEQPACKET) to
   prepare the container's volumes (the contract's `containers` rule, the name from the
   bundle's config.json); the daemon answers with one detached mount fd per volume
   (`open_tree(OPEN_TREE_CLONE)`, SCM_RIGHTS), or "no volumes";
3. enters the container's mount namespace (`setns` on `/proc/<pid>/ns/mnt`: the process is
   single-threaded) and attaches each tree at `<rootfs>/<mount>`, resolved inside the rootfs
   (`luks.mount.attach_volume_tree`: RESOLVE_IN_ROOT, st_dev checked after), removes a raw
   disk node the daemon names from the container's /dev, and tells the daemon it is done.

Fail closed: on any failure (daemon unreachable, a refusal, a bad answer, a bind that fails,
its own deadline) it SIGKILLs the container's init through the pidfd -- which makes kata's
CreateContainer fail -- writes one line to stderr and exits 1. The deadline (`BUDGET`, counted
from the process's start as the kernel recorded it) leaves margin before kata's 10 s; the
daemon also kills the init when this connection ends before "done".

Kept light on purpose: no gRPC, no storage stack (luks.mount is ctypes only), no asyncio.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import NoReturn

from agent.errors import REFUSALS
from agent.hook.state import HookState, parse_state
from agent.hook.wire import (
    MAX_MESSAGE,
    MAX_VOLUMES,
    SOCKET_NAME,
    Answer,
    Done,
    Request,
    decode_answer,
    encode_done,
    encode_request,
)

KATA_HOOK_TIMEOUT = 10.0  # kata's DEFAULT_HOOK_TIMEOUT_SEC: SIGKILL after this
BUDGET = 8.0  # this hook gives up (and kills the container) this long after its start
MAX_BUDGET = 300.0  # --budget (tests on a slow emulated guest; kata itself stops a hook at 10 s)
CONNECT_WAIT = 0.1  # between connection attempts while the daemon is (re)starting
CONNECT_PATIENCE = 2.0  # how long a missing or refusing socket is retried (cva is Before= kata)
CLONE_NEWNS = 0x00020000

_libc = ctypes.CDLL(None, use_errno=True)


class HookFailure(Exception):
    """Why the container must not start (one line)."""


def process_age() -> float:
    """Seconds since this process was forked (kata-agent's spawn), from /proc: the deadline
    counts the interpreter's own start too."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 (starttime), after pid and (comm)
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Killer:
    """SIGKILL for the container's init through a pidfd (no pid-reuse race)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError as exc:
            raise HookFailure(
                f"container init pid {pid} cannot be opened ({exc.strerror})"
            ) from None

    @property
    def pidfd(self) -> int:
        assert self._pidfd is not None
        return self._pidfd

    def alive(self) -> bool:
        try:
            signal.pidfd_send_signal(self.pidfd, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        if self._pidfd is None:
            return
        with contextlib.suppress(OSError):  # already gone: it cannot start either
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)


def _recv_answer(sock: socket.socket) -> tuple[Answer, list[int]]:
    fds = array.array("i")
    data, ancdata, flags, _addr = sock.recvmsg(
        MAX_MESSAGE + 1, socket.CMSG_SPACE(MAX_VOLUMES * fds.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    received = list(fds)
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        _close_all(received)
        raise HookFailure("cva's answer was truncated")
    try:
        answer = decode_answer(data)
    except REFUSALS as exc:
        _close_all(received)
        raise HookFailure(exc.message) from None
    if answer.ok and len(received) != len(answer.volumes):
        _close_all(received)
        raise HookFailure(
            f"cva's answer names {len(answer.volumes)} volume(s) but carries {len(received)} fd(s)"
        )
    return answer, received


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def connect(path: Path, deadline: float) -> socket.socket:
    """Connect to the hook socket, retrying for CONNECT_PATIENCE while cva is (re)starting."""
    deadline = min(deadline, time.monotonic() + CONNECT_PATIENCE)
    last = "not there"
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            sock.connect(str(path))
            return sock
        except OSError as exc:
            sock.close()
            last = exc.strerror or type(exc).__name__
        if time.monotonic() + CONNECT_WAIT >= deadline:
            raise HookFailure(f"cva is not reachable at {path} ({last}); is cva.service running?")
        time.sleep(CONNECT_WAIT)


def enter_mount_namespace(pid: int, killer: Killer) -> None:
    """setns into the container's mount namespace (refused when it is our own)."""
    own = Path("/proc/self/ns/mnt").stat()
    try:
        ns_fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise HookFailure(
            f"the container's mount namespace cannot be opened ({exc.strerror})"
        ) from None
    try:
        if not killer.alive():  # the fd is the namespace of the process the pidfd names
            raise HookFailure(f"container init {pid} is gone")
        st = os.fstat(ns_fd)
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            raise HookFailure(
                f"container init {pid} shares the agent's mount namespace; refusing to bind there"
            )
        if _libc.setns(ns_fd, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise HookFailure(
                f"setns into the container's mount namespace failed ({os.strerror(err)})"
            )
    finally:
        os.close(ns_fd)


def bind_volumes(answer: Answer, fds: list[int], state: HookState, killer: Killer) -> None:
    from luks import mount as luks_mount  # noqa: PLC0415 - only when there is something to bind

    rootfs = Path(answer.rootfs)
    if str(rootfs) != f"{state.bundle}/rootfs":
        raise HookFailure(
            f"cva's rootfs {rootfs} is not the bundle's ({state.bundle}/rootfs); refusing"
        )
    enter_mount_namespace(state.pid, killer)
    for vol, fd in zip(answer.volumes, fds, strict=True):
        try:
            luks_mount.attach_volume_tree(fd, rootfs, vol.mount, dev=vol.dev)
            if vol.remove is not None:
                luks_mount.remove_device_node(rootfs, vol.remove)
        except REFUSALS as exc:
            raise HookFailure(f"volume {vol.name}: {exc.message}") from None


DEFAULT_CONFIG = Path("/etc/cva/config.toml")  # = agent.config.DEFAULT_CONFIG_PATH
DEFAULT_STATE_DIR = "/run/cva"  # = agent.config.PathsConfig.state_dir
MAX_CONFIG_BYTES = 64 * 1024


def socket_path_for(config: Path | None) -> Path:
    """The daemon's hook socket, `<state_dir>/hook.sock`, from the daemon config's `[paths]
    state_dir` (read here without agent.config, which costs the hook's start more than it
    checks: the daemon has validated the same file)."""
    import tomllib  # noqa: PLC0415 - after the pidfd exists (fail closed)

    target = config or DEFAULT_CONFIG
    try:
        data = target.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except FileNotFoundError:
        if config is None:
            return Path(DEFAULT_STATE_DIR) / SOCKET_NAME
        raise HookFailure(f"config {target} does not exist") from None
    except OSError as exc:
        raise HookFailure(f"config {target} cannot be read ({exc.strerror})") from None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise HookFailure(f"config {target} is not valid TOML") from None
    paths = doc.get("paths", {})
    state = paths.get("state_dir", DEFAULT_STATE_DIR) if isinstance(paths, dict) else None
    if not isinstance(state, str) or not state.startswith("/") or "\0" in state:
        raise HookFailure(f"config {target}: paths.state_dir must be an absolute path")
    return Path(state) / SOCKET_NAME


def run(raw_state: bytes, config: Path | None, *, budget: float, problem: str | None = None) -> int:
    """The hook's work; returns 0 (volumes bound, or none) or kills the container's init and
    raises HookFailure (`problem`: a reason known before the state was read)."""
    deadline = time.monotonic() + budget
    try:
        state = parse_state(raw_state)
    except REFUSALS as exc:
        raise HookFailure(exc.message) from None
    killer = Killer(state.pid)
    if problem is not None:
        killer.kill()
        raise HookFailure(problem)
    try:
        _run(state, killer, socket_path_for(config), deadline)
    except BaseException:
        killer.kill()
        raise
    return 0


def _run(state: HookState, killer: Killer, socket_path: Path, deadline: float) -> None:
    sock = connect(socket_path, deadline)
    with sock:
        left = deadline - time.monotonic()
        sock.settimeout(max(0.05, left))
        request = Request(state.container_id, state.pid, state.bundle, round(max(0.0, left), 3))
        try:
            sock.send(encode_request(request))
            answer, fds = _recv_answer(sock)
        except TimeoutError:
            raise HookFailure(
                "cva did not answer within the hook's budget (a first create or blank proof"
                " that needs longer: see README 'Integration with Kata')"
            ) from None
        except OSError as exc:
            raise HookFailure(f"the connection to cva failed ({exc.strerror})") from None
        if not answer.ok:
            raise HookFailure(answer.error)
        if not answer.volumes:
            return
        try:
            bind_volumes(answer, fds, state, killer)
        except HookFailure as exc:
            _tell(sock, Done(done=False, error=str(exc)))
            raise
        finally:
            _close_all(fds)
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            sock.send(encode_done(Done(done=True)))
        except OSError as exc:
            raise HookFailure(
                f"cva went away before the bind was confirmed ({exc.strerror})"
            ) from None


def _tell(sock: socket.socket, done: Done) -> None:
    with contextlib.suppress(OSError):
        sock.send(encode_done(done))


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"cva hook prestart: {message}\n")
    sys.stderr.flush()
    os._exit(1)


def main(config: Path | None, *, budget: float = BUDGET) -> int:
    """Entry point of `cva hook prestart`: stdin is the OCI state; 0, or one line and 1."""
    problem = None
    if not 0 < budget <= MAX_BUDGET:  # a broken hook file: fail closed, with the default budget
        problem = f"--budget {budget:g} is outside (0, {MAX_BUDGET:g}] seconds; fix the hook file"
        budget = BUDGET
    left = budget - process_age()
    if left <= 0:
        _fail("started too late to finish before kata's 10 s hook timeout")

    def on_alarm(_sig: int, _frame: object) -> None:  # the last line of defence
        raise HookFailure(f"did not finish within {budget:g} s of its start; container stopped")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        raw = sys.stdin.buffer.read(1024 * 1024 + 1)
        run(raw, config, budget=left, problem=problem)  # kills the container's init on any failure
    except HookFailure as exc:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _fail(str(exc))
    signal.setitimer(signal.ITIMER_REAL, 0)
    return 0
