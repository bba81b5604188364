"""Which attester to use (DESIGN §1, §8): the trusted image decides, detection fails closed.

`decide_tee` is the daemon's choice, made from the hardware and the image's `[evidence]`
config before the (still unverified) contract is read: TDX/SNP first (configfs-tsm provider
`tdx_guest` -> tdx, `sev_guest` -> snp, then `/dev/tdx_guest`, `/dev/sev-guest`), then a TPM
resource manager (`/dev/tpmrm0`). A TPM is never the root of trust while TDX/SNP is present unless
the image says its vTPM is part of the TEE (`vtpm_in_tee`); `sample` (no hardware) exists only
when the image says `allow_sample = true` and names it, and never while TDX/SNP is present.

`attester_for` builds an attester by name (`auto` detects, never `sample`) for the daemon's
decision and for the operator CLIs, whose caller names the TEE. `root` lets tests point detection
at a fake filesystem. Only the code the choice needs is imported: configfs-tsm for detection, and
the chosen TEE's attester.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evidence.base import Attester
from evidence.errors import AttesterUnavailable
from evidence.sample import SampleAttester

if TYPE_CHECKING:
    from evidence.tsm import ConfigFs

TEES = ("auto", "tdx", "snp", "tpm", "sample")
TSM_PROVIDERS = {"tdx_guest": "tdx", "sev_guest": "snp"}
NO_TEE_NEXT_STEP = (
    "start the VM with TDX, SNP or a TPM and the image's guest drivers; the image's"
    " /etc/cva/config.toml [evidence] tee names which one this image uses"
)


def probe_cc_tee(root: Path = Path("/"), *, fs: ConfigFs | None = None) -> str | None:
    """`tdx` or `snp` when this machine has a TDX/SNP guest device, else None; an unsupported
    configfs-tsm provider is an error (it is TEE hardware cva cannot use)."""
    from evidence.tsm import probe_provider  # noqa: PLC0415 - detection only, like each attester

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
    return None


def _has_tpm(root: Path) -> bool:
    return (root / "dev/tpmrm0").exists()


def detect_tee(root: Path = Path("/"), *, fs: ConfigFs | None = None) -> str:
    """The TEE of this machine (tdx, snp or tpm); raises AttesterUnavailable if none."""
    return _detected(probe_cc_tee(root, fs=fs), root)


def _detected(cc: str | None, root: Path) -> str:
    if cc is not None:
        return cc
    if _has_tpm(root):
        return "tpm"
    raise AttesterUnavailable(
        "no TEE found (no configfs-tsm provider, /dev/tdx_guest, /dev/sev-guest or /dev/tpmrm0);"
        f" {NO_TEE_NEXT_STEP}"
    )


def decide_tee(
    choice: str,
    *,
    allow_sample: bool = False,
    vtpm_in_tee: bool = False,
    root: Path = Path("/"),
    fs: ConfigFs | None = None,
) -> str:
    """The image's root of trust (tdx, snp, tpm or sample) from its `[evidence]` config and
    the hardware; raises AttesterUnavailable naming the rule when they disagree."""
    if choice not in TEES:
        raise AttesterUnavailable(
            f"evidence: unknown tee {choice!r}; expected one of {', '.join(TEES)}"
        )
    cc = probe_cc_tee(root, fs=fs)
    if choice == "auto":
        return _detected(cc, root)
    if choice == "sample":
        if not allow_sample:
            raise AttesterUnavailable(
                'evidence: tee = "sample" needs allow_sample = true in the image config'
                " (test images only; production images never allow it)"
            )
        if cc is not None:
            raise AttesterUnavailable(
                f"evidence: the sample TEE is refused on {cc} hardware (a TEE device is"
                ' present); set [evidence] tee = "auto" or the real TEE in the image config'
            )
        return "sample"
    if choice in TSM_PROVIDERS.values():
        if cc != choice:
            found = f"{cc} hardware" if cc else "no TDX/SNP device"
            raise AttesterUnavailable(
                f"evidence: the image config says tee = {choice!r} but this machine has"
                f" {found}; start it on {choice} hardware or fix [evidence] tee"
            )
        return choice
    # tpm
    if cc is not None and not vtpm_in_tee:
        raise AttesterUnavailable(
            f"evidence: a TPM is never the root of trust while {cc} is present (image config"
            ' tee = "tpm"); use tee = "auto", or vtpm_in_tee = true for a paravisor vTPM'
            " that is part of the TEE"
        )
    if not _has_tpm(root):
        raise AttesterUnavailable(
            f'evidence: the image config says tee = "tpm" but {root / "dev/tpmrm0"} is'
            " missing; attach the TPM or fix [evidence] tee"
        )
    return "tpm"


def attester_for(
    tee: str,
    *,
    root: Path = Path("/"),
    fs: ConfigFs | None = None,
    runtime_logs: Sequence[Path] | None = None,
) -> Attester:
    """The attester for `tee` (`auto` detects); raises AttesterUnavailable when unusable.
    `runtime_logs` (TDX, paths under `root`): the event logs whose RTMR entries go into the
    evidence (default: the Attestation Agent's)."""
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

        if runtime_logs is None:
            return TdxAttester(root=root, fs=fs)
        return TdxAttester(root=root, fs=fs, runtime_logs=runtime_logs)
    from evidence.snp import SnpAttester  # noqa: PLC0415

    return SnpAttester(root=root, fs=fs)
