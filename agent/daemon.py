"""`cva serve`: establish trust, serve the VolumeAgent API, shut down cleanly.

Start (agent/startup.py establishes trust first, then calls `run_daemon`): build the service,
listen (private unix socket for grpc.aio, the vsock splice in front
of it, optional unix/loopback-TCP extras, and the optional ttRPC socket `listen.ttrpc` serving
VolumeAgent and, when the contract allows, CDH SecureMount, and forwarding every other CDH call to
`[cdh] upstream`: agent.cdh; the prestart hook's private socket `<state_dir>/hook.sock`,
agent.hook.server; last the root-only control socket for `cva status`, agent.control) and send
READY=1.

SIGTERM/SIGINT: STOPPING=1; close the vsock listener; gRPC stops taking calls and gives running
ones `timeouts.shutdown_grace`; storage jobs still running get the same grace again (every step
is idempotent and crash-safe, so a job cut off by the process exit is finished by the next
PrepareVolumes). Mounted volumes stay mounted: containers are using them.

The ttRPC fronts (agent.rpc.ttrpc*, SecureMount and its storage code) are imported only when the
config enables them; a daemon without them does not load them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent import __version__
from agent.config import DaemonConfig
from agent.control.server import ControlServer
from agent.errors import CvaError
from agent.grow.watcher import GrowWatcher, disk_devno
from agent.hook.server import HookServer
from agent.hook.wire import SOCKET_NAME as HOOK_SOCKET_NAME
from agent.log import get_logger
from agent.rpc.grpc_service import AgentServer
from agent.rpc.vsock import SpliceListener, vsock_listen_socket
from agent.sdnotify import Notifier
from agent.volumes import VolumeManager

if TYPE_CHECKING:
    from agent.control.collect import Records
    from agent.rpc.ttrpc import TtrpcServer
    from agent.securemount.decisions import SecureMountBackend

log = get_logger("cva.daemon")

ManagerFactory = Callable[[DaemonConfig, Callable[[str], None]], VolumeManager]
SecureMountFactory = Callable[[VolumeManager, Path], "SecureMountBackend"]  # (manager, state_dir)


class StartupError(CvaError):
    """cva cannot start: the message names the step that failed."""


def _prepare_state_dir(config: DaemonConfig) -> None:
    state = config.paths.state_dir
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.chmod(0o700)
    with contextlib.suppress(FileNotFoundError):
        config.private_socket.unlink()
    if config.listen.unix is not None:
        config.listen.unix.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            config.listen.unix.unlink()
    if config.listen.ttrpc is not None:
        with contextlib.suppress(FileNotFoundError):
            config.listen.ttrpc.unlink()


class Daemon:
    def __init__(
        self,
        config: DaemonConfig,
        make_manager: ManagerFactory,
        notifier: Notifier,
        securemount_backend: SecureMountFactory | None = None,  # None: ManagerSecureMountBackend
    ) -> None:
        self.config = config
        self._make_manager = make_manager
        self._securemount_backend = securemount_backend
        self._notifier = notifier
        self.stop_event = asyncio.Event()
        self._sm_records: Records | None = None  # SecureMount's, for `cva status`

    def _status(self, text: str) -> None:
        try:
            self._notifier.status(text)
        except OSError as exc:
            log.warning("sd_notify_failed", error=exc.strerror)

    async def run(self) -> int:
        config = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        _prepare_state_dir(config)
        manager = self._make_manager(config, self._status)
        server = AgentServer(manager, call_timeout=config.timeouts.call)
        addresses = [f"unix:{config.private_socket}"]
        if config.listen.unix is not None:
            addresses.append(f"unix:{config.listen.unix}")
        if config.listen.tcp is not None:
            host, port = config.listen.tcp
            addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        for address in addresses:
            try:
                server.add_address(address)
            except RuntimeError as exc:
                raise StartupError(f"cannot listen on {address} ({exc})") from None
        await server.start()
        hook = HookServer(
            manager, config.paths.state_dir / HOOK_SOCKET_NAME, rootfs_base=config.paths.rootfs_base
        )
        try:
            await hook.start()
        except OSError as exc:
            await server.stop(0)
            raise StartupError(f"cannot listen on {hook.path} ({exc.strerror})") from None
        addresses.append(f"hook+unix:{hook.path}")
        ttrpc: TtrpcServer | None = None
        sweeper: asyncio.Task[None] | None = None
        if config.listen.ttrpc is not None:
            # lazy: SecureMount and the ttRPC server load only when a ttRPC front is configured
            from agent.rpc.ttrpc_service import build_ttrpc_server  # noqa: PLC0415
            from agent.securemount.volumes import (  # noqa: PLC0415
                ManagerSecureMountBackend,
                run_sweeper,
            )

            make_sm_backend = self._securemount_backend or ManagerSecureMountBackend
            sm_backend = make_sm_backend(manager, config.paths.state_dir)
            self._sm_records = getattr(sm_backend, "records", None)
            ttrpc = build_ttrpc_server(
                manager,
                call_timeout=config.timeouts.call,
                securemount_backend=sm_backend,
                header_dir=config.paths.state_dir / "securemount" / "headers",
                mount_rules=config.mount_rules,
            )
            from agent.cdh.front import install_cdh_front  # noqa: PLC0415 - lazy, as above

            install_cdh_front(ttrpc, config.cdh.upstream, forward_timeout=config.cdh.timeout)
            try:
                await ttrpc.listen_unix(config.listen.ttrpc)
            except (OSError, CvaError) as exc:
                await server.stop(0)
                await hook.close(0)
                raise StartupError(
                    f"cannot listen for ttRPC on {config.listen.ttrpc} ({exc})"
                ) from None
            addresses.append(f"ttrpc+unix:{config.listen.ttrpc}")
            sweeper = asyncio.create_task(
                run_sweeper(sm_backend, self.stop_event), name="cva-securemount-sweeper"
            )
        ttrpc_vsock: TtrpcServer | None = None
        if config.listen.ttrpc_vsock_port:
            # the host-facing ttRPC front: VolumeAgent only (SecureMount is kata-agent's, inside)
            from agent.rpc.ttrpc_service import build_ttrpc_server  # noqa: PLC0415 - lazy, as above

            ttrpc_vsock = build_ttrpc_server(
                manager,
                call_timeout=config.timeouts.call,
                securemount_backend=None,
                header_dir=config.paths.state_dir / "securemount" / "headers",
            )
            try:
                await ttrpc_vsock.listen_socket(vsock_listen_socket(config.listen.ttrpc_vsock_port))
            except OSError as exc:
                await server.stop(0)
                await hook.close(0)
                if ttrpc is not None:
                    await ttrpc.close(0)
                raise StartupError(
                    f"cannot listen for ttRPC on vsock port {config.listen.ttrpc_vsock_port}"
                    f" ({exc.strerror}); is the vsock transport loaded?"
                ) from None
            addresses.append(f"ttrpc+vsock:{config.listen.ttrpc_vsock_port}")
        splicer: SpliceListener | None = None
        if config.listen.vsock_port:
            try:
                sock = vsock_listen_socket(config.listen.vsock_port)
            except OSError as exc:
                await server.stop(0)
                await hook.close(0)
                for front in (ttrpc, ttrpc_vsock):
                    if front is not None:
                        await front.close(0)
                raise StartupError(
                    f"cannot listen on vsock port {config.listen.vsock_port} ({exc.strerror});"
                    " is the vsock transport loaded?"
                ) from None
            splicer = SpliceListener(sock, config.private_socket, log=log.info)
            await splicer.start()
        control = ControlServer(config.control_socket, lambda: self._status_report(manager))
        try:
            await control.start()
        except OSError as exc:
            await server.stop(0)
            for front in (ttrpc, ttrpc_vsock):
                if front is not None:
                    await front.close(0)
            if splicer is not None:
                await splicer.close()
            raise StartupError(
                f"cannot listen on {config.control_socket} ({exc.strerror})"
            ) from None
        addresses.append(f"control+unix:{config.control_socket}")
        # a disk the host enlarges under a mounted volume is grown online (agent.grow)
        grower = GrowWatcher(manager.mounted, manager.grow, _disk_devno)
        grower.start()
        volumes = len(manager.contract.volumes)
        log.info(
            "ready",
            version=__version__,
            addresses=addresses,
            vsock_port=config.listen.vsock_port or None,
            volumes=volumes,
            api_allow=sorted(manager.contract.api.allow),
        )
        try:
            self._notifier.ready(f"serving {volumes} volume(s)")
        except OSError as exc:
            log.error("sd_notify_failed", error=exc.strerror)  # noqa: TRY400

        await self.stop_event.wait()

        log.info("stopping", in_flight=manager.busy)
        try:
            self._notifier.stopping("stopping: finishing in-flight work")
        except OSError as exc:
            log.warning("sd_notify_failed", error=exc.strerror)
        grace = config.timeouts.shutdown_grace
        await grower.aclose()
        await control.close()
        if splicer is not None:
            await splicer.stop_accepting()
        fronts = [t.close(grace) for t in (ttrpc, ttrpc_vsock) if t is not None]
        await asyncio.gather(*fronts, server.stop(grace), hook.close(grace))
        finished = await manager.drain(grace)
        if sweeper is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(sweeper, timeout=grace)
        if splicer is not None:
            await splicer.close()
        await manager.aclose()
        for sock_path in (config.private_socket, config.listen.unix, config.listen.ttrpc):
            if sock_path is not None:
                with contextlib.suppress(OSError):
                    sock_path.unlink()
        log.info("stopped", clean=finished)
        return 0 if finished else 1

    async def _status_report(self, manager: VolumeManager) -> dict[str, object]:
        from agent.control.collect import collect  # noqa: PLC0415 - lazy: only when asked

        return (await collect(manager, self._sm_records)).to_json()


def _disk_devno(device: str) -> str | None:
    """MAJ:MIN of the disk under a mapper device (sysfs, guest state): what a resize uevent
    names."""
    from agent.control.collect import backing_disk  # noqa: PLC0415 - lazy: only on an event

    return disk_devno(device, backing_disk)


def run_daemon(
    config: DaemonConfig, make_manager: ManagerFactory, notifier: Notifier | None = None
) -> int:
    """Run the service until SIGTERM/SIGINT; returns the exit code (0 = clean stop).

    When storage work is still stuck in a worker thread after the grace period, the process
    exits right away (`os._exit`) instead of waiting for the thread: every storage step is
    crash-safe, and the next PrepareVolumes finishes what was cut off.
    """
    os.umask(0o077)
    daemon = Daemon(config, make_manager, notifier or Notifier.from_env())
    loop = asyncio.new_event_loop()
    rc = 1
    try:
        rc = loop.run_until_complete(daemon.run())
    finally:
        if rc == 0:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
    if rc != 0:
        log.warning("exiting_with_work_in_flight")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


__all__ = ["Daemon", "ManagerFactory", "StartupError", "run_daemon"]
