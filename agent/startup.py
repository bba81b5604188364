"""What `cva serve` does before it serves: establish trust in the measured configuration.

Order: read the config; find and parse the initdata; parse the contract it carries (untrusted
until the next step); check the initdata's binding to the TEE (MRCONFIGID / HOST_DATA / PCR8);
only then build the VolumeManager (luks.volume backend, lazily attested KBS session) and serve.
A refusal is one line in the journal and in STATUS=, and a non-zero exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from evidence.binding import check_initdata_binding
from evidence.detect import attester_for

from agent.config import DaemonConfig
from agent.contract import Contract
from agent.daemon import ManagerFactory, run_daemon
from agent.errors import CvaError
from agent.initdata import InitData, find_initdata, load_contract, parse_initdata
from agent.kbs import KbsClient
from agent.keysource import LazyKbsKeySource
from agent.log import configure_logging
from agent.luks_backend import LuksBackend
from agent.sdnotify import Notifier
from agent.volumes import BindingStore, VolumeManager
from evidence.base import Attester

log = structlog.get_logger("cva.startup")


@dataclass(frozen=True)
class Trusted:
    """The measured configuration, after its binding to the TEE was checked."""

    initdata: InitData
    contract: Contract
    attester: Attester


def establish_trust(config: DaemonConfig) -> Trusted:
    """Load initdata, parse the contract, check the initdata binding (raises CvaError)."""
    raw = find_initdata(config.initdata.devices or None, toml_path=config.initdata.toml)
    initdata = parse_initdata(raw)
    contract = load_contract(initdata)  # parsed, not yet trusted
    attester = attester_for(contract.kbs.tee)
    check_initdata_binding(initdata, attester)  # from here on the contract is measured
    return Trusted(initdata, contract, attester)


def production_manager(trusted: Trusted) -> ManagerFactory:
    """The VolumeManager over luks.volume and the lazily attested KBS session."""

    def make(config: DaemonConfig, on_status: Callable[[str], None]) -> VolumeManager:
        def kbs_client() -> KbsClient:
            k = trusted.contract.kbs
            on_status("attesting to the KBS")
            return KbsClient(
                k.url,
                attester=trusted.attester,
                initdata=trusted.initdata,
                cacert_pem=k.cert,
                allow_http=k.insecure_http,
                deadline=config.timeouts.kbs,
            )

        keys = LazyKbsKeySource(kbs_client)
        return VolumeManager(
            trusted.contract,
            LuksBackend(config),
            keys,
            rootfs_base=config.paths.rootfs_base,
            bindings=BindingStore(config.paths.state_dir / "bindings.json"),
            on_status=on_status,
        )

    return make


def serve(config: DaemonConfig) -> int:
    """`cva serve`: establish trust, then serve. Startup refusals are one line and exit 1."""
    configure_logging(config.log_level)
    notifier = Notifier.from_env()
    try:
        trusted = establish_trust(config)
    except CvaError as exc:
        log.error("startup_refused", error=exc.message)  # noqa: TRY400
        with contextlib.suppress(OSError):
            notifier.status(f"refused to start: {exc.message}")
        raise
    log.info(
        "trust_established",
        tee=trusted.attester.tee,
        initdata_digest=trusted.initdata.digest().hex(),
        volumes=[v.name for v in trusted.contract.volumes],
    )
    return run_daemon(config, production_manager(trusted), notifier)
