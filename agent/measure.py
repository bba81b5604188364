"""Measured volumes: one AAEL event per volume create/open/close, before anyone gets the volume.

The event (`evidence.volume_event`): domain `cva`, operation `volume-create` | `volume-open` |
`volume-close` (ephemeral SecureMount volumes: `ephemeral-create` | `ephemeral-close`), content
canonical (RFC 8785) JSON with fs, header-sha256, name, ro, seq (persistent volumes: the
sequence in the MAC'd token, luks.token), uuid, v: the LUKS UUID and the SHA-256 of the header
metadata cva validated (the canonical metadata its token MAC covers,
luks.token.canonical_metadata: keyslots, segments, digests, config; no tokens, no seqid), from
the in-memory copy cva checked and activated from -- never re-read from the disk. Typed fields
only: no key material can get into an event.

Where it goes is the image's choice (`[measure]` in /etc/cva/config.toml, agent.config):
* `aa`: the Attestation Agent's `ExtendRuntimeMeasurement` over ttRPC (agent.aa_client); the
  AA keeps the log (/run/attestation-agent/eventlog) and extends its register (RegisterIndex =
  `pcr`, or unset: the AA's `init_pcr`, 17 by default);
* `tpm`: cva extends a TPM PCR itself (default 23: the application PCR, extendable at locality
  0, not used by firmware, the boot chain, IMA, systemd or cva's initdata binding (8); it starts
  at zero each boot) and keeps its own log in the AA's format at `log` (tmpfs) with the AA's
  write-ahead recovery (evidence.measure_log), run at start. Only when the image's TEE
  decision (agent.trust) is `tpm` (which `vtpm_in_tee` covers): the host can attach an
  emulated TPM to any VM, so on TDX/SNP (or sample) a TPM register is the host's, and an
  event in it would satisfy `required` while no verifier of the TEE's evidence ever sees it;
* `rtmr` (TDX): cva extends RTMR3 itself through the kernel's measurement sysfs (Linux >= 6.16,
  evidence.tdx_rtmr) with SHA-384 entries in its own log, register index 4 (the CC MR index
  the AA's `pcr_to_ccmr` gives its PCRs 16..23: the AA's events land in the same register and
  name it the same way), same write-ahead recovery;
* `auto` (default): decided at the first event and then kept: cva's own log already exists this
  boot -> the direct sink (rtmr on TDX when the kernel has it, tpm when the TEE is tpm); else
  the AA when its socket exists (kata-agent starts the AA before it calls anything); else, when
  the image's TEE decision (agent.trust, never the contract) is TDX and the kernel has the RTMR
  sysfs, rtmr; else, when that decision is tpm and the TCTI's device exists, tpm; else no sink
  (on TDX/SNP: the error names the AA and, on TDX, a Linux >= 6.16 kernel);
* `none`: nothing is measured.
`required = true` (default): when an event cannot be recorded the operation fails and the
volume is closed again before anyone got it; `false`: a warning, and the volume is handed out.
A volume-close event is recorded after the close; if it fails the volume stays closed and the
failure is logged (a log without the close event errs on the side of "still open").

What the host can drive is bounded (issue 21 #5e): every open/close cycle it requests
(PrepareVolumes/ReleaseVolumes, SecureMount and the pod's end) adds two events, and a log past
the parser's limits (evidence.eventlog: 65,536 entries, 16 MiB) would make every later event
and cva's own restart fail for the rest of the boot. So each boot has an event budget
(`EventBudget`, counted in `<state_dir>/measure-budget.json`, tmpfs, so a restarted cva keeps
counting): `per_volume` events for each contract volume (at most 64 volumes) and one shared
`ephemeral` pool for SecureMount's ephemeral volumes (any mapper name). An open is recorded only
while its pool has room for it and its later close (so a close always fits); past that, opening
that volume (or any ephemeral one) is refused, naming the budget, until the next boot. The
defaults keep cva's whole log under the parser's limits at the largest event cva can write, so
the daemon always starts again and keeps handing out the volumes still open (measured).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import DEFAULT_MEASURE_PCR, RTMR_MEASURE_PCRS, DaemonConfig, MeasureConfig
from agent.errors import REFUSALS, CvaError
from agent.log import get_logger
from agent.statefile import write_private
from evidence.errors import EvidenceFailure
from evidence.volume_event import DOMAIN, VolumeEvent, VolumeOperation, volume_aael

if TYPE_CHECKING:
    from evidence.measure_log import DirectLog, Register
    from evidence.tdx_rtmr import TdxRtmr

BUDGET_FILE = "measure-budget.json"
RegisterFactory = Callable[[str, int], "Register"]  # (tcti, pcr) -> the register
RtmrFactory = Callable[[int], "TdxRtmr"]  # RTMR index -> the register
RTMR_INDEX = 3  # RTMR3 = CC MR 4, where the AA's pcr_to_ccmr puts PCRs 16..23 (its 17 and 23)

log = get_logger("cva.measure")
_FAILED_PRECONDITION = 9  # gRPC / ttRPC status code
EPHEMERAL_KEY = "ephemeral:"


class MeasureError(CvaError):
    """A volume event could not be recorded while the image requires it."""

    rpc_code = _FAILED_PRECONDITION


MAX_CONTRACT_VOLUMES = 64  # agent.contract: a contract names 0..64 volumes
EPHEMERAL_POOL = "ephemeral"


@dataclass(frozen=True)
class EventBudget:
    """Events per boot: per contract volume, and shared by all ephemeral volumes."""

    per_volume: int = 512  # 256 open/close cycles of one volume per boot
    ephemeral: int = 4096  # 2048 ephemeral volumes per boot
    # of a volume's events, at most this many `volume-rekey` (the largest event: two key ids); a
    # rotation happens once, more only when the host puts a header under the previous key back
    rekeys_per_volume: int = 4

    def limit(self, pool: str) -> int:
        return self.ephemeral if pool == EPHEMERAL_POOL else self.per_volume

    @property
    def total(self) -> int:
        return MAX_CONTRACT_VOLUMES * self.per_volume + self.ephemeral


def budget_pool(key: str) -> str:
    """The pool an opened-set key counts against: its contract volume, or the ephemeral pool."""
    return EPHEMERAL_POOL if key.startswith(EPHEMERAL_KEY) else key


@dataclass(frozen=True)
class VolumeIdentity:
    """What a volume event says about a volume (everything but the operation)."""

    name: str
    luks_uuid: str
    header_sha256: bytes
    filesystem: str
    read_only: bool
    sequence: int | None = None

    def event(
        self,
        operation: VolumeOperation,
        new_key_id: bytes | None = None,
        old_key_id: bytes | None = None,
    ) -> VolumeEvent:
        return VolumeEvent(
            operation,
            self.name,
            self.luks_uuid,
            self.header_sha256,
            self.filesystem,
            self.read_only,
            self.sequence,
            new_key_id,
            old_key_id,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "uuid": self.luks_uuid,
            "header_sha256": self.header_sha256.hex(),
            "fs": self.filesystem,
            "ro": self.read_only,
            "seq": self.sequence,
        }

    @classmethod
    def from_json(cls, doc: object) -> VolumeIdentity | None:
        if not isinstance(doc, dict):
            return None
        try:
            ident = cls(
                str(doc["name"]),
                str(doc["uuid"]),
                bytes.fromhex(str(doc["header_sha256"])),
                str(doc["fs"]),
                bool(doc["ro"]),
                doc["seq"] if isinstance(doc.get("seq"), int) else None,
            )
            ident.event(VolumeOperation.OPEN)  # validates every field
        except (KeyError, ValueError, EvidenceFailure):
            return None
        return ident


class _TpmRegister:
    """One SHA-256 PCR through evidence.tpm (tpm2-pytss), as an evidence.measure_log.Register."""

    def __init__(self, tcti: str, pcr: int) -> None:
        from evidence.tpm import TpmAttester  # noqa: PLC0415 - lazy: loads libtss2

        self._tpm = TpmAttester(tcti)
        self._pcr = pcr

    def read(self) -> bytes:
        return self._tpm.read_pcr(self._pcr)

    def extend(self, digest: bytes) -> None:
        self._tpm.extend_pcr(self._pcr, digest)


@dataclass(frozen=True)
class LastEvent:
    """The last event cva tried to record for one volume key (for `cva status`)."""

    operation: str  # volume-create | volume-open | volume-close | ...
    sink: str | None  # where it went; None: not recorded (required = false)
    at: float  # unix time


class Measurer:
    """Records volume events in the sink the image config chose; blocking (worker threads).

    It also remembers (in `<state_dir>/measured.json`, tmpfs) which volumes this boot measured
    as opened, with their identity: the close event needs it, and a volume a restarted cva
    finds mounted is handed out only if it was measured."""

    def __init__(
        self,
        config: MeasureConfig,
        *,
        log_path: Path,
        state_path: Path | None = None,
        register_factory: RegisterFactory | None = None,
        tee: str | None = None,
        rtmr_factory: RtmrFactory | None = None,
        budget: EventBudget | None = None,
    ) -> None:
        self._config = config
        self._log_path = log_path
        self._state_path = state_path
        self._register_factory: RegisterFactory = register_factory or _TpmRegister
        self._tee = tee  # the image's TEE decision (agent.trust): `auto` tries RTMR3 on tdx
        self._rtmr_factory: RtmrFactory = rtmr_factory or _tdx_rtmr
        self._lock = threading.Lock()
        self._sink: str | None = None if config.sink == "auto" else config.sink
        self._direct: DirectLog | None = None
        self._opened: dict[str, VolumeIdentity] = self._load()
        self._budget = budget or EventBudget()
        self._used: dict[str, int] = self._load_used()
        self._last: dict[str, LastEvent] = {}

    @classmethod
    def from_config(cls, config: DaemonConfig, *, tee: str | None = None) -> Measurer:
        return cls(
            config.measure,
            log_path=config.measure_log,
            state_path=config.paths.state_dir / "measured.json",
            tee=tee,
        )

    @property
    def enabled(self) -> bool:
        return self._config.sink != "none"

    @property
    def required(self) -> bool:
        return self._config.required

    @property
    def tee(self) -> str | None:
        """The image's TEE decision this measurer was given (`auto` tries RTMR3 on tdx)."""
        return self._tee

    @property
    def sink(self) -> str | None:
        """The sink in use (None: `auto`, not decided yet)."""
        return self._sink

    # -- identities of opened volumes (tmpfs) -------------------------------------------------

    def _load(self) -> dict[str, VolumeIdentity]:
        if self._state_path is None:
            return {}
        try:
            doc = json.loads(self._state_path.read_text())
        except (OSError, ValueError, RecursionError):
            return {}
        out: dict[str, VolumeIdentity] = {}
        if isinstance(doc, dict):
            for name, item in doc.items():
                ident = VolumeIdentity.from_json(item)
                if ident is not None and isinstance(name, str):
                    out[name] = ident
        return out

    def _save(self) -> None:
        if self._state_path is None:
            return
        doc = {n: i.to_json() for n, i in self._opened.items()}
        write_private(self._state_path, json.dumps(doc, sort_keys=True))

    def _used_path(self) -> Path | None:
        return None if self._state_path is None else self._state_path.with_name(BUDGET_FILE)

    def _load_used(self) -> dict[str, int]:
        path = self._used_path()
        if path is None:
            return {}
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:
            # tmpfs, written only by cva: unreadable means tampering or a bug, never "fresh"
            raise MeasureError(
                f"cannot read the event budget {path} ({exc}); restart the VM"
            ) from None
        if not isinstance(doc, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in doc.items()
        ):
            raise MeasureError(f"the event budget {path} is malformed; restart the VM")
        return dict(doc)

    def _save_used(self) -> None:
        path = self._used_path()
        if path is not None:
            write_private(path, json.dumps(self._used, sort_keys=True))

    def _spend(self, key: str, operation: VolumeOperation, name: str) -> None:
        """Count one event against its pool; an open needs room for itself and its close."""
        pool = budget_pool(key)
        used = self._used.get(pool, 0)
        limit = self._budget.limit(pool)
        if operation.closes:
            need = 1  # reserved when its volume was opened
        else:  # this open, its close, and the closes of the pool's volumes still open
            still_open = sum(1 for k in self._opened if k != key and budget_pool(k) == pool)
            need = 2 + still_open
        rekeys = f"{pool}/rekey"  # never a pool name: contract names have no "/"
        rekey_limit = self._budget.rekeys_per_volume
        if operation is VolumeOperation.REKEY and self._used.get(rekeys, 0) >= rekey_limit:
            raise MeasureError(
                f"volume {name}: volume-rekey refused: {rekey_limit} key rotations this boot"
                " are used up (a header under the previous key came back after each); the"
                " volume opens again after a VM restart"
            )
        if used + need > limit:
            what = "ephemeral volumes" if pool == EPHEMERAL_POOL else f"volume {name}"
            raise MeasureError(
                f"volume {name}: {operation.value} refused: the {limit} events this boot allows"
                f" for {what} are used up (the host drove {used // 2} open/close cycles);"
                " volumes still open are served, this one opens again after a VM restart"
            )
        self._used[pool] = used + 1
        if operation is VolumeOperation.REKEY:
            self._used[rekeys] = self._used.get(rekeys, 0) + 1
        self._save_used()

    def events_used(self, key: str) -> int:
        return self._used.get(budget_pool(key), 0)

    def is_measured(self, name: str) -> bool:
        """True when volume `name` may be handed out without a new open event."""
        return not self.enabled or not self._config.required or name in self._opened

    def identity(self, name: str) -> VolumeIdentity | None:
        return self._opened.get(name)

    def last_event(self, key: str) -> LastEvent | None:
        """The last event of volume `key` this daemon run (None: none since it started)."""
        return self._last.get(key)

    # -- sinks -------------------------------------------------------------------------------

    def _tpm_pcr(self) -> int:
        return DEFAULT_MEASURE_PCR if self._config.pcr is None else self._config.pcr

    def _rtmr(self) -> TdxRtmr:
        pcr = self._tpm_pcr()
        if pcr not in RTMR_MEASURE_PCRS:
            raise MeasureError(
                f"measure.pcr {pcr} is not an RTMR3 PCR (16..23): the rtmr sink never extends"
                " RTMR0-2 (firmware and boot); set pcr 16..23 or unset in /etc/cva/config.toml"
            )
        return self._rtmr_factory(RTMR_INDEX)

    def _rtmr_present(self) -> bool:
        return self._tee == "tdx" and self._rtmr_factory(RTMR_INDEX).available()

    def _direct_sink(self) -> str:
        """The sink of cva's own log under `auto`: the one `_decide` would pick without an AA."""
        if self._rtmr_present():
            return "rtmr"
        self._check_tpm_allowed()
        return "tpm"

    def _check_tpm_allowed(self) -> None:
        """The `tpm` sink only when the image's TEE is the TPM (issue 21 #2): any other TEE's
        evidence never covers a TPM PCR, and the host can attach an emulated TPM to any VM."""
        if self._tee == "tpm":
            return
        tee = self._tee or "not decided"
        rtmr = " or a Linux >= 6.16 kernel for the rtmr sink" if self._tee == "tdx" else ""
        raise MeasureError(
            f"the tpm measurement sink is refused: this image's TEE is {tee}, not tpm, so a TPM"
            " PCR is the host's (it can attach an emulated TPM to any VM) and no evidence of"
            f" this TEE covers it; use the Attestation Agent (sink aa){rtmr}, or set [evidence]"
            ' tee = "tpm" (vtpm_in_tee = true for a paravisor vTPM) in /etc/cva/config.toml'
        )

    def _direct_log(self) -> DirectLog:
        if self._direct is None:
            from evidence.measure_log import DirectLog  # noqa: PLC0415

            if self._sink == "rtmr":
                from evidence.eventlog import ALG_SHA384  # noqa: PLC0415

                direct = DirectLog(
                    self._log_path, self._rtmr(), log_index=RTMR_INDEX + 1, alg=ALG_SHA384
                )
            else:
                self._check_tpm_allowed()
                pcr = self._tpm_pcr()
                register = self._register_factory(self._config.tcti, pcr)
                direct = DirectLog(self._log_path, register, log_index=pcr)
            finished = direct.recover()
            if finished is not None:
                log.warning("measurement_recovered", log=str(self._log_path), action=finished.value)
            self._direct = direct
        return self._direct

    def _decide(self) -> str:
        if self._sink is not None:
            return self._sink
        from evidence.measure_log import wal_path  # noqa: PLC0415

        if self._log_path.exists() or wal_path(self._log_path).exists():
            sink = self._direct_sink()
        elif _is_socket(self._config.aa_socket):
            sink = "aa"
        elif self._rtmr_present():
            sink = "rtmr"
        elif self._tee == "tpm" and _tcti_present(self._config.tcti):
            sink = "tpm"
        else:
            raise MeasureError(self._no_sink())
        self._sink = sink
        log.info("measurement_sink", sink=sink)
        return sink

    def _no_sink(self) -> str:
        aa = f"no attestation agent socket at {self._config.aa_socket}"
        start_aa = "start the AA (kata agent.guest_components_procs=attestation-agent)"
        if self._tee == "tpm":
            return (
                f"no measurement sink: {aa} and no TPM ({self._config.tcti}); {start_aa} or set"
                " [measure] in /etc/cva/config.toml"
            )
        if self._tee == "tdx":
            return (
                f"no measurement sink: {aa} and no TDX RTMR sysfs (Linux >= 6.16); {start_aa}"
                " or boot a Linux >= 6.16 guest kernel (the tpm sink is refused on tdx: a TPM"
                " is the host's)"
            )
        return (
            f"no measurement sink: {aa}, and on a {self._tee or 'not decided'} TEE only the AA"
            f" can measure (the tpm sink is refused: a TPM is the host's); {start_aa}, or set"
            ' [measure] sink = "none" in /etc/cva/config.toml (a test image)'
        )

    def start(self) -> None:
        """At daemon start: finish a measurement a crash interrupted (tpm/rtmr) and check the
        log explains the register. Raises (the daemon refuses to start) when required."""
        if not self.enabled:
            return
        from evidence.measure_log import wal_path  # noqa: PLC0415

        used = self._log_path.exists() or wal_path(self._log_path).exists()
        if self._config.sink in ("tpm", "rtmr") or (self._config.sink == "auto" and used):
            with self._lock:
                try:
                    if self._config.sink == "auto":
                        self._sink = self._direct_sink()
                    self._direct_log()
                except (*REFUSALS, OSError) as exc:
                    self._fail(f"cannot resume cva's measurement log: {_text(exc)}")

    # -- events ------------------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        if self._config.required:
            raise MeasureError(f"{message} (rule measure-required)")
        log.warning("measurement_skipped", error=message)

    def _send(self, event: VolumeEvent) -> str:
        aael = volume_aael(event)
        sink = self._decide()
        if sink == "aa":
            from agent.aa_client import extend_runtime_measurement  # noqa: PLC0415

            extend_runtime_measurement(
                self._config.aa_socket, DOMAIN, aael.operation, aael.content, self._config.pcr
            )
            return sink
        self._direct_log().record(aael)
        return sink

    def record(
        self,
        operation: VolumeOperation,
        ident: VolumeIdentity,
        key: str | None = None,
        key_ids: tuple[bytes, bytes | None] | None = None,
    ) -> None:
        """Record one event; raises MeasureError when it cannot and the image requires it.
        `key` names the volume in the opened set (default its name; ephemeral volumes use
        `EPHEMERAL_KEY + mapper`, so a host-chosen mapper name never aliases a contract
        volume, and their events are `ephemeral-create` / `ephemeral-close`)."""
        key = ident.name if key is None else key
        if key.startswith(EPHEMERAL_KEY):  # their own operations (issue 21 #5c)
            operation = _EPHEMERAL_OPERATION.get(operation, operation)
        if not self.enabled:
            return
        with self._lock:
            try:
                event = ident.event(operation, *(key_ids or (None, None)))
                self._spend(key, operation, ident.name)
                sink = self._send(event)
            except (*REFUSALS, OSError) as exc:
                self._fail(f"volume {ident.name}: {operation.value} not measured: {_text(exc)}")
                sink = None
            self._last[key] = LastEvent(operation.value, sink, time.time())
            if operation.closes:
                self._opened.pop(key, None)
            elif operation is not VolumeOperation.REKEY:
                self._opened[key] = ident
            self._save()
        if sink is not None:
            log.info(
                "volume_measured",
                operation=operation.value,
                volume=ident.name,
                uuid=ident.luks_uuid,
                header_sha256=ident.header_sha256.hex(),
                seq=ident.sequence,
                sink=sink,
            )

    def rekeyed(
        self, ident: VolumeIdentity, *, old_key_id: bytes | None, new_key_id: bytes
    ) -> None:
        """The volume-rekey event of a volume this open moved to its key (luks.rotation): its
        key ids only, never key bytes; recorded before the open event."""
        self.record(VolumeOperation.REKEY, ident, key_ids=(new_key_id, old_key_id))

    def opened(self, ident: VolumeIdentity, *, created: bool, key: str | None = None) -> None:
        self.record(VolumeOperation.CREATE if created else VolumeOperation.OPEN, ident, key)

    def closed(self, key: str) -> None:
        """The close event of a volume this boot measured as opened (else nothing); a failure
        is logged, never raised: the volume is closed already."""
        ident = self._opened.get(key)
        if ident is None or not self.enabled:
            return
        try:
            self.record(VolumeOperation.CLOSE, ident, key)
        except MeasureError as exc:
            log.error("volume_close_not_measured", volume=key, error=exc.message)  # noqa: TRY400
            with self._lock:
                self._opened.pop(key, None)
                self._save()


_EPHEMERAL_OPERATION = {
    VolumeOperation.CREATE: VolumeOperation.EPHEMERAL_CREATE,
    VolumeOperation.OPEN: VolumeOperation.EPHEMERAL_CREATE,  # never reopened: a new key each time
    VolumeOperation.CLOSE: VolumeOperation.EPHEMERAL_CLOSE,
}


def _text(exc: BaseException) -> str:
    return exc.message if isinstance(exc, REFUSALS) else str(exc)


def _is_socket(path: Path) -> bool:
    import stat  # noqa: PLC0415

    with contextlib.suppress(OSError):
        return stat.S_ISSOCK(path.stat().st_mode)
    return False


def _tdx_rtmr(index: int) -> TdxRtmr:
    from evidence.tdx_rtmr import TdxRtmr  # noqa: PLC0415

    return TdxRtmr(index)


def _tcti_present(tcti: str) -> bool:
    """A `device:` TCTI whose device exists; any other TCTI (swtpm, mssim) counts as present."""
    kind, _, rest = tcti.partition(":")
    if kind != "device":
        return True
    return Path(rest or "/dev/tpmrm0").exists()
