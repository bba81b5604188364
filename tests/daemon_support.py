"""Test support for the daemon: contracts, guest-side bundles, an in-memory storage backend and
a fake key source (the only fakes: storage and KBS are real in their own suites and in the VM).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import contract as C
from agent.volumes import OpenedVolume, Rekey, ScanProgress, VolumeState
from luks.secret import Secret

KEY_MARKER = b"CVA-TEST-KEY-MATERIAL-DO-NOT-LOG!"  # 33 bytes: any leak is greppable
# The image config a test image uses for the sample TEE (no hardware): both keys, explicitly.
SAMPLE_IMAGE_CONFIG = '[evidence]\ntee = "sample"\nallow_sample = true\n'


def volume(
    name: str,
    *,
    containers: tuple[str, ...] = (),
    mount: str | None = None,
    read_only: bool = False,
) -> C.Volume:
    return C.Volume(
        name=name,
        key=C.KbsResourceUri("default", name, "luks"),
        disk=C.DiskRef("serial", name),
        lvm=None,
        filesystem="ext4",
        mount=mount or f"/data/{name}",
        containers=containers,
        create=True,
        integrity=False,
        read_only=read_only,
    )


def contract(*volumes: C.Volume, allow: tuple[str, ...] | None = None) -> C.Contract:
    api = (
        C.ApiPolicy(frozenset(allow))
        if allow is not None
        else C.ApiPolicy(frozenset({"PrepareVolumes", "ReleaseVolumes", "ListVolumes"}))
    )
    kbs = C.KbsConfig(url="http://127.0.0.1:1", cert=None, tee="auto", insecure_http=False)
    return C.Contract(version=1, kbs=kbs, api=api, volumes=tuple(volumes))


def contract_from_spec(spec: dict[str, Any]) -> C.Contract:
    """{"allow": [...], "volumes": [{"name":..., "containers": [...]}, ...]} -> Contract."""
    vols = [
        volume(v["name"], containers=tuple(v.get("containers", ())), mount=v.get("mount"))
        for v in spec["volumes"]
    ]
    allow = spec.get("allow")
    return contract(*vols, allow=tuple(allow) if allow is not None else None)


def make_bundle(rootfs_base: Path, cid: str, container_name: str | None) -> Path:
    """A guest-side OCI bundle `<base>/<cid>/{config.json,rootfs}` like kata-agent writes."""
    bundle = rootfs_base / cid
    (bundle / "rootfs").mkdir(parents=True, exist_ok=True)
    annotations = {"io.kubernetes.cri.container-type": "container"}
    if container_name is not None:
        annotations["io.kubernetes.cri.container-name"] = container_name
    (bundle / "config.json").write_text(
        json.dumps({"ociVersion": "1.1.0", "annotations": annotations})
    )
    return bundle


@dataclass
class MemoryBackend:
    """The storage layer as state in memory: what is formatted, mounted and bound where."""

    formatted: set[str] = field(default_factory=set)
    mounted: dict[str, OpenedVolume] = field(default_factory=dict)
    bound: set[tuple[str, str]] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)
    keys_seen: dict[str, int] = field(default_factory=dict)  # volume -> key length
    fail_open: dict[str, Exception] = field(default_factory=dict)
    open_barrier: threading.Barrier | None = None  # proves parallel opens
    open_gate: threading.Event | None = None  # holds opens until set
    open_delay: float = 0.0
    scan_report: tuple[str, int, int] | None = None  # reported as blank-proof progress on open
    rotate: dict[str, bool] = field(default_factory=dict)  # volume -> fetch the previous key
    previous_seen: dict[str, int] = field(default_factory=dict)  # volume -> previous key length
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, op: str, name: str) -> None:
        with self._lock:
            self.calls.append((op, name))

    def current(self, vol: C.Volume) -> OpenedVolume | None:
        self._record("current", vol.name)
        found = self.mounted.get(vol.name)
        return dataclasses.replace(found, created=False) if found else None

    def open(
        self,
        vol: C.Volume,
        secret: Secret,
        progress: ScanProgress | None = None,
        previous: Callable[[], Secret] | None = None,
    ) -> OpenedVolume:
        self._record("open", vol.name)
        rekey = None
        if self.rotate.get(vol.name) and previous is not None:  # as luks.rotation asks for it
            with previous() as old:
                self.previous_seen[vol.name] = len(old)
            rekey = Rekey(b"\x0b" * 32, b"\x0c" * 32)
        if len(secret) < 32:
            raise AssertionError("backend got a short key")
        self.keys_seen[vol.name] = len(secret)
        if self.scan_report is not None and progress is not None:
            progress(*self.scan_report)
        if self.open_barrier is not None:
            self.open_barrier.wait()
        if self.open_gate is not None:
            self.open_gate.wait(30)
        if self.open_delay:
            threading.Event().wait(self.open_delay)
        if vol.name in self.fail_open:
            raise self.fail_open[vol.name]
        created = vol.name not in self.formatted
        self.formatted.add(vol.name)
        from agent.measure import VolumeIdentity

        identity = VolumeIdentity(
            vol.name,
            str(uuid.uuid5(uuid.NAMESPACE_DNS, vol.name)),
            hashlib.sha256(vol.name.encode()).digest(),
            vol.filesystem,
            vol.read_only,
        )
        opened = OpenedVolume(
            vol.name,
            Path(f"/run/cva/volumes/{vol.name}"),
            f"/dev/mapper/cva-{vol.name}",
            created,
            identity,
            rekey,
        )
        self.mounted[vol.name] = opened
        return opened

    def bind(self, vol: C.Volume, opened: OpenedVolume, rootfs: Path) -> None:
        self._record("bind", vol.name)
        assert vol.name in self.mounted
        self.bound.add((vol.name, str(rootfs)))

    def unbind(self, vol: C.Volume, rootfs: Path) -> None:
        self._record("unbind", vol.name)
        self.bound.discard((vol.name, str(rootfs)))

    def close(self, vol: C.Volume) -> None:
        self._record("close", vol.name)
        assert not any(n == vol.name for n, _ in self.bound), "close while bound"
        self.mounted.pop(vol.name, None)

    def state(self, vol: C.Volume) -> VolumeState:
        if vol.name in self.mounted:
            return VolumeState.MOUNTED
        return VolumeState.READY if vol.name in self.formatted else VolumeState.ABSENT


class FakeKeySource:
    """Hands out KEY_MARKER-based keys and keeps every Secret it gave, to check they are wiped."""

    def __init__(self, *, fail: Exception | None = None) -> None:
        self.requests: list[str] = []
        self.given: list[Secret] = []
        self.fail = fail
        self.closed = False

    async def get_resource(self, uri: C.KbsResourceUri) -> Secret:
        self.requests.append(str(uri))
        if self.fail is not None:
            raise self.fail
        s = Secret(KEY_MARKER + str(uri).encode())
        self.given.append(s)
        return s

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class FakeGuest:
    """The guest I/O of the SecureMount backend (agent.securemount.volumes.GuestOps) as state:
    devices by MAJ:MIN, bind mounts and links as sets, ephemeral volumes as records. Tests take
    a mount away (`unmount`) the way kata-agent would."""

    devices: dict[tuple[int, int], Any] = field(default_factory=dict)  # -> DeviceIdentity
    binds: list[tuple[Path, Path, bool]] = field(default_factory=list)
    links: dict[Path, Path] = field(default_factory=dict)  # target -> device
    made: list[Any] = field(default_factory=list)  # EphemeralSpec, in order
    released: list[str] = field(default_factory=list)  # mapper names
    fail_create: Exception | None = None
    fail_bind: Exception | None = None
    devices_bound: list[Path] = field(default_factory=list)  # the device given with each bind
    create_gate: threading.Event | None = None  # holds create_ephemeral until set

    def resolve(self, selector: Any) -> Any:
        if selector.device_id is None:  # devicePath (CAA's requests): the device with that path
            [found] = [d for d in self.devices.values() if d.path == selector.device_path]
            return found
        return self.devices[selector.device_id]

    def bind(self, source: Path, device: Path, target: Path, read_only: bool, rules: Any) -> Path:
        if self.fail_bind is not None:
            raise self.fail_bind
        self.devices_bound.append(device)
        self.binds.append((source, target, read_only))
        return target

    def is_bound(self, source: Path, target: Path) -> bool:
        return any((s, t) == (source, target) for s, t, _ro in self.binds)

    def unmount(self, target: Path) -> None:
        self.binds = [b for b in self.binds if b[1] != target]

    def link(self, device: Path, target: Path, rules: Any) -> Path:
        self.links[target] = device
        return target

    def is_linked(self, device: Path, target: Path) -> bool:
        return self.links.get(target) == device

    def unlink(self, device: Path, target: Path) -> None:
        if self.links.get(target) == device:
            del self.links[target]

    def create_ephemeral(self, spec: Any) -> Any:
        from luks.ephemeral import EphemeralVolume

        if self.create_gate is not None:
            self.create_gate.wait(30)
        if self.fail_create is not None:
            raise self.fail_create
        self.made.append(spec)
        return EphemeralVolume(
            mapper=spec.mapper,
            mapper_device=Path("/dev/mapper") / spec.mapper,
            header=spec.header,
            mount_dir=spec.mount_dir,
            luks_uuid=str(uuid.uuid5(uuid.NAMESPACE_DNS, spec.mapper)),
            header_sha256=hashlib.sha256(spec.mapper.encode()).digest(),
        )

    def release_ephemeral(self, vol: Any) -> None:
        self.released.append(vol.mapper)

    def ops(self) -> Any:
        from agent.securemount.volumes import GuestOps

        return GuestOps(
            resolve=self.resolve,
            bind=self.bind,
            is_bound=self.is_bound,
            link=self.link,
            is_linked=self.is_linked,
            unlink=self.unlink,
            create_ephemeral=self.create_ephemeral,
            release_ephemeral=self.release_ephemeral,
        )
