"""The `tdx` attester: quote via configfs-tsm (provider `tdx_guest`) or, without it, TDREPORT
(`TDX_CMD_GET_REPORT0`) + the host's QGS over vsock; MRCONFIGID from the kernel's measurement
sysfs (>= 6.16) or a TDREPORT.

Evidence as guest-components sends it (SPEC §c.2, §e.8): `{"cc_eventlog": base64(trimmed CCEL +
runtime entries + 8 x FF) or null, "quote": base64(quote)}`; report data is right-padded with
zeros to 64 bytes. The quote is parsed before it is sent, and its REPORTDATA must be the one
requested (fail closed).

Runtime entries: Trustee's TDX verifier replays the whole `cc_eventlog` against RTMR0-3 and
refuses the evidence when a register differs, so once anything extended RTMR3 (the Attestation
Agent's events, or cva's own with the `rtmr` measurement sink) the firmware CCEL alone no longer
verifies. Like the AA's attester, this one appends the runtime logs' entries (TCG2 AAEL entries,
`evidence.eventlog`): each file of `runtime_logs` (paths under `root`; default the AA's
`/run/attestation-agent/eventlog`; the daemon adds cva's own log) that exists, parses strictly
and extends only RTMRs (CC MR index 1-4) with SHA-384. A log of another register or bank (a TPM
sink's PCR log) is not part of the TDX evidence and is left out; a malformed one fails closed.
An event recorded between the quote and the read of its log makes the replay differ (Trustee
refuses, a retry succeeds): the AA's attester has the same window.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from evidence import qgs
from evidence.base import JSON
from evidence.ccel import trim_ccel
from evidence.errors import AttesterUnavailable, EvidenceError
from evidence.quote import parse_quote, parse_tdreport
from evidence.tsm import ConfigFs, TsmClient

TDX_CMD_GET_REPORT0 = 0xC4405401
REQ_SIZE = 64 + 1024
DEVICE = Path("dev/tdx_guest")
MRCONFIGID_SYSFS = Path("sys/devices/virtual/misc/tdx_guest/measurements/mrconfigid")
CCEL = Path("sys/firmware/acpi/tables/data/CCEL")
EL_END = b"\xff" * 8
MAX_CCEL = 64 * 1024 * 1024
AA_EVENTLOG = Path("run/attestation-agent/eventlog")
RTMR_INDICES = range(1, 5)  # CC MR index: MRTD = 0, RTMR0-3 = 1-4

Ioctl = Callable[[int, int, bytearray], int]


def _real_ioctl(fd: int, request: int, buf: bytearray) -> int:
    return int(fcntl.ioctl(fd, request, buf, True))


def pad_report_data(report_data: bytes) -> bytes:
    if len(report_data) > 64:
        raise EvidenceError(f"report data is {len(report_data)} bytes; at most 64 are allowed")
    return bytes(report_data).ljust(64, b"\0")


class TdxAttester:
    def __init__(
        self,
        root: Path = Path("/"),
        *,
        fs: ConfigFs | None = None,
        ioctl: Ioctl | None = None,
        qgs_connect: Callable[..., object] | None = None,
        runtime_logs: Sequence[Path] = (AA_EVENTLOG,),
    ) -> None:
        self.root = root
        self.runtime_logs = tuple(runtime_logs)
        self.tsm = TsmClient(root, fs=fs)
        self._ioctl: Ioctl = ioctl or _real_ioctl
        self._qgs_connect = qgs_connect

    @property
    def tee(self) -> str:
        return "tdx"

    def tdreport(self, report_data: bytes) -> bytes:
        """TDX_CMD_GET_REPORT0 on /dev/tdx_guest: the 1024-byte TDREPORT for 64 bytes of data."""
        rd = pad_report_data(report_data)
        path = self.root / DEVICE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise AttesterUnavailable(f"cannot open {path}: {exc.strerror}") from None
        try:
            buf = bytearray(rd + bytes(1024))
            self._ioctl(fd, TDX_CMD_GET_REPORT0, buf)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            raise AttesterUnavailable(f"TDX_CMD_GET_REPORT0 failed: {name}") from None
        finally:
            os.close(fd)
        report = bytes(buf[64:])
        parsed = parse_tdreport(report)
        if parsed.report_data != rd:
            raise AttesterUnavailable("TDREPORT carries different report data than requested")
        return report

    def quote(self, report_data: bytes) -> bytes:
        rd = pad_report_data(report_data)
        if self.tsm.available():
            raw = self.tsm.report(rd, provider="tdx_guest").outblob
        else:
            port = qgs.qgs_port(self.root)
            if port is None:
                raise AttesterUnavailable(
                    "no TDX quote path: configfs-tsm is missing and /etc/tdx-attest.conf names"
                    " no QGS vsock port"
                )
            kwargs = {"connect": self._qgs_connect} if self._qgs_connect else {}
            raw = qgs.get_quote(self.tdreport(rd), port, **kwargs)  # type: ignore[arg-type]
        quote = parse_quote(raw)
        if quote.body.report_data != rd:
            raise AttesterUnavailable("the TDX quote carries different report data than requested")
        return raw

    def runtime_entries(self) -> bytes:
        """The entries of every RTMR runtime log in `runtime_logs` (see the module docstring)."""
        from evidence.eventlog import ALG_SHA384, MAX_LOG_BYTES, EventLogError, parse_log  # noqa: PLC0415

        out = b""
        for rel in self.runtime_logs:
            path = self.root / rel
            try:
                with path.open("rb") as f:
                    data = f.read(MAX_LOG_BYTES + 1)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise AttesterUnavailable(f"cannot read {path}: {exc.strerror}") from None
            try:
                events = parse_log(data)
            except EventLogError as exc:
                raise AttesterUnavailable(
                    f"runtime event log {path} is malformed ({exc.message}); Trustee could not"
                    " replay RTMR3 with it"
                ) from None
            if all(e.register in RTMR_INDICES and e.alg == ALG_SHA384 for e in events):
                out += data
        return out

    def eventlog(self) -> str | None:
        """base64(trimmed CCEL + runtime entries + 8 x FF), or None when the firmware publishes
        no CCEL."""
        path = self.root / CCEL
        try:
            with path.open("rb") as f:
                data = f.read(MAX_CCEL + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AttesterUnavailable(f"cannot read {path}: {exc.strerror}") from None
        if len(data) > MAX_CCEL:
            raise AttesterUnavailable(f"{path} is larger than {MAX_CCEL} bytes")
        runtime = self.runtime_entries()
        return base64.b64encode(trim_ccel(data) + runtime + EL_END).decode("ascii")

    def evidence(self, report_data: bytes) -> JSON:
        quote = self.quote(report_data)
        return {
            "cc_eventlog": self.eventlog(),
            "quote": base64.b64encode(quote).decode("ascii"),
        }

    def initdata_binding(self) -> bytes | None:
        """MRCONFIGID (48 bytes): sysfs when the kernel has it, else from a TDREPORT."""
        path = self.root / MRCONFIGID_SYSFS
        try:
            with path.open("rb") as f:
                value = f.read(49)
        except FileNotFoundError:
            return parse_tdreport(self.tdreport(bytes(64))).mr_config_id
        except OSError as exc:
            raise AttesterUnavailable(f"cannot read {path}: {exc.strerror}") from None
        if len(value) != 48:
            raise AttesterUnavailable(f"{path} holds {len(value)} bytes, expected 48")
        return value
