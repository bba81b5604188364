"""What the storage stack needs to know about one volume: `VolumeSpec` (and its `LvmSpecLike`).

Structural types: the storage layer names the fields it reads and nothing else (no key URI, no
containers, no mount point inside a container, no disk reference: the caller finds the disk and
passes its path). The application's contract volume (agent.contract.Volume) satisfies it as it is;
mypy checks that where agent.luks_backend passes one in.
"""

from __future__ import annotations

from typing import Literal, Protocol


class LvmSpecLike(Protocol):
    """One linear LV on the disk's PV: volume group, logical volume, size in bytes (None: "max",
    the VG's free space)."""

    @property
    def vg(self) -> str: ...

    @property
    def lv(self) -> str: ...

    @property
    def size_bytes(self) -> int | None: ...


class VolumeSpec(Protocol):
    """A persistent volume as luks.volume prepares and releases it."""

    @property
    def name(self) -> str: ...

    @property
    def lvm(self) -> LvmSpecLike | None: ...

    @property
    def filesystem(self) -> Literal["ext4", "xfs"]: ...

    @property
    def create(self) -> bool: ...

    @property
    def integrity(self) -> bool: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def blank_check(self) -> Literal["full", "sampled"]:
        """How a target is proven blank before a format (luks.blankproof)."""
        ...
