"""The `snp` attester: report via configfs-tsm (provider `sev_guest`, `privlevel` = VMPL, cert
table from `auxblob`) or `SNP_GET_EXT_REPORT` on /dev/sev-guest (grow the cert buffer on
`vmm_error = 1`, retry on BUSY); HOST_DATA for the initdata binding.

Evidence (SPEC §c.3): `{"attestation_report": <serde JSON of the report>, "cert_chain":
[{"cert_type", "data"}...] or null}`. The report is parsed before it is sent and its REPORT_DATA
must be the one requested (fail closed).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from pathlib import Path

from evidence.base import JSON
from evidence.errors import AttesterUnavailable
from evidence.snp_report import REPORT_SIZE, parse_cert_table, parse_report, report_to_json
from evidence.tdx import Ioctl, _real_ioctl, pad_report_data
from evidence.tsm import ConfigFs, TsmClient

SNP_GET_EXT_REPORT = 0xC0205302
DEVICE = Path("dev/sev-guest")
RESP_SIZE = 4000
PAGE = 4096
INITIAL_CERTS = 4 * PAGE
MAX_CERTS = 1024 * 1024
VMM_ERR_INVALID_LEN = 1
VMM_ERR_BUSY = 2
# struct snp_guest_request_ioctl { u8 msg_version; u64 req_data; u64 resp_data; u64 exitinfo2; }
GUEST_REQ = struct.Struct("<B7xQQQ")
# struct snp_ext_report_req { snp_report_req {user_data[64], vmpl u32, rsvd[28]}, u64, u32 }
EXT_REQ = struct.Struct("<64sI28sQI4x")


class SnpAttester:
    def __init__(
        self,
        root: Path = Path("/"),
        *,
        fs: ConfigFs | None = None,
        ioctl: Ioctl | None = None,
        vmpl: int = 0,
        attempts: int = 5,
        busy_wait: float = 1.0,
    ) -> None:
        self.root = root
        self.tsm = TsmClient(root, fs=fs, busy_wait=busy_wait)
        self._ioctl: Ioctl = ioctl or _real_ioctl
        self.vmpl = vmpl
        self.attempts = attempts
        self.busy_wait = busy_wait

    @property
    def tee(self) -> str:
        return "snp"

    def _ext_report(self, rd: bytes) -> tuple[bytes, bytes | None]:
        path = self.root / DEVICE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise AttesterUnavailable(f"cannot open {path}: {exc.strerror}") from None
        try:
            certs_len = INITIAL_CERTS
            for _ in range(max(1, self.attempts)):
                certs = ctypes.create_string_buffer(certs_len)
                resp = ctypes.create_string_buffer(RESP_SIZE)
                req = ctypes.create_string_buffer(
                    EXT_REQ.pack(rd, self.vmpl, bytes(28), ctypes.addressof(certs), certs_len)
                )
                guest = bytearray(
                    GUEST_REQ.pack(1, ctypes.addressof(req), ctypes.addressof(resp), 0)
                )
                try:
                    self._ioctl(fd, SNP_GET_EXT_REPORT, guest)
                except OSError as exc:
                    exitinfo2 = GUEST_REQ.unpack(bytes(guest))[3]
                    vmm_error, fw_error = exitinfo2 >> 32, exitinfo2 & 0xFFFFFFFF
                    if vmm_error == VMM_ERR_INVALID_LEN:
                        needed = EXT_REQ.unpack(req.raw[: EXT_REQ.size])[4]
                        if not certs_len < needed <= MAX_CERTS or needed % PAGE:
                            raise AttesterUnavailable(
                                f"SNP_GET_EXT_REPORT asks for a {needed}-byte certificate buffer"
                            ) from None
                        certs_len = needed
                        continue
                    if vmm_error == VMM_ERR_BUSY:
                        time.sleep(self.busy_wait)
                        continue
                    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                    raise AttesterUnavailable(
                        f"SNP_GET_EXT_REPORT failed: {name} (fw_error {fw_error:#x},"
                        f" vmm_error {vmm_error:#x})"
                    ) from None
                return _report_from_response(resp.raw), _certs_or_none(certs.raw)
            raise AttesterUnavailable(
                f"SNP_GET_EXT_REPORT did not succeed after {self.attempts} attempts (busy)"
            )
        finally:
            os.close(fd)

    def report(self, report_data: bytes) -> tuple[bytes, bytes | None]:
        rd = pad_report_data(report_data)
        if self.tsm.available():
            got = self.tsm.report(rd, provider="sev_guest", privlevel=self.vmpl, auxblob=True)
            raw, certs = got.outblob, got.auxblob
        elif (self.root / DEVICE).exists():
            raw, certs = self._ext_report(rd)
        else:
            raise AttesterUnavailable("no SNP report path: neither configfs-tsm nor /dev/sev-guest")
        report = parse_report(raw)
        if report.report_data != rd:
            raise AttesterUnavailable("the SNP report carries different report data than requested")
        return raw, certs

    def evidence(self, report_data: bytes) -> JSON:
        raw, certs = self.report(report_data)
        chain = [e.to_json() for e in parse_cert_table(certs)] if certs else None
        return {
            "attestation_report": report_to_json(parse_report(raw)),
            "cert_chain": chain or None,
        }

    def initdata_binding(self) -> bytes | None:
        """HOST_DATA (32 bytes) from a report with zero report data."""
        raw, _ = self.report(bytes(64))
        return parse_report(raw).host_data


def _report_from_response(resp: bytes) -> bytes:
    status, size = struct.unpack_from("<II", resp, 0)
    if status != 0:
        raise AttesterUnavailable(f"SNP firmware returned status {status:#x} for the report")
    if size != REPORT_SIZE:
        raise AttesterUnavailable(f"SNP report response size {size}, expected {REPORT_SIZE}")
    return resp[0x20 : 0x20 + REPORT_SIZE]


def _certs_or_none(buf: bytes) -> bytes | None:
    return buf if buf[:24] != bytes(24) else None
