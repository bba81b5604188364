"""What `cva serve` does before it serves: establish trust in the measured configuration.

Order: read the config; establish trust (agent/trust.py: initdata, contract, binding check);
only then build the VolumeManager (luks.volume backend, lazily attested KBS session) and serve.
A refusal is one line in the journal and in STATUS=, and a non-zero exit.

The KBS client (httpx, cryptography) is imported at the first key fetch, and the storage code
(luks.*) by the backend at the first volume operation: neither is needed to reach READY=1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.config import DaemonConfig
from agent.daemon import ManagerFactory, run_daemon
from agent.errors import REFUSALS
from agent.keysource import LazyKbsKeySource
from agent.log import configure_logging, get_logger
from agent.luks_backend import LuksBackend
from agent.measure import Measurer
from agent.sdnotify import Notifier
from agent.trust import Trusted, establish_trust
from agent.volumes import BindingStore, VolumeManager

if TYPE_CHECKING:
    from agent.kbs.client import KbsClient

log = get_logger("cva.startup")


def production_manager(trusted: Trusted) -> ManagerFactory:
    """The VolumeManager over luks.volume and the lazily attested KBS session."""

    def make(config: DaemonConfig, on_status: Callable[[str], None]) -> VolumeManager:
        def kbs_client() -> KbsClient:
            from agent.kbs.client import KbsClient  # noqa: PLC0415 - lazy: first key fetch, not start

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
        measurer = Measurer.from_config(config, tee=trusted.attester.tee)
        measurer.start()  # finishes an interrupted measurement; refuses when it cannot
        return VolumeManager(
            trusted.contract,
            LuksBackend(config),
            keys,
            rootfs_base=config.paths.rootfs_base,
            bindings=BindingStore(config.paths.state_dir / "bindings.json"),
            on_status=on_status,
            measurer=measurer,
        )

    return make


def serve(config: DaemonConfig) -> int:
    """`cva serve`: establish trust, then serve. Startup refusals are one line and exit 1."""
    configure_logging(config.log_level)
    notifier = Notifier.from_env()
    try:
        trusted = establish_trust(config)
    except REFUSALS as exc:
        log.error("startup_refused", error=exc.message)  # noqa: TRY400
        with contextlib.suppress(OSError):
            notifier.status(f"refused to start: {exc.message}")
        raise
    log.info(
        "trust_established",
        tee=trusted.attester.tee,
        initdata_digest=trusted.initdata.digest().hex(),
        binding="checked at the first attestation" if trusted.binding_deferred else "checked",
        volumes=[v.name for v in trusted.contract.volumes],
    )
    if not trusted.contract.volumes:
        log.warning("no_volumes", reason="the initdata carries no cva contract or no volumes")
    return run_daemon(config, production_manager(trusted), notifier)
