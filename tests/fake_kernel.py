"""Faithful fakes of the kernel ABIs the TDX/SNP attesters use (no TDX/SNP hardware here).

`FakeTsm` is configfs-tsm (`sys/kernel/config/tsm/report` under a temp root): report directories
are real directories; attribute semantics follow drivers/virt/coco/guest/report.c: writes are
committed per write and bump `generation`, inblob > 64 bytes is EFBIG, reading outblob with no
inblob or a provider-rejected inblob size is EINVAL, no provider is ENXIO, `auxblob`/`privlevel`
exist only for sev_guest, privlevel below the floor is EINVAL. Hooks simulate a concurrent writer
and EBUSY. The ioctl fakes check the request number and buffer size and act on the same memory
layout the kernel does (SNP through the user-space addresses inside the request).
`FakeTdxMeasurements` is the TSM measurement sysfs of tdx_guest (RTMR read/extend, Linux >= 6.16).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from evidence.tsm import REPORT_DIR

Report = Callable[[str, bytes, int], tuple[bytes, bytes | None]]


@dataclass
class _Entry:
    generation: int = 0
    inblob: bytes | None = None
    privlevel: int = 0


@dataclass
class FakeTsm:
    root: Path
    provider: str | None
    make_report: Report
    privlevel_floor: int = 0
    busy: int = 0  # the next N outblob reads fail with EBUSY
    race_on_inblob: int = 0  # the next N inblob writes are followed by a foreign write
    race_on_read: int = 0  # the next N outblob reads see a foreign write
    entries: dict[str, _Entry] = field(default_factory=dict)
    reads: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)

    @property
    def base(self) -> Path:
        return self.root / REPORT_DIR

    def _entry(self, path: Path) -> _Entry:
        if path.parent.parent != self.base or path.parent.name not in self.entries:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return self.entries[path.parent.name]

    def mkdir(self, path: Path) -> None:
        if path.parent != self.base:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        os.mkdir(path)  # raises FileExistsError like configfs
        self.entries[path.name] = _Entry()

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)
        self.entries.pop(path.name, None)

    def _visible(self, attr: str) -> bool:
        common = {"inblob", "outblob", "provider", "generation"}
        sev = {"auxblob", "privlevel", "privlevel_floor"}
        return attr in common or (self.provider == "sev_guest" and attr in sev)

    def read(self, path: Path, limit: int) -> bytes:
        entry = self._entry(path)
        attr = path.name
        self.reads.append(attr)
        if not self._visible(attr):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if attr == "generation":
            return f"{entry.generation}\n".encode()
        if attr == "privlevel_floor":
            return f"{self.privlevel_floor}\n".encode()
        if attr in ("inblob", "privlevel"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        if self.provider is None:
            raise OSError(errno.ENXIO, "No such device or address", str(path))
        if attr == "provider":
            return f"{self.provider}\n".encode()
        # outblob / auxblob
        if entry.inblob is None:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        if len(entry.inblob) != 64:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        if self.busy:
            self.busy -= 1
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        if self.race_on_read and attr == "outblob":
            self.race_on_read -= 1
            entry.generation += 1
        out, aux = self.make_report(self.provider, entry.inblob, entry.privlevel)
        data = out if attr == "outblob" else (aux or b"")
        if len(data) > limit:
            raise OSError(errno.EFBIG, "File too large", str(path))
        return data

    def write(self, path: Path, data: bytes) -> None:
        entry = self._entry(path)
        attr = path.name
        if not self._visible(attr):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if attr == "inblob":
            if len(data) > 64:
                raise OSError(errno.EFBIG, "File too large", str(path))
            entry.inblob = bytes(data)
            entry.generation += 1
            if self.race_on_inblob:
                self.race_on_inblob -= 1
                entry.inblob = bytes(64)  # another process overwrote it
                entry.generation += 1
            return
        if attr == "privlevel":
            text = data.decode().strip()
            if not text.isdigit() or int(text) > 3 or int(text) < self.privlevel_floor:
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            entry.privlevel = int(text)
            entry.generation += 1
            return
        raise PermissionError(errno.EACCES, "Permission denied", str(path))


# ---------------------------------------------------------------------------------------------
# TDX: TDX_CMD_GET_REPORT0


@dataclass
class FakeTdxGuest:
    """/dev/tdx_guest's one ioctl: copies reportdata into a TDREPORT template (offset 128)."""

    template: bytes  # a 1024-byte TDREPORT
    mr_config_id: bytes | None = None
    fail: int | None = None  # errno to raise
    calls: int = 0

    def __call__(self, fd: int, request: int, buf: bytearray) -> int:
        self.calls += 1
        if request != 0xC4405401:
            raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
        if len(buf) != 1088:
            raise OSError(errno.EFAULT, "Bad address")
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        report = bytearray(self.template)
        report[128:192] = buf[:64]
        if self.mr_config_id is not None:
            report[576:624] = self.mr_config_id
        buf[64:] = report
        return 0


# ---------------------------------------------------------------------------------------------
# SNP: SNP_GET_EXT_REPORT


@dataclass
class FakeSevGuest:
    """/dev/sev-guest's SNP_GET_EXT_REPORT, acting on the request's user-space addresses."""

    make_report: Callable[[bytes, int], bytes]  # (user_data, vmpl) -> 1184-byte report
    certs: bytes = b""
    busy: int = 0
    calls: int = 0
    seen_certs_len: list[int] = field(default_factory=list)

    def __call__(self, fd: int, request: int, buf: bytearray) -> int:
        self.calls += 1
        if request != 0xC0205302:
            raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
        if len(buf) != 32:
            raise OSError(errno.EFAULT, "Bad address")
        version, req_addr, resp_addr, _ = struct.unpack("<B7xQQQ", bytes(buf))
        if version == 0:
            raise OSError(errno.EINVAL, "Invalid argument")
        req = ctypes.string_at(req_addr, 112)
        user_data, vmpl, _rsvd, certs_addr, certs_len = struct.unpack("<64sI28sQI4x", req)
        self.seen_certs_len.append(certs_len)
        if certs_len % 4096 or certs_len > 1024 * 1024:
            raise OSError(errno.EINVAL, "Invalid argument")
        if self.busy:
            self.busy -= 1
            struct.pack_into("<Q", buf, 24, 2 << 32)
            raise OSError(errno.EIO, "Input/output error")
        needed = (len(self.certs) + 4095) // 4096 * 4096
        if self.certs and certs_len < needed:
            ctypes.memmove(req_addr + 104, struct.pack("<I", needed), 4)
            struct.pack_into("<Q", buf, 24, 1 << 32)
            raise OSError(errno.EIO, "Input/output error")
        if self.certs:
            ctypes.memmove(certs_addr, self.certs, len(self.certs))
        report = self.make_report(user_data, vmpl)
        resp = struct.pack("<II", 0, len(report)) + bytes(24) + report
        ctypes.memmove(resp_addr, resp, len(resp))
        return 0


# ---------------------------------------------------------------------------------------------
# TDX: the TSM measurement sysfs (Linux >= 6.16), /sys/devices/virtual/misc/tdx_guest/measurements


@dataclass
class FakeTdxMeasurements:
    """tsm-mr.c + tdx-guest.c: `rtmr0..3:sha384` (RW), `mrtd:sha384`, `mrconfigid`, `mrowner`,
    `mrownerconfig` (RO), each a 48-byte binary attribute. Files are materialised under `root`
    (so `is_file()` sees them); reads and writes go through this object (an `MrFs`). A write
    must be exactly 48 bytes (else EINVAL, as tm_digest_write) and is TDG.MR.RTMR.EXTEND:
    RTMR := SHA-384(RTMR || data). A read returns the whole value (the bin attribute's size)."""

    root: Path
    mr_config_id: bytes = bytes(48)
    rtmrs: list[bytes] = field(default_factory=lambda: [bytes(48)] * 4)
    fail_write: int | None = None  # errno for the next writes
    value_size: int = 48  # what a read returns (a wrong-size file, as a non-sysfs root would give)
    writes: list[tuple[int, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        for name in self._names():
            (self.base / name).touch()

    @property
    def base(self) -> Path:
        return self.root / "sys/devices/virtual/misc/tdx_guest/measurements"

    @staticmethod
    def _names() -> list[str]:
        rtmrs = [f"rtmr{i}:sha384" for i in range(4)]
        return [*rtmrs, "mrtd:sha384", "mrconfigid", "mrowner", "mrownerconfig"]

    def _name(self, path: Path) -> str:
        if path.parent != self.base or path.name not in self._names():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return path.name

    def extend(self, index: int, data: bytes) -> None:
        """What the TDX module does for TDG.MR.RTMR.EXTEND (also: a foreign writer)."""
        self.rtmrs[index] = hashlib.sha384(self.rtmrs[index] + data).digest()

    def read(self, path: Path, limit: int) -> bytes:
        name = self._name(path)
        if name.startswith("rtmr"):
            value = self.rtmrs[int(name[4])]
        elif name == "mrconfigid":
            value = self.mr_config_id
        else:
            value = bytes(48)
        value = (value * 2)[: self.value_size]
        return value[: limit + 1]

    def write(self, path: Path, data: bytes) -> None:
        name = self._name(path)
        if not name.startswith("rtmr"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        if len(data) != 48:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        if self.fail_write is not None:
            raise OSError(self.fail_write, os.strerror(self.fail_write), str(path))
        self.writes.append((int(name[4]), bytes(data)))
        self.extend(int(name[4]), data)
