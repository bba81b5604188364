"""The daemon's own configuration, `/etc/cva/config.toml` (part of the trusted image).

Every key is optional (the defaults below are what the image runs with); unknown keys, wrong
types and out-of-range values are errors that name the key and the rule, like the contract.

```toml
[listen]
vsock_port = 1040                  # AF_VSOCK, CID any; 0 = no vsock listener
unix = "/run/cva/cva.sock"         # optional extra unix socket (operators, tests)
tcp = "127.0.0.1:50051"            # optional, loopback only (tests, port forwarding)
ttrpc = "unix:///run/confidential-containers/cdh.sock"  # optional ttRPC listener (default off):
                                   # VolumeAgent + CDH SecureMount for a stock kata-agent
ttrpc_vsock_port = 0               # optional ttRPC on AF_VSOCK (default 0 = off): VolumeAgent
                                   # only, for a kata runtime that speaks ttRPC (no SecureMount)

[initdata]
devices = []                       # block devices to look for the initdata magic; [] = scan
toml = "/run/confidential-containers/initdata/initdata.toml"

[paths]
rootfs_base = "/run/kata-containers"   # guest-side OCI bundles: <base>/<cid>/{config.json,rootfs}
state_dir = "/run/cva"                 # tmpfs: header copies, private gRPC socket, bindings
mount_base = "/run/cva/volumes"        # where volumes are mounted before the bind

[timeouts]                         # seconds
call = 300.0                       # per-RPC deadline (the client's own may be shorter)
disk_wait = 60.0                   # hot-plugged disk to appear
kbs = 60.0                         # the whole KBS exchange for one resource
shutdown_grace = 30.0              # SIGTERM: time in-flight work gets to finish

[log]
level = "info"                     # debug | info | warning | error

[evidence]                         # which TEE is the root of trust: the image decides, never the
                                   # contract (which is still unverified when the TEE is chosen)
tee = "auto"                       # auto | tdx | snp | tpm | sample; auto = TDX/SNP (configfs-tsm,
                                   # /dev/tdx_guest, /dev/sev-guest) first, else /dev/tpmrm0
allow_sample = false               # true only in test images: permits tee = "sample" (no hardware,
                                   # no security), still refused when a TDX/SNP device is present
vtpm_in_tee = false                # true: the vTPM is part of the TEE (a paravisor vTPM), so
                                   # tee = "tpm" may be chosen while TDX/SNP is present
pcr8_extender = "cva"              # TPM images: who extends PCR8 with the initdata digest,
                                   # once per boot: "cva" (no Attestation Agent in the image)
                                   # or "aa" (the image runs the AA, which extends it when
                                   # kata-agent starts it with initdata; cva only verifies)

[measure]                          # measured volumes: one AAEL event per create/open/close
sink = "auto"                      # auto | aa | tpm | rtmr | none; auto = at the first event:
                                   # the sink this boot already uses (cva's log exists -> tpm,
                                   # on TDX rtmr), else the Attestation Agent when its socket
                                   # exists, else (TDX, Linux >= 6.16) RTMR3, else the TPM
                                   # (/dev/tpmrm0) when [evidence] decided tpm, else none
                                   # available (refused when required); tpm (auto or named)
                                   # only when the image's TEE is tpm
pcr = 23                           # the PCR: tpm default 23; aa default: unset = AA's init_pcr.
                                   # tpm/auto allow 9..16 and 23 (not 0-8: firmware/boot and
                                   # initdata; not 17-22: DRTM, locality > 0, start at 0xFF..);
                                   # rtmr: RTMR3 always (PCR 16..23 map to it, the AA's mapping)
required = true                    # a failure to measure fails the operation (closed); false
                                   # only logs a warning (the image may relax it, nothing else)
log = "/run/cva/eventlog"          # tpm sink: its TCG2/AAEL log (default <state_dir>/eventlog)
aa_socket = "/run/confidential-containers/attestation-agent/attestation-agent.sock"
tcti = "device:/dev/tpmrm0"        # tpm sink: the TPM (tpm2-pytss TCTI string)

[securemount]
mount_roots = []                   # more SecureMount mount points beyond kata's own two
                                   # (/run/kata-containers/image, .../sandbox/storage/<id>):
                                   # "/abs/dir" = that directory, "/abs/dir/*" = one <id> below

[cdh]                              # cva fronts the Confidential Data Hub on listen.ttrpc
upstream = "unix:///run/confidential-containers/cdh-upstream.sock"  # the real CDH (default
                                   # unset: methods cva does not serve answer UNIMPLEMENTED)
timeout = 1800.0                   # cap on a forwarded call's deadline (kata's image pull: 1200)
```
Port 1040: kata uses vsock 1024 (agent), 1025 (agent logs) and 1026 (debug console).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from agent.errors import InputError
from agent.mountpoints import PROTECTED_PATHS, MountPointError, MountRoot, MountRules, parse_root

DEFAULT_CONFIG_PATH = Path("/etc/cva/config.toml")
DEFAULT_VSOCK_PORT = 1040
KATA_VSOCK_PORTS = frozenset({1024, 1025, 1026})
CDH_TTRPC_SOCKET = Path("/run/confidential-containers/cdh.sock")  # kata-agent's CDH_SOCKET_URI
MAX_CONFIG_BYTES = 64 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error")
IMAGE_TEES = ("auto", "tdx", "snp", "tpm", "sample")
PCR8_EXTENDERS = ("cva", "aa")
MAX_MOUNT_ROOTS = 32


class ConfigError(InputError):
    """The daemon configuration is malformed; the message names the key and the rule."""


@dataclass(frozen=True)
class ListenConfig:
    vsock_port: int = DEFAULT_VSOCK_PORT
    unix: Path | None = None
    tcp: tuple[str, int] | None = None  # (loopback host, port)
    ttrpc: Path | None = None  # ttRPC unix socket (CDH-compatible: CDH_TTRPC_SOCKET)
    ttrpc_vsock_port: int = 0  # ttRPC on vsock (VolumeAgent only); 0 = off


@dataclass(frozen=True)
class InitdataSources:
    devices: tuple[Path, ...] = ()
    toml: Path = Path("/run/confidential-containers/initdata/initdata.toml")


@dataclass(frozen=True)
class PathsConfig:
    rootfs_base: Path = Path("/run/kata-containers")
    state_dir: Path = Path("/run/cva")
    mount_base: Path = Path("/run/cva/volumes")


@dataclass(frozen=True)
class Timeouts:
    call: float = 300.0
    disk_wait: float = 60.0
    kbs: float = 60.0
    shutdown_grace: float = 30.0


@dataclass(frozen=True)
class EvidenceConfig:
    """The image's choice of root of trust (evidence.detect.decide_tee applies it)."""

    tee: str = "auto"
    allow_sample: bool = False
    vtpm_in_tee: bool = False
    pcr8_extender: str = "cva"  # TPM: "cva" extends PCR8 itself, "aa": the AA does (agent.binding)


MEASURE_SINKS = ("auto", "aa", "tpm", "rtmr", "none")
AA_SOCKET = Path("/run/confidential-containers/attestation-agent/attestation-agent.sock")
DEFAULT_MEASURE_PCR = 23
TPM_MEASURE_PCRS = frozenset({*range(9, 17), 23})
RTMR_MEASURE_PCRS = frozenset(range(16, 24))  # the AA's pcr_to_ccmr maps these to RTMR3


@dataclass(frozen=True)
class MeasureConfig:
    """Where volume measurements go (agent.measure); `pcr` None = the sink's default."""

    sink: str = "auto"
    pcr: int | None = None
    required: bool = True
    log: Path | None = None  # None: <state_dir>/eventlog
    aa_socket: Path = AA_SOCKET
    tcti: str = "device:/dev/tpmrm0"


@dataclass(frozen=True)
class SecureMountConfig:
    mount_roots: tuple[MountRoot, ...] = ()  # opt-in beyond kata's two (agent.mountpoints)


@dataclass(frozen=True)
class CdhConfig:
    """`[cdh]`: where the real CDH listens when cva owns kata-agent's CDH socket (agent.cdh)."""

    upstream: Path | None = None  # unix socket of the real CDH; None: nothing is forwarded
    timeout: float = 1800.0  # cap on a forwarded call's deadline (kata: image pull 1200 s)


@dataclass(frozen=True)
class DaemonConfig:
    listen: ListenConfig = field(default_factory=ListenConfig)
    initdata: InitdataSources = field(default_factory=InitdataSources)
    paths: PathsConfig = field(default_factory=PathsConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    log_level: str = "info"
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    securemount: SecureMountConfig = field(default_factory=SecureMountConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    cdh: CdhConfig = field(default_factory=CdhConfig)

    @property
    def measure_log(self) -> Path:
        """cva's own event log (tpm sink)."""
        return self.measure.log or self.paths.state_dir / "eventlog"

    @property
    def mount_rules(self) -> MountRules:
        """Where SecureMount may mount: kata's two places + `[securemount] mount_roots`; cva's
        own state and mount directories are protected like the built-in paths."""
        return MountRules.build(
            self.securemount.mount_roots,
            (str(self.paths.state_dir), str(self.paths.mount_base)),
        )

    @property
    def private_socket(self) -> Path:
        """The unix socket grpc.aio serves on; the vsock listener splices into it."""
        return self.paths.state_dir / "grpc.sock"

    @property
    def control_socket(self) -> Path:
        """The root-only local control socket (`cva status`; agent.control.server)."""
        return self.paths.state_dir / "control.sock"


_SECTIONS: dict[str, frozenset[str]] = {
    "listen": frozenset({"vsock_port", "unix", "tcp", "ttrpc", "ttrpc_vsock_port"}),
    "initdata": frozenset({"devices", "toml"}),
    "paths": frozenset({"rootfs_base", "state_dir", "mount_base"}),
    "timeouts": frozenset({"call", "disk_wait", "kbs", "shutdown_grace"}),
    "log": frozenset({"level"}),
    "evidence": frozenset({"tee", "allow_sample", "vtpm_in_tee", "pcr8_extender"}),
    "securemount": frozenset({"mount_roots"}),
    "measure": frozenset({"sink", "pcr", "required", "log", "aa_socket", "tcti"}),
    "cdh": frozenset({"upstream", "timeout"}),
}


def _table(doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config: [{name}] must be a table")
    unknown = sorted(set(value) - _SECTIONS[name])
    if unknown:
        raise ConfigError(f"config: unknown key {name}.{unknown[0]}")
    return value


def _abs_path(value: object, key: str) -> Path:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ConfigError(f"config: {key} must be an absolute path")
    if ".." in PurePosixPath(value).parts or len(value) > 4096:
        raise ConfigError(f"config: {key} must be an absolute path without '..'")
    return Path(value)


def _seconds(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"config: {key} must be a number of seconds")
    if not 0 < float(value) <= 86400:
        raise ConfigError(f"config: {key} must be > 0 and <= 86400 seconds")
    return float(value)


def _vsock_port(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config: {key} must be an integer port")
    if not 0 <= value < 0xFFFFFFFF:  # 0xFFFFFFFF is VMADDR_PORT_ANY
        raise ConfigError(f"config: {key} must be 0 (off) or a vsock port below 4294967295")
    return value


def parse_ttrpc_address(value: object, key: str = "listen.ttrpc") -> Path:
    """`unix:///abs/path` or `/abs/path` (ttRPC listens on unix sockets only)."""
    if not isinstance(value, str):
        raise ConfigError(f"config: {key} must be a string (unix:///path or /path)")
    if value.startswith("unix://"):
        value = value.removeprefix("unix://")
    elif "://" in value or value.startswith("unix:"):
        raise ConfigError(f"config: {key} must be unix:///absolute/path (ttRPC is unix only)")
    return _abs_path(value, key)


def parse_tcp_address(text: str, key: str = "listen.tcp") -> tuple[str, int]:
    """`127.0.0.1:PORT` or `[::1]:PORT`; only loopback addresses are accepted."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"config: {key} must be HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"config: {key} host must be a loopback IP address") from None
    if not addr.is_loopback:
        raise ConfigError(
            f"config: {key} must be a loopback address (the host reaches cva by vsock)"
        )
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"config: {key} port out of range")
    return str(addr), port


def parse_config(text: str) -> DaemonConfig:
    """Parse and validate a config document (strict: unknown keys are errors)."""
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: not valid TOML ({exc})") from None
    unknown = sorted(set(doc) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"config: unknown section or key {unknown[0]}")

    lt = _table(doc, "listen")
    listen = ListenConfig(
        vsock_port=_vsock_port(lt.get("vsock_port", DEFAULT_VSOCK_PORT), "listen.vsock_port"),
        unix=_abs_path(lt["unix"], "listen.unix") if "unix" in lt else None,
        tcp=None,
    )
    if "tcp" in lt:
        if not isinstance(lt["tcp"], str):
            raise ConfigError("config: listen.tcp must be a string HOST:PORT")
        listen = ListenConfig(listen.vsock_port, listen.unix, parse_tcp_address(lt["tcp"]))
    if "ttrpc" in lt:
        listen = ListenConfig(
            listen.vsock_port, listen.unix, listen.tcp, parse_ttrpc_address(lt["ttrpc"])
        )

    if "ttrpc_vsock_port" in lt:
        port = _vsock_port(lt["ttrpc_vsock_port"], "listen.ttrpc_vsock_port")
        if port and port == listen.vsock_port:
            raise ConfigError(
                "config: listen.ttrpc_vsock_port must differ from listen.vsock_port (gRPC)"
            )
        if port in KATA_VSOCK_PORTS:
            raise ConfigError(
                f"config: listen.ttrpc_vsock_port {port} is kata's own (1024 agent, 1025 logs,"
                " 1026 debug console)"
            )
        listen = dataclasses.replace(listen, ttrpc_vsock_port=port)

    it = _table(doc, "initdata")
    devices = it.get("devices", [])
    if not isinstance(devices, list) or len(devices) > 64:
        raise ConfigError("config: initdata.devices must be a list of at most 64 paths")
    initdata = InitdataSources(
        devices=tuple(_abs_path(d, "initdata.devices[]") for d in devices),
        toml=_abs_path(it.get("toml", str(InitdataSources.toml)), "initdata.toml"),
    )

    pt = _table(doc, "paths")
    defaults = PathsConfig()
    paths = PathsConfig(
        rootfs_base=_abs_path(
            pt.get("rootfs_base", str(defaults.rootfs_base)), "paths.rootfs_base"
        ),
        state_dir=_abs_path(pt.get("state_dir", str(defaults.state_dir)), "paths.state_dir"),
        mount_base=_abs_path(pt.get("mount_base", str(defaults.mount_base)), "paths.mount_base"),
    )

    if listen.ttrpc is not None and listen.ttrpc in (listen.unix, paths.state_dir / "grpc.sock"):
        raise ConfigError("config: listen.ttrpc must not be a gRPC socket path")

    tt = _table(doc, "timeouts")
    td = Timeouts()
    timeouts = Timeouts(
        **{
            name: _seconds(tt.get(name, getattr(td, name)), f"timeouts.{name}")
            for name in _SECTIONS["timeouts"]
        }
    )

    level = _table(doc, "log").get("level", "info")
    if level not in LOG_LEVELS:
        raise ConfigError(f"config: log.level must be one of {', '.join(LOG_LEVELS)}")
    no_grpc = listen.vsock_port == 0 and listen.unix is None and listen.tcp is None
    if no_grpc and listen.ttrpc is None and not listen.ttrpc_vsock_port:
        raise ConfigError(
            "config: no listen address (set listen.vsock_port, listen.unix, listen.tcp,"
            " listen.ttrpc or listen.ttrpc_vsock_port)"
        )
    securemount = _securemount(_table(doc, "securemount"), listen, paths)
    return DaemonConfig(
        listen,
        initdata,
        paths,
        timeouts,
        str(level),
        _evidence(doc),
        securemount,
        _measure(_table(doc, "measure")),
        _cdh(_table(doc, "cdh"), listen, paths),
    )


def _cdh(table: dict[str, Any], listen: ListenConfig, paths: PathsConfig) -> CdhConfig:
    upstream = None
    if "upstream" in table:
        upstream = parse_ttrpc_address(table["upstream"], "cdh.upstream")
        own = (listen.ttrpc, listen.unix, paths.state_dir / "grpc.sock")
        if upstream in own:
            raise ConfigError(
                f"config: cdh.upstream {upstream} is one of cva's own sockets; it must be where"
                " the real CDH listens (e.g. /run/confidential-containers/cdh-upstream.sock)"
            )
        if listen.ttrpc is None:
            raise ConfigError(
                "config: cdh.upstream needs listen.ttrpc (the CDH socket cva serves and forwards"
                " from)"
            )
    timeout = _seconds(table.get("timeout", CdhConfig.timeout), "cdh.timeout")
    return CdhConfig(upstream=upstream, timeout=timeout)


def _measure(table: dict[str, Any]) -> MeasureConfig:
    sink = table.get("sink", "auto")
    if not isinstance(sink, str) or sink not in MEASURE_SINKS:
        raise ConfigError(f"config: measure.sink must be one of {', '.join(MEASURE_SINKS)}")
    pcr = table.get("pcr")
    if pcr is not None:
        if isinstance(pcr, bool) or not isinstance(pcr, int) or not 0 <= pcr <= 23:
            raise ConfigError("config: measure.pcr must be a PCR index 0..23")
        if sink in ("auto", "tpm") and pcr not in TPM_MEASURE_PCRS:
            raise ConfigError(
                "config: measure.pcr must be 9..16 or 23 when cva extends the TPM itself"
                " (0-7 firmware/boot, 8 initdata, 17-22 DRTM: not extendable at locality 0)"
            )
        if sink == "rtmr" and pcr not in RTMR_MEASURE_PCRS:
            raise ConfigError(
                "config: measure.pcr must be 16..23 (RTMR3) or unset with sink = rtmr: RTMR0-2"
                " hold the firmware and boot measurements"
            )
    tcti = table.get("tcti", MeasureConfig.tcti)
    if not isinstance(tcti, str) or not tcti or len(tcti) > 256 or "\0" in tcti:
        raise ConfigError("config: measure.tcti must be a TCTI string (device:/dev/tpmrm0)")
    return MeasureConfig(
        sink=sink,
        pcr=pcr,
        required=_flag(table.get("required", True), "measure.required"),
        log=_abs_path(table["log"], "measure.log") if "log" in table else None,
        aa_socket=_abs_path(table.get("aa_socket", str(AA_SOCKET)), "measure.aa_socket"),
        tcti=tcti,
    )


def _flag(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config: {key} must be true or false")
    return value


def _evidence(doc: dict[str, Any]) -> EvidenceConfig:
    et = _table(doc, "evidence")
    tee = et.get("tee", "auto")
    if not isinstance(tee, str) or tee not in IMAGE_TEES:
        raise ConfigError(f"config: evidence.tee must be one of {', '.join(IMAGE_TEES)}")
    allow_sample = _flag(et.get("allow_sample", False), "evidence.allow_sample")
    vtpm_in_tee = _flag(et.get("vtpm_in_tee", False), "evidence.vtpm_in_tee")
    if (tee == "sample") != allow_sample:
        raise ConfigError(
            'config: evidence.tee = "sample" and evidence.allow_sample = true go together'
            " (sample has no hardware and no security: test images only)"
        )
    if vtpm_in_tee and tee != "tpm":
        raise ConfigError(
            'config: evidence.vtpm_in_tee = true needs evidence.tee = "tpm" (it only lets'
            " a paravisor vTPM be the root of trust while TDX/SNP is present)"
        )
    extender = et.get("pcr8_extender", "cva")
    if not isinstance(extender, str) or extender not in PCR8_EXTENDERS:
        raise ConfigError(
            "config: evidence.pcr8_extender must be cva (no Attestation Agent in the image) or"
            " aa (the image runs the AA, which extends PCR8 with the initdata itself)"
        )
    return EvidenceConfig(tee, allow_sample, vtpm_in_tee, extender)


def _securemount(
    table: dict[str, Any], listen: ListenConfig, paths: PathsConfig
) -> SecureMountConfig:
    roots = table.get("mount_roots", [])
    if not isinstance(roots, list) or len(roots) > MAX_MOUNT_ROOTS:
        raise ConfigError(
            f"config: securemount.mount_roots must be a list of at most {MAX_MOUNT_ROOTS} paths"
        )
    # never /, a protected path, below one or above one -- nor cva's own directories, kata's
    # bundle base (<rootfs_base>/<container id> is chosen by the host) or a listening socket
    own = (paths.state_dir, paths.mount_base, paths.rootfs_base, listen.unix, listen.ttrpc)
    protected = (*PROTECTED_PATHS, *(str(p) for p in own if p is not None))
    parsed: list[MountRoot] = []
    for root in roots:
        if not isinstance(root, str):
            raise ConfigError("config: securemount.mount_roots[] must be strings")
        try:
            parsed.append(parse_root(root, protected))
        except MountPointError as exc:
            raise ConfigError(f"config: securemount.mount_roots: {exc}") from None
    return SecureMountConfig(tuple(parsed))


def load_config(path: Path | None) -> DaemonConfig:
    """Read the config: a missing default file means defaults; a missing named one is an error."""
    target = path or DEFAULT_CONFIG_PATH
    try:
        data = target.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except FileNotFoundError:
        if path is None:
            return DaemonConfig()
        raise ConfigError(
            f"config: {target} does not exist; pass an existing --config file"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {target} ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config: {target} is not UTF-8") from None
    return parse_config(text)
