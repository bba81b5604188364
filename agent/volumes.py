"""Volume orchestration: which volume to open, bind or close for a container, and when.

The storage work itself (disk, LVM, LUKS, filesystem, mounts) sits behind `VolumeBackend`, a
small synchronous protocol: production uses `luks.volume` (agent/luks_backend.py), unit tests an
in-memory backend. This module decides and sequences:

- one asyncio lock per volume: prepare/release of the same volume never overlap;
- the volumes of one container are prepared in parallel;
- the key is fetched (lazily attesting, through one shared KBS session) only when a volume is
  not already open, and wiped as soon as the backend has used it;
- a second PrepareVolumes for the same container returns the same answer (idempotent);
- storage work runs as tracked tasks shielded from RPC cancellation: a call that hits its
  deadline leaves the work to finish (every backend step is idempotent and crash-safe), and the
  next call or shutdown waits for it instead of starting a second one on the same volume.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from agent import policy
from agent.errors import CvaError
from luks.secret import Secret

if TYPE_CHECKING:
    from agent.contract import Contract, KbsResourceUri, Volume
    from agent.measure import Measurer, VolumeIdentity

T = TypeVar("T")


# Bindings whose id starts with this are not containers but other holders (SecureMount).
HOLDER_PREFIX = "securemount:"
PREVIOUS_KEY_TIMEOUT = 600.0  # s (also the grow's key); the KBS client keeps its own deadline


class VolumeState(enum.Enum):
    """DESIGN §4, plus BOUND (bind-mounted into at least one container) and CLOSED (not open
    here; its on-disk state is not inspected without the key)."""

    CLOSED = "closed"
    ABSENT = "absent"
    INITIALIZING = "initializing"
    READY = "ready"
    OPEN = "open"
    MOUNTED = "mounted"
    BOUND = "bound"
    PROVING_BLANK = "proving-blank"  # a zero scan before a format is running (see `progress`)


# (what is scanned, bytes proven zero so far, bytes in total): from the backend's worker thread
ScanProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ScanStatus:
    what: str  # "disk" (before pvcreate), "volume" (the LV or whole disk), "data area"
    done: int
    total: int

    @property
    def percent(self) -> int:
        return 100 * self.done // self.total if self.total else 100


class ShuttingDown(CvaError):
    """The daemon is stopping and takes no new work (gRPC UNAVAILABLE)."""


@dataclass(frozen=True)
class Rekey:
    """This open moved the volume from its previous key to its key (luks.rotation): the key ids
    its measured volume-rekey event names (old None: not at hand)."""

    old_key_id: bytes | None
    new_key_id: bytes


@dataclass(frozen=True)
class OpenedVolume:
    """A volume mounted at its guest path (state MOUNTED)."""

    name: str
    guest_path: Path
    device: str
    created: bool  # formatted by this daemon run (False: an existing volume was opened)
    identity: VolumeIdentity | None = None  # for the measured event (None: not known)
    rekey: Rekey | None = None  # this open rotated its key (a volume-rekey event first)


@dataclass(frozen=True)
class BoundVolume:
    """A volume bound into a container: one entry of the PrepareVolumes answer."""

    name: str
    state: VolumeState
    guest_path: Path
    container_path: str
    created: bool
    device: str
    read_only: bool


@dataclass(frozen=True)
class Released:
    released: tuple[str, ...]  # unbound from the container
    closed: tuple[str, ...]  # of those, unmounted and closed (no other container uses them)


@dataclass(frozen=True)
class GrowReport:
    """The last online grow of a mounted volume (luks.grow): what `cva status` shows."""

    status: str  # "grown", "unchanged", "refused", "not-mounted", "failed"
    reason: str = ""  # refused / failed: why
    fs_bytes: int | None = None  # the filesystem's size afterwards


@dataclass(frozen=True)
class VolumeStatus:
    name: str
    state: VolumeState
    guest_path: Path | None
    device: str | None
    container_ids: tuple[str, ...]
    containers: tuple[str, ...]
    scan: ScanStatus | None = None  # while PROVING_BLANK
    grow: GrowReport | None = None  # the last online grow of this daemon run


class VolumeBackend(Protocol):
    """The storage layer, synchronous and idempotent per step (run in worker threads)."""

    def current(self, vol: Volume) -> OpenedVolume | None:
        """The volume if already mounted at its guest path (needs no key; `created` False)."""

    def open(
        self,
        vol: Volume,
        secret: Secret,
        progress: ScanProgress | None = None,
        previous: Callable[[], Secret] | None = None,
    ) -> OpenedVolume:
        """Disk -> LVM -> LUKS -> filesystem -> mounted at the guest path (formats if allowed;
        `progress` hears about the zero scan that proves a disk blank first; `previous` fetches
        the contract's previous key, called from the worker thread only when the volume is
        still under it)."""

    def bind(self, vol: Volume, opened: OpenedVolume, rootfs: Path) -> None:
        """Bind the guest mount to `vol.mount` inside the container rootfs (idempotent)."""

    def unbind(self, vol: Volume, rootfs: Path) -> None:
        """Undo `bind`; a rootfs already gone is fine (idempotent)."""

    def close(self, vol: Volume) -> None:
        """Unmount the guest mount and close the LUKS/LVM devices (idempotent)."""

    def state(self, vol: Volume) -> VolumeState:
        """The volume's state as far as it can be seen without a key."""


@runtime_checkable
class GrowBackend(Protocol):
    """A backend that can grow a mounted volume online (luks.grow); optional."""

    def grow(self, vol: Volume, fetch_key: Callable[[], Secret]) -> GrowReport:
        """Grow the mounted volume to its (grown) disk; `fetch_key` is called (from the worker
        thread) only if the mapping must be resized. Refusals are returned, not raised."""
        ...


class KeySource(Protocol):
    """Where volume keys come from: the shared, lazily attested KBS session."""

    async def get_resource(self, uri: KbsResourceUri) -> Secret: ...

    async def aclose(self) -> None: ...


class BindingStore:
    """Which containers each volume is bound into; persisted in the (tmpfs) state dir so a
    restarted daemon still knows what to release."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._by_container: dict[str, tuple[str, ...]] = {}
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError):
            return  # our own tmpfs file; unreadable = start empty (binds are idempotent)
        if isinstance(doc, dict):
            for cid, names in doc.items():
                if isinstance(cid, str) and isinstance(names, list):
                    self._by_container[cid] = tuple(n for n in names if isinstance(n, str))

    def _save(self) -> None:
        if self._path is None:
            return
        tmp = self._path.with_name(self._path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self._by_container, fh, sort_keys=True)
        tmp.replace(self._path)

    def add(self, cid: str, name: str) -> None:
        names = self._by_container.get(cid, ())
        if name not in names:
            self._by_container[cid] = (*names, name)
            self._save()

    def remove(self, cid: str, name: str) -> None:
        names = tuple(n for n in self._by_container.get(cid, ()) if n != name)
        if names:
            self._by_container[cid] = names
        else:
            self._by_container.pop(cid, None)
        self._save()

    def volumes_of(self, cid: str) -> tuple[str, ...]:
        return self._by_container.get(cid, ())

    def containers_of(self, name: str) -> tuple[str, ...]:
        return tuple(sorted(c for c, names in self._by_container.items() if name in names))


class VolumeManager:
    """Orchestrates PrepareVolumes / ReleaseVolumes / ListVolumes for one contract."""

    def __init__(
        self,
        contract: Contract,
        backend: VolumeBackend,
        keys: KeySource,
        *,
        rootfs_base: Path,
        bindings: BindingStore | None = None,
        on_status: Callable[[str], None] | None = None,
        measurer: Measurer | None = None,
    ) -> None:
        self._contract = contract
        self._measurer = measurer
        self._backend = backend
        self._keys = keys
        self._rootfs_base = rootfs_base
        self._bindings = bindings or BindingStore(None)
        self._on_status = on_status or (lambda _text: None)
        self._volumes = {v.name: v for v in contract.volumes}
        self._locks = {name: asyncio.Lock() for name in self._volumes}
        self._opened: dict[str, OpenedVolume] = {}
        self._resolved: dict[str, Volume] = {}  # container: disks as last resolved (for close)
        self._scans: dict[str, ScanStatus] = {}  # written by worker threads (one dict store)
        self._grown: dict[str, GrowReport] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._closing = False

    @property
    def contract(self) -> Contract:
        return self._contract

    @property
    def measurer(self) -> Measurer | None:
        return self._measurer

    @property
    def keys(self) -> KeySource:
        return self._keys

    def opened(self, name: str) -> OpenedVolume | None:
        """Volume `name` as this daemon run opened or found it mounted (None: not open)."""
        return self._opened.get(name)

    # -- tracked, shielded storage jobs -------------------------------------------------------

    async def _job(self, name: str, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work` under the volume's lock as a task the caller's cancellation cannot stop."""
        if self._closing:
            raise ShuttingDown("cva is shutting down; retry after it restarts")

        async def locked() -> T:
            async with self._locks[name]:
                return await work()

        task: asyncio.Task[T] = asyncio.create_task(locked(), name=f"cva-volume-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)  # a caller that gave up must not leave it unread
        return await asyncio.shield(task)

    async def drain(self, timeout: float) -> bool:
        """Refuse new work and wait up to `timeout` for in-flight jobs; True if all finished."""
        self._closing = True
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _done, still = await asyncio.wait(pending, timeout=timeout)
            if still:
                return False
        return True

    async def aclose(self) -> None:
        await self._keys.aclose()

    @property
    def busy(self) -> int:
        return sum(1 for t in self._tasks if not t.done())

    # -- RPC operations -----------------------------------------------------------------------

    def _rootfs(self, cid: str) -> Path:
        return policy.bundle_dir(self._rootfs_base, cid) / "rootfs"

    async def _container_volumes(self, cid: str) -> tuple[str, tuple[Volume, ...]]:
        """Container `cid`'s name (read from its guest-side bundle) and the contract's volumes
        for it; refuses a malformed id and any new work while cva shuts down."""
        policy.validate_container_id(cid)
        if self._closing:
            raise ShuttingDown("cva is shutting down; retry after it restarts")
        name = await asyncio.to_thread(policy.read_container_name, self._rootfs_base, cid)
        return name, policy.volumes_for_container(self._contract, name)

    async def prepare(self, cid: str) -> tuple[BoundVolume, ...]:
        name, vols = await self._container_volumes(cid)
        if not vols:
            return ()
        self._on_status(f"preparing {len(vols)} volume(s) for container {name}")
        vols = await self._resolve_disks(vols, cid)
        results = await _all_or_first_error(self._prepare_one(v, cid) for v in vols)
        self._on_status(f"ready; {len(self._opened)} volume(s) open")
        return tuple(results)

    async def open_for_container(self, cid: str) -> tuple[tuple[Volume, OpenedVolume], ...]:
        """The prestart hook's half of PrepareVolumes: open (fetch key, open/create, mount at
        the guest path) every volume the contract gives container `cid` (its name read from the
        guest-side bundle), without binding it anywhere; () when it gets none. The hook binds
        them inside the container's own mount namespace, then `record_bound` notes it."""
        name, vols = await self._container_volumes(cid)
        if not vols:
            return ()
        self._on_status(f"preparing {len(vols)} volume(s) for container {name} (prestart hook)")
        resolved = await self._resolve_disks(vols, cid)

        async def one(vol: Volume, use: Volume) -> tuple[Volume, OpenedVolume]:
            async def work() -> OpenedVolume:
                return await self._open_resolved(use)

            return vol, await self._job(vol.name, work)

        results = await _all_or_first_error(one(v, r) for v, r in zip(vols, resolved, strict=True))
        self._on_status(f"ready; {len(self._opened)} volume(s) open")
        return tuple(results)

    async def _open_resolved(self, use: Volume) -> OpenedVolume:
        """`_ensure_open` for a volume whose disk may have been resolved from a container's
        spec (called with the volume's lock held). When kata attached the PVC again under
        another MAJ:MIN (a restarted container), the volume open on the old, detached disk is
        closed first; the resolved form is kept for close."""
        if use.disk.kind == "devno":
            old = self._resolved.get(use.name)
            if old is not None and old.disk != use.disk and use.name in self._opened:
                await self._close(old)
            self._resolved[use.name] = use
        return await self._ensure_open(use)

    async def _resolve_disks(self, vols: tuple[Volume, ...], cid: str) -> tuple[Volume, ...]:
        """`container:<devicePath>` disks -> `devno:MAJ:MIN` from container `cid`'s own spec
        (agent.hook.devices); other volumes unchanged."""
        if not any(v.disk.kind == "container" for v in vols):
            return vols
        from agent.contract import DiskRef  # noqa: PLC0415
        from agent.hook.devices import spec_device  # noqa: PLC0415

        config = await asyncio.to_thread(policy.read_bundle_config, self._rootfs_base, cid)
        out = []
        for vol in vols:
            if vol.disk.kind == "container":
                major, minor = spec_device(config, vol.disk.value)
                vol = dataclasses.replace(vol, disk=DiskRef("devno", f"{major}:{minor}"))
            out.append(vol)
        return tuple(out)

    def record_bound(self, cid: str, names: tuple[str, ...]) -> None:
        """Note that the hook bound these volumes into container `cid` (ListVolumes shows it;
        the mounts live and die with the container's mount namespace)."""
        for name in names:
            if name in self._volumes:
                self._bindings.add(cid, name)

    async def open_volume(
        self,
        name: str,
        *,
        allow_create: bool = True,
        holder: str | None = None,
        device: str | None = None,
    ) -> OpenedVolume:
        """Open (fetch key, open/create, mount at its guest path) contract volume `name`, with no
        container binding (CDH SecureMount: the caller mounts it where it wants). With
        `allow_create=False` a blank disk is refused even when the contract's create = true.

        `holder` (e.g. "securemount:/run/kata-containers/x") is recorded like a container
        binding: ReleaseVolumes of a container does not close the volume while a holder
        remains; `release_holder` drops it. `device` (a /dev path) is the disk of a
        `disk = "securemount"` volume, named by the request (required for those, unused for
        the others, whose disk the contract names)."""
        vol = self._volumes.get(name)
        if vol is None:
            raise policy.RequestError(f"no contract volume named {name[:64]!r}")
        if vol.via_securemount:
            if device is None:
                raise policy.RequestError(
                    f"volume {name} is delivered through SecureMount; the request names its disk"
                )
            vol = dataclasses.replace(vol, disk=dataclasses.replace(vol.disk, value=device))
        if not allow_create and vol.create:
            vol = dataclasses.replace(vol, create=False)

        async def work() -> OpenedVolume:
            opened = await self._ensure_open(vol)
            if holder is not None:
                self._bindings.add(holder, name)
            return opened

        return await self._job(name, work)

    async def release_holder(self, name: str, holder: str) -> bool:
        """Drop `holder`'s claim on volume `name`; close the volume (unmount its guest path and
        deactivate) when no container or other holder still uses it. True if it was closed."""
        vol = self._volumes.get(name)
        if vol is None:
            return False

        async def work() -> bool:
            self._bindings.remove(holder, name)
            if self._bindings.containers_of(name) or name not in self._opened:
                return False
            await self._close(vol)
            return True

        return await self._job(name, work)

    async def _prepare_one(self, vol: Volume, cid: str) -> BoundVolume:
        rootfs = self._rootfs(cid)

        async def work() -> OpenedVolume:
            opened = await self._open_resolved(vol)
            await asyncio.to_thread(self._backend.bind, vol, opened, rootfs)
            self._bindings.add(cid, vol.name)
            return opened

        opened = await self._job(vol.name, work)
        return BoundVolume(
            name=vol.name,
            state=VolumeState.BOUND,
            guest_path=opened.guest_path,
            container_path=vol.mount,
            created=opened.created,
            device=opened.device,
            read_only=vol.read_only,
        )

    async def _ensure_open(self, vol: Volume) -> OpenedVolume:
        """Called with the volume's lock held. A volume opened here is measured before it is
        returned (and so before any bind); if that fails it is closed again."""
        known = self._opened.get(vol.name)
        if known is not None:
            return known
        opened = await asyncio.to_thread(self._backend.current, vol)
        if opened is not None:
            if self._measurer is not None and not self._measurer.is_measured(vol.name):
                from agent.measure import MeasureError  # noqa: PLC0415

                raise MeasureError(
                    f"volume {vol.name} is open but this boot has no measurement of it (cva"
                    " stopped between open and measure); release it and prepare it again"
                    " (rule measure-required)"
                )
        else:
            secret = await self._keys.get_resource(vol.key)
            previous = self._previous_key(vol)
            progress = self._scan_reporter(vol.name)
            try:
                if previous is None:  # the backend's 3-argument form (no rotation possible)
                    opened = await asyncio.to_thread(self._backend.open, vol, secret, progress)
                else:
                    opened = await asyncio.to_thread(
                        self._backend.open, vol, secret, progress, previous
                    )
            finally:
                secret.wipe()
                self._scans.pop(vol.name, None)
            if self._measurer is not None:
                try:
                    await asyncio.to_thread(self._measure_open, vol, opened)
                except BaseException:
                    await asyncio.to_thread(self._backend.close, vol)  # fail closed
                    raise
        self._opened[vol.name] = opened
        return opened

    def mounted(self) -> tuple[tuple[str, str], ...]:
        """(name, mapper device) of every volume this daemon run holds open."""
        return tuple((name, o.device) for name, o in self._opened.items())

    async def grow(self, name: str) -> GrowReport | None:
        """Grow volume `name` online if it is open here (luks.grow), under its lock; None: not
        open, or the backend cannot grow. A failure is logged and reported, not raised."""
        vol = self._volumes.get(name)
        backend = self._backend
        if vol is None or not isinstance(backend, GrowBackend):
            return None

        async def work() -> GrowReport | None:
            if name not in self._opened:
                return None
            fetch = self._key_fetcher(vol.key)
            try:
                report = await asyncio.to_thread(backend.grow, self._resolved.get(name, vol), fetch)
            except Exception as exc:  # noqa: BLE001 - reported in `cva status`; retried later
                report = GrowReport("failed", str(exc)[:300])
            self._grown[name] = report
            return report

        return await self._job(name, work)

    def _previous_key(self, vol: Volume) -> Callable[[], Secret] | None:
        """For a contract with previous_key: a blocking fetch of it through the shared KBS
        session, for the storage worker thread (asked only when the volume is still under it)."""
        uri = vol.previous_key
        if uri is None:
            return None
        return self._key_fetcher(uri)

    def _key_fetcher(self, uri: KbsResourceUri) -> Callable[[], Secret]:
        """A blocking fetch of `uri` through the shared KBS session, for a worker thread."""
        loop = asyncio.get_running_loop()

        def fetch() -> Secret:
            future = asyncio.run_coroutine_threadsafe(self._keys.get_resource(uri), loop)
            return future.result(timeout=PREVIOUS_KEY_TIMEOUT)

        return fetch

    def _measure_open(self, vol: Volume, opened: OpenedVolume) -> None:
        from agent.measure import MeasureError  # noqa: PLC0415

        assert self._measurer is not None
        if opened.identity is None:
            if self._measurer.enabled:
                raise MeasureError(
                    f"volume {vol.name}: the storage layer gave no header identity to measure"
                    " (rule measure-required)"
                )
            return
        if opened.rekey is not None:  # before the open event: the open names the new header
            self._measurer.rekeyed(
                opened.identity,
                old_key_id=opened.rekey.old_key_id,
                new_key_id=opened.rekey.new_key_id,
            )
        self._measurer.opened(opened.identity, created=opened.created)

    async def _close(self, vol: Volume) -> None:
        """Close the volume, then record its close event (a failure there is only logged)."""
        await asyncio.to_thread(self._backend.close, self._resolved.get(vol.name, vol))
        self._opened.pop(vol.name, None)
        self._grown.pop(vol.name, None)
        if self._measurer is not None:
            await asyncio.to_thread(self._measurer.closed, vol.name)

    def _scan_reporter(self, name: str) -> ScanProgress:
        """Progress of a volume's blank proof: ListVolumes shows it (PROVING_BLANK with bytes),
        and systemd's STATUS= line says it."""

        def report(what: str, done: int, total: int) -> None:
            scan = ScanStatus(what, done, total)
            self._scans[name] = scan
            self._on_status(
                f"proving volume {name} blank ({what}): {scan.percent}% of {total} bytes"
            )

        return report

    async def release(self, cid: str) -> Released:
        policy.validate_container_id(cid)
        names = self._bindings.volumes_of(cid)
        if not names:
            return Released((), ())
        rootfs = self._rootfs(cid)
        closed: list[str] = []

        async def release_one(vol: Volume) -> None:
            async def work() -> None:
                await asyncio.to_thread(self._backend.unbind, vol, rootfs)
                self._bindings.remove(cid, vol.name)
                if not self._bindings.containers_of(vol.name):
                    await self._close(vol)
                    closed.append(vol.name)

            await self._job(vol.name, work)

        vols = [self._volumes[n] for n in names if n in self._volumes]
        await _all_or_first_error(release_one(v) for v in vols)
        return Released(tuple(v.name for v in vols), tuple(sorted(closed)))

    async def list(self) -> tuple[VolumeStatus, ...]:
        out: list[VolumeStatus] = []
        for vol in self._contract.volumes:
            holders = self._bindings.containers_of(vol.name)
            cids = tuple(c for c in holders if not c.startswith(HOLDER_PREFIX))
            opened = self._opened.get(vol.name)
            scan = self._scans.get(vol.name)
            if holders:
                state = VolumeState.BOUND
            elif opened is not None:
                state = VolumeState.MOUNTED
            elif scan is not None:
                state = VolumeState.PROVING_BLANK
            else:
                state = await asyncio.to_thread(self._backend.state, vol)
            out.append(
                VolumeStatus(
                    name=vol.name,
                    state=state,
                    guest_path=opened.guest_path if opened else None,
                    device=opened.device if opened else None,
                    container_ids=cids,
                    containers=tuple(vol.containers),
                    scan=scan if state is VolumeState.PROVING_BLANK else None,
                    grow=self._grown.get(vol.name) if opened is not None else None,
                )
            )
        return tuple(out)


def _retrieve(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()


async def _all_or_first_error(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Run `calls` together, each to its end; then raise the first failure (in call order), else
    return their results."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [r for r in results if not isinstance(r, BaseException)]
