"""Establishing trust in the measured configuration, before cva serves anything.

Order: decide the TEE from the hardware and the image's `[evidence]` config (trusted, before
any initdata is read); find and parse the initdata; parse the contract it carries (untrusted
until the binding check), whose `kbs.tee` may only *require* the TEE the image decided (anything
else but `auto` is refused before any attester is built); check the initdata's binding to the
TEE (MRCONFIGID / HOST_DATA / PCR8). Only the `Trusted` result may be used to build the
service. Every refusal is a one-line CvaError. On a TPM whose PCR8 the image leaves to the
Attestation Agent (`[evidence] pcr8_extender = "aa"`) and which the AA has not extended yet,
the check runs at cva's first attestation instead (agent.binding.CheckedBinding).

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

from agent.binding import CheckedBinding, check_initdata_binding
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
    binding_deferred: bool = False  # PCR8 still zero: the AA extends it, checked at attestation


def require_tee(contract_tee: str, decided: str) -> None:
    """The contract's `kbs.tee` is a requirement only: `auto` or exactly the image's TEE."""
    if contract_tee not in ("auto", decided):
        raise ContractError(
            "kbs.tee",
            f"requires {contract_tee!r} but this image's TEE is {decided!r} (decided by the"
            " hardware and /etc/cva/config.toml [evidence], never by the contract);"
            ' use tee = "auto" or the image\'s TEE',
        )


def runtime_logs(config: DaemonConfig) -> tuple[Path, ...]:
    """The event logs (paths relative to `/`) whose RTMR entries TDX evidence carries: the
    Attestation Agent's and cva's own (`[measure] log`; only an RTMR log is ever appended)."""
    from evidence.tdx import AA_EVENTLOG  # noqa: PLC0415

    own = config.measure_log.relative_to("/")
    return (AA_EVENTLOG,) if own == AA_EVENTLOG else (AA_EVENTLOG, own)


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
    logs = runtime_logs(config) if tee == "tdx" else None  # evidence.tdx loads only on TDX
    attester = attester_for(tee, root=root, fs=fs, runtime_logs=logs)
    deferred = False
    if tee != "sample":  # the image's choice (allow_sample, no TDX/SNP), never the contract's
        # PCR8 (TPM) has one writer per boot, the image's choice (agent.binding)
        extend = ev.pcr8_extender == "cva"
        deferred = not check_initdata_binding(initdata, attester, extend=extend)
    if tee == "tpm":  # PCR8 verified again before every evidence (a second writer is refused)
        attester = CheckedBinding(attester, initdata, ev.pcr8_extender)
    return Trusted(initdata, contract, attester, deferred)
