"""Test support for the daemon: contracts, guest-side bundles, an in-memory storage backend and
a fake key source (the only fakes: storage and KBS are real in their own suites and in the VM).

`agent.contract` is the foundation stream's module; until it is merged, a stand-in with exactly
the INTERFACES.md constructor signatures is installed so these tests build the same objects.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.secret import Secret
from agent.volumes import OpenedVolume, VolumeState


def _install_contract_standin() -> None:
    try:
        importlib.import_module("agent.contract")
        return
    except ImportError:
        pass
    mod = types.ModuleType("agent.contract")

    @dataclass(frozen=True)
    class KbsResourceUri:
        repo: str
        type: str
        tag: str
        plugin: str | None = None

        def __str__(self) -> str:
            return f"kbs:///{self.repo}/{self.type}/{self.tag}"

    @dataclass(frozen=True)
    class KbsConfig:
        url: str
        cert: str | None
        tee: str
        insecure_http: bool

    @dataclass(frozen=True)
    class ApiPolicy:
        allow: frozenset[str] = frozenset({"PrepareVolumes", "ReleaseVolumes", "ListVolumes"})

    @dataclass(frozen=True)
    class LvmSpec:
        vg: str
        lv: str
        size_bytes: int

    @dataclass(frozen=True)
    class DiskRef:
        kind: Literal["serial", "pci", "scsi"]
        value: str

    @dataclass(frozen=True)
    class Volume:
        name: str
        key: KbsResourceUri
        disk: DiskRef
        lvm: LvmSpec | None
        filesystem: Literal["ext4", "xfs"]
        mount: str
        containers: tuple[str, ...]
        create: bool
        integrity: bool
        read_only: bool

    @dataclass(frozen=True)
    class Contract:
        version: int
        kbs: KbsConfig
        api: ApiPolicy
        volumes: tuple[Volume, ...]

    for cls in (KbsResourceUri, KbsConfig, ApiPolicy, LvmSpec, DiskRef, Volume, Contract):
        cls.__module__ = "agent.contract"
        setattr(mod, cls.__name__, cls)
    sys.modules["agent.contract"] = mod


_install_contract_standin()
from agent import contract as C  # noqa: E402

KEY_MARKER = b"CVA-TEST-KEY-MATERIAL-DO-NOT-LOG!"  # 33 bytes: any leak is greppable


def volume(
    name: str,
    *,
    containers: tuple[str, ...] = (),
    mount: str | None = None,
    read_only: bool = False,
) -> Any:
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


def contract(*volumes: Any, allow: tuple[str, ...] | None = None) -> Any:
    api = (
        C.ApiPolicy(frozenset(allow))
        if allow is not None
        else C.ApiPolicy(frozenset({"PrepareVolumes", "ReleaseVolumes", "ListVolumes"}))
    )
    kbs = C.KbsConfig(url="http://127.0.0.1:1", cert=None, tee="sample", insecure_http=False)
    return C.Contract(version=1, kbs=kbs, api=api, volumes=tuple(volumes))


def contract_from_spec(spec: dict[str, Any]) -> Any:
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
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, op: str, name: str) -> None:
        with self._lock:
            self.calls.append((op, name))

    def current(self, vol: Any) -> OpenedVolume | None:
        self._record("current", vol.name)
        found = self.mounted.get(vol.name)
        return dataclasses.replace(found, created=False) if found else None

    def open(self, vol: Any, secret: Secret) -> OpenedVolume:
        self._record("open", vol.name)
        if len(secret) < 32:
            raise AssertionError("backend got a short key")
        self.keys_seen[vol.name] = len(secret)
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
        opened = OpenedVolume(
            vol.name, Path(f"/run/cva/volumes/{vol.name}"), f"/dev/mapper/cva-{vol.name}", created
        )
        self.mounted[vol.name] = opened
        return opened

    def bind(self, vol: Any, opened: OpenedVolume, rootfs: Path) -> None:
        self._record("bind", vol.name)
        assert vol.name in self.mounted
        self.bound.add((vol.name, str(rootfs)))

    def unbind(self, vol: Any, rootfs: Path) -> None:
        self._record("unbind", vol.name)
        self.bound.discard((vol.name, str(rootfs)))

    def close(self, vol: Any) -> None:
        self._record("close", vol.name)
        assert not any(n == vol.name for n, _ in self.bound), "close while bound"
        self.mounted.pop(vol.name, None)

    def state(self, vol: Any) -> VolumeState:
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

    async def get_resource(self, uri: Any) -> Secret:
        self.requests.append(str(uri))
        if self.fail is not None:
            raise self.fail
        s = Secret(KEY_MARKER + str(uri).encode())
        self.given.append(s)
        return s

    async def aclose(self) -> None:
        self.closed = True
