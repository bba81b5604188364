"""Establishing trust in the measured configuration, before cva serves anything.

Order: decide the TEE from the hardware and the image's `[evidence]` config (trusted, before
any initdata is read); find and parse the initdata; parse the contract it carries (untrusted
until the binding check), whose `kbs.tee` may only *require* the TEE the image decided (anything
else but `auto` is refused before any attester is built); check the initdata's binding to the
TEE (MRCONFIGID / HOST_DATA / PCR8). Only the `Trusted` result may be used to build the
service. Every refusal is a one-line CvaError.

Initdata that carries no cva contract (no `data."cva.toml"`: a pod that is not cva's) still has
its binding checked, and then gets the empty contract: no volumes, so the prestart hook that an
image with cva runs for every pod answers "no volumes" at once and the pod runs normally.

The binding check is skipped only for the sample TEE, which exists only when the image config
allows it and no TDX/SNP device is present (evidence.detect.decide_tee): a test image's choice,
never the contract's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.binding import check_initdata_binding
from agent.config import DaemonConfig
from agent.contract import CONTRACT_KEY, ApiPolicy, Contract, ContractError, KbsConfig
from agent.initdata import InitData, find_initdata, load_contract, parse_initdata
from evidence.base import Attester
from evidence.detect import attester_for, decide_tee

if TYPE_CHECKING:
    from evidence.tsm import ConfigFs


@dataclass(frozen=True)
class Trusted:
    """The measured configuration, after its binding to the TEE was checked."""

    initdata: InitData
    contract: Contract
    attester: Attester


def require_tee(contract_tee: str, decided: str) -> None:
    """The contract's `kbs.tee` is a requirement only: `auto` or exactly the image's TEE."""
    if contract_tee not in ("auto", decided):
        raise ContractError(
            "kbs.tee",
            f"requires {contract_tee!r} but this image's TEE is {decided!r} (decided by the"
            " hardware and /etc/cva/config.toml [evidence], never by the contract);"
            ' use tee = "auto" or the image\'s TEE',
        )


def empty_contract() -> Contract:
    """The contract of initdata without `data."cva.toml"`: no volumes, no KBS is ever asked."""
    return Contract(
        version=1,
        kbs=KbsConfig(url="", cert=None, tee="auto", insecure_http=False),
        api=ApiPolicy(),
        volumes=(),
    )


def establish_trust(
    config: DaemonConfig, *, root: Path = Path("/"), fs: ConfigFs | None = None
) -> Trusted:
    """Decide the TEE, load initdata, parse the contract, check the binding (raises CvaError)."""
    ev = config.evidence
    tee = decide_tee(
        ev.tee, allow_sample=ev.allow_sample, vtpm_in_tee=ev.vtpm_in_tee, root=root, fs=fs
    )
    raw = find_initdata(config.initdata.devices or None, toml_path=config.initdata.toml)
    initdata = parse_initdata(raw)
    has_contract = CONTRACT_KEY in initdata.data
    contract = load_contract(initdata) if has_contract else empty_contract()  # not yet trusted
    require_tee(contract.kbs.tee, tee)  # before any attester exists
    attester = attester_for(tee, root=root, fs=fs)
    if tee != "sample":  # the image's choice (allow_sample, no TDX/SNP), never the contract's
        check_initdata_binding(initdata, attester)  # from here on the contract is measured
    return Trusted(initdata, contract, attester)
