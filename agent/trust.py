"""Establishing trust in the measured configuration, before cva serves anything.

Order: find and parse the initdata; parse the contract it carries (untrusted until the next
step); check the initdata's binding to the TEE (MRCONFIGID / HOST_DATA / PCR8). Only the
`Trusted` result may be used to build the service. Every refusal is a one-line CvaError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.config import DaemonConfig
from agent.contract import Contract
from agent.initdata import InitData, find_initdata, load_contract, parse_initdata
from evidence.base import Attester
from evidence.binding import check_initdata_binding
from evidence.detect import attester_for


@dataclass(frozen=True)
class Trusted:
    """The measured configuration, after its binding to the TEE was checked."""

    initdata: InitData
    contract: Contract
    attester: Attester


def establish_trust(config: DaemonConfig, *, root: Path = Path("/")) -> Trusted:
    """Load initdata, parse the contract, check the initdata binding (raises CvaError)."""
    raw = find_initdata(config.initdata.devices or None, toml_path=config.initdata.toml)
    initdata = parse_initdata(raw)
    contract = load_contract(initdata)  # parsed, not yet trusted
    attester = attester_for(contract.kbs.tee, root=root)
    check_initdata_binding(initdata, attester)  # from here on the contract is measured
    return Trusted(initdata, contract, attester)
