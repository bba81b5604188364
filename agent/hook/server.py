"""The daemon's end of the prestart hook's private socket (`<state_dir>/hook.sock`).

One connection per hook run (agent.hook.wire has the messages). Per connection:

1. the peer must be root (SO_PEERCRED; the socket sits in the 0700 state dir too);
2. read the Request; the bundle must be `<rootfs_base>/<id>` (the daemon's own idea of it);
   open a pidfd of the container's init (`pid`) at once;
3. open the container's volumes (`VolumeManager.open_for_container`: the contract's
   `containers` rule, the name from the bundle's config.json), bounded by the hook's budget --
   the storage job itself is shielded and goes on, so a retry finds it done or still running;
4. clone each volume's mount (`luks.mount.clone_volume_mount`: the st_dev/mount-root check,
   then `open_tree(OPEN_TREE_CLONE)` with nodev,nosuid[,ro]) and send the fds with the Answer;
   "no volumes" is an empty list, at once;
5. wait for Done. Anything but `done: true` (a refusal, an error, the hook killed at 10 s, the
   connection dropped) -> SIGKILL the container's init through the pidfd, so it never runs
   without its volumes. Success is recorded as a binding (ListVolumes).

The daemon never enters another mount namespace (cva.service has RestrictNamespaces=yes): the
hook, run by kata-agent without those restrictions, does the setns + move_mount.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import signal
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import REFUSALS
from agent.hook.wire import (
    MAX_MESSAGE,
    Answer,
    HookVolume,
    WireError,
    decode_done,
    decode_request,
    encode_answer,
)
from agent.log import get_logger
from agent.policy import bundle_dir

if TYPE_CHECKING:
    from agent.contract import Volume
    from agent.volumes import OpenedVolume, VolumeManager

log = get_logger("cva.hook")

REQUEST_WAIT = 5.0  # a connected hook sends its request at once
DONE_MARGIN = 5.0  # past the hook's budget, the daemon stops waiting for Done (and kills)
MIN_BUDGET = 0.5

# (volume, opened) -> (detached mount fd, MAJ:MIN of its filesystem)
CloneMount = Callable[["Volume", "OpenedVolume"], tuple[int, str]]


def clone_with_luks(vol: Volume, opened: OpenedVolume) -> tuple[int, str]:
    """The production clone: luks.mount's checked OPEN_TREE_CLONE of the volume's guest mount."""
    from luks import mount as luks_mount  # noqa: PLC0415 - lazy: first storage step

    fd = luks_mount.clone_volume_mount(
        opened.guest_path, device=Path(opened.device), read_only=vol.read_only
    )
    st = os.fstat(fd)
    return fd, f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


class ContainerKiller:
    """SIGKILL for a container's init through a pidfd opened when the request arrived."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd: int | None = None
        with contextlib.suppress(OSError):
            self._pidfd = os.pidfd_open(pid)

    def kill(self, why: str) -> None:
        try:
            if self._pidfd is not None:
                try:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                except PermissionError:  # a seccomp filter without pidfd_send_signal
                    os.kill(self.pid, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            log.info("hook_container_gone", pid=self.pid, reason=why)
            return
        except OSError as exc:
            log.error("hook_kill_failed", pid=self.pid, error=exc.strerror)  # noqa: TRY400
            return
        log.warning("hook_container_killed", pid=self.pid, reason=why)

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class HookServer:
    def __init__(
        self,
        manager: VolumeManager,
        path: Path,
        *,
        rootfs_base: Path,
        clone: CloneMount = clone_with_luks,
    ) -> None:
        self._manager = manager
        self._path = path
        self._rootfs_base = rootfs_base
        self._clone = clone
        self._sock: socket.socket | None = None
        self._accept: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def path(self) -> Path:
        return self._path

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o077)
            try:
                sock.bind(str(self._path))
            finally:
                os.umask(old)
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._accept = asyncio.create_task(self._serve(sock), name="cva-hook-accept")

    async def close(self, grace: float) -> None:
        if self._accept is not None:
            self._accept.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=grace)
        with contextlib.suppress(OSError):
            self._path.unlink()

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            task = asyncio.create_task(self._handle(conn), name="cva-hook-conn")
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(False)
            try:
                await self._exchange(conn)
            except Exception as exc:  # noqa: BLE001 - one bad connection never stops the server
                log.error("hook_connection_failed", error=type(exc).__name__)  # noqa: TRY400

    async def _exchange(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if peer_uid(conn) != 0:
            log.warning("hook_peer_refused", reason="not root")
            return
        try:
            data = await asyncio.wait_for(loop.sock_recv(conn, MAX_MESSAGE + 1), REQUEST_WAIT)
            request = decode_request(data)
        except (TimeoutError, WireError, OSError) as exc:
            log.warning("hook_bad_request", error=getattr(exc, "message", type(exc).__name__))
            return
        log.info("hook_request", container_id=request.container_id, pid=request.pid)
        killer = ContainerKiller(request.pid)
        try:
            await self._prepare(conn, request.container_id, request.bundle, request.budget, killer)
        finally:
            killer.close()

    async def _late(self, cid: str, budget: float) -> str:
        """The refusal when the volumes were not ready within the hook's budget: a blank proof
        still running names the way out (README "Integration with Kata", first create)."""
        proving = [v for v in await self._manager.list() if v.scan is not None]
        if proving:
            v = proving[0]
            assert v.scan is not None
            return (
                f"volume {v.name}: the blank proof before its first format had read"
                f" {v.scan.done >> 20} of {v.scan.total >> 20} MiB when the hook's {budget:.1f} s"
                " ran out (kata stops a hook at 10 s); cva finishes it while the disk stays"
                " attached, but a re-attached disk is proven again from the start: for a disk"
                ' this large set blank_check = "sampled" for this volume in the contract'
                " (README: what it does not see)"
            )
        return (
            f"the volumes of container {cid} were not ready within the hook's {budget:.1f} s"
            " (kata stops a hook at 10 s); cva goes on preparing them, and a restart of the"
            " container finds them ready"
        )

    async def _open_while_connected(
        self, conn: socket.socket, cid: str, budget: float
    ) -> tuple[tuple[Volume, OpenedVolume], ...] | None:
        """The container's opened volumes within the hook's budget (TimeoutError past it), or
        None as soon as the hook's connection ends (kata killed it at 10 s, it crashed): the
        storage job itself is shielded and goes on either way."""
        loop = asyncio.get_running_loop()
        opening = asyncio.ensure_future(
            asyncio.wait_for(self._manager.open_for_container(cid), max(MIN_BUDGET, budget - 0.3))
        )
        watching = asyncio.ensure_future(loop.sock_recv(conn, MAX_MESSAGE + 1))
        try:
            await asyncio.wait({opening, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not watching.done():
                watching.cancel()
        hook_gone = watching.done() and not watching.cancelled()  # EOF, or out of turn
        if hook_gone or not opening.done():
            opening.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await opening
            return None
        return opening.result()

    async def _prepare(
        self, conn: socket.socket, cid: str, bundle: str, budget: float, killer: ContainerKiller
    ) -> None:
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        success = False
        reason = "the hook's connection ended before the volumes were bound"
        try:
            try:
                rootfs = bundle_dir(self._rootfs_base, cid) / "rootfs"
                if bundle != str(rootfs.parent):
                    raise WireError(
                        f"bundle {bundle[:200]!r} is not cva's bundle for container {cid}"
                        f" ({rootfs.parent})"
                    )
                opened = await self._open_while_connected(conn, cid, budget)
                if opened is None:
                    reason = "the hook went away while its volumes were being prepared"
                    log.warning("hook_gone", container_id=cid)
                    return
                vols: list[HookVolume] = []
                for vol, op in opened:
                    fd, dev = await asyncio.to_thread(self._clone, vol, op)
                    fds.append(fd)
                    remove = (
                        vol.disk.value
                        if vol.disk.kind == "container" and not vol.keep_device
                        else None
                    )
                    vols.append(HookVolume(vol.name, vol.mount, vol.read_only, dev, remove))
                answer = Answer(ok=True, rootfs=str(rootfs), volumes=tuple(vols))
            except TimeoutError:
                answer = Answer(ok=False, error=await self._late(cid, budget))
            except REFUSALS as exc:
                answer = Answer(ok=False, error=exc.message)
            _send(conn, encode_answer(answer), fds)
            for fd in fds:
                os.close(fd)
            fds = []
            if not answer.ok:
                reason = answer.error
                log.warning("hook_refused", container_id=cid, error=answer.error)
                return
            if not answer.volumes:
                success = True
                log.info("hook_no_volumes", container_id=cid)
                return
            try:
                data = await asyncio.wait_for(
                    loop.sock_recv(conn, MAX_MESSAGE + 1), DONE_MARGIN + budget
                )
                done = decode_done(data)
            except (TimeoutError, WireError, OSError):
                return
            if not done.done:
                reason = f"the hook could not bind: {done.error}"
                log.warning("hook_bind_failed", container_id=cid, error=done.error)
                return
            success = True
            names = tuple(v.name for v in answer.volumes)
            self._manager.record_bound(cid, names)
            log.info("hook_bound", container_id=cid, volumes=list(names))
        finally:
            for fd in fds:
                os.close(fd)
            if not success:
                killer.kill(reason)


def _send(conn: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    conn.settimeout(2.0)  # one small packet into an empty socket buffer
    try:
        conn.sendmsg([data], anc)
    finally:
        conn.setblocking(False)
