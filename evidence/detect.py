"""Which attester to use: by name, or `auto` detection that fails closed (DESIGN §8).

`auto` order: configfs-tsm (provider `tdx_guest` -> tdx, `sev_guest` -> snp), then
`/dev/tdx_guest`, `/dev/sev-guest`, then a TPM resource manager (`/dev/tpmrm0`). Nothing found is
an error; `auto` never picks `sample`, which exists only when asked for by name. `root` lets tests
point detection at a fake filesystem. Only the code the choice needs is imported: configfs-tsm
for `auto`, and the chosen TEE's attester.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from evidence.base import Attester
from evidence.errors import AttesterUnavailable
from evidence.sample import SampleAttester

if TYPE_CHECKING:
    from evidence.tsm import ConfigFs

TEES = ("auto", "tdx", "snp", "tpm", "sample")
UNSUPPORTED = ("az-snp-vtpm", "az-tdx-vtpm")
TSM_PROVIDERS = {"tdx_guest": "tdx", "sev_guest": "snp"}


def detect_tee(root: Path = Path("/"), *, fs: ConfigFs | None = None) -> str:
    """The TEE of this machine (tdx, snp or tpm); raises AttesterUnavailable if none."""
    from evidence.tsm import probe_provider  # noqa: PLC0415 - `auto` only, like each attester

    provider = probe_provider(root, fs=fs)
    if provider is not None:
        if provider in TSM_PROVIDERS:
            return TSM_PROVIDERS[provider]
        raise AttesterUnavailable(
            f"configfs-tsm provider {provider!r} is not supported (only tdx_guest, sev_guest)"
        )
    if (root / "dev/tdx_guest").exists():
        return "tdx"
    if (root / "dev/sev-guest").exists():
        return "snp"
    if (root / "dev/tpmrm0").exists():
        return "tpm"
    raise AttesterUnavailable(
        "no TEE found (no configfs-tsm provider, /dev/tdx_guest, /dev/sev-guest or /dev/tpmrm0);"
        ' set tee explicitly in the contract, or tee = "sample" for tests'
    )


def attester_for(tee: str, *, root: Path = Path("/"), fs: ConfigFs | None = None) -> Attester:
    """The attester for `tee` (`auto` detects); raises AttesterUnavailable when unusable."""
    if tee in UNSUPPORTED:
        raise AttesterUnavailable(f"tee {tee!r} is not supported by cva; use tpm, tdx or snp")
    if tee not in TEES:
        raise AttesterUnavailable(f"unknown tee {tee!r}; expected one of {', '.join(TEES)}")
    if tee == "auto":
        tee = detect_tee(root, fs=fs)
    if tee == "sample":
        return SampleAttester()
    if tee == "tpm":
        from evidence.tpm import TpmAttester  # noqa: PLC0415 - only the chosen TEE's code loads

        return TpmAttester(f"device:{root / 'dev/tpmrm0'}")
    if tee == "tdx":
        from evidence.tdx import TdxAttester  # noqa: PLC0415

        return TdxAttester(root=root, fs=fs)
    from evidence.snp import SnpAttester  # noqa: PLC0415

    return SnpAttester(root=root, fs=fs)
