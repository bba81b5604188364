"""The daemon's grow trigger: block resize uevents -> VolumeManager.grow for the volume(s) on
that disk.

Bounded and debounced: each event names a MAJ:MIN; only a disk under a volume this daemon has
mounted counts (its devno is looked up in sysfs from the mapping, trusted guest state), all else
is dropped. A volume has at most one grow pending; events for it within DEBOUNCE seconds fold
into that one (a host resizing in several steps, or a burst of events), and a grow already
running gets one follow-up at most. The socket is read from the event loop (add_reader), at most
BATCH messages per wake-up; a listener that cannot open (no netlink in a test sandbox) is logged
and the daemon runs without it: the open path grows a volume anyway (luks.volume).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from agent.grow import uevent
from agent.log import get_logger

log = get_logger("cva.grow")
DEBOUNCE = 1.0  # s
BATCH = 64

Mounted = Callable[[], Iterable[tuple[str, str]]]  # (volume name, mapper device) now mounted


def disk_devno(device: str, disk_of: Callable[[str], str | None]) -> str | None:
    """MAJ:MIN of the disk under `device` (a /dev/mapper node), or None."""
    disk = disk_of(device)
    if disk is None:
        return None
    try:
        st = Path(disk).stat()
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def volumes_on(
    devno: str, mounted: Iterable[tuple[str, str]], devno_of: Callable[[str], str | None]
) -> list[str]:
    """The mounted volumes whose disk is `devno` (pure given `devno_of`)."""
    return sorted({name for name, device in mounted if devno_of(device) == devno})


class GrowWatcher:
    def __init__(
        self,
        mounted: Mounted,
        grow: Callable[[str], Awaitable[object]],
        devno_of: Callable[[str], str | None],
        *,
        debounce: float = DEBOUNCE,
    ) -> None:
        self._mounted = mounted
        self._grow = grow
        self._devno_of = devno_of
        self._debounce = debounce
        self._sock: socket.socket | None = None
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()

    def start(self) -> bool:
        """Listen; False (logged) if the kernel's uevent socket cannot be opened."""
        try:
            self._sock = uevent.open_socket()
        except OSError as exc:
            log.warning("no uevent listener: volumes grow only at open", error=str(exc)[:200])
            return False
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)
        return True

    async def aclose(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for task in list(self._pending.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _readable(self) -> None:
        if self._sock is None:
            return
        for _ in range(BATCH):
            data = uevent.receive(self._sock)
            if data is None:
                return
            self.feed(data)

    def feed(self, data: bytes) -> None:
        """One raw message (also the test entry point)."""
        event = uevent.block_resize(data)
        if event is None:
            return
        try:
            names = volumes_on(event.devno, list(self._mounted()), self._devno_of)
        except Exception as exc:  # noqa: BLE001 - a lookup failure must not stop the listener
            log.warning("resize event not mapped", devno=event.devno, error=str(exc)[:200])
            return
        for name in names:
            log.info("disk resized under a mounted volume", volume=name, devno=event.devno)
            self._schedule(name)

    def _schedule(self, name: str) -> None:
        task = self._pending.get(name)
        if task is not None and not task.done():
            self._again.add(name)  # folded into the pending grow, or one follow-up after it
            return
        self._pending[name] = asyncio.create_task(self._run(name), name=f"cva-grow-{name}")

    async def _run(self, name: str) -> None:
        while True:
            self._again.discard(name)
            await asyncio.sleep(self._debounce)
            self._again.discard(name)  # events during the wait are this grow's
            try:
                await self._grow(name)
            except Exception as exc:  # noqa: BLE001 - logged; the next event or open retries
                log.warning("volume grow failed", volume=name, error=str(exc)[:300])
            if name not in self._again:
                return
