"""Which attester to use (DESIGN §1, §8): the trusted image decides, detection fails closed.

`decide_tee` is the daemon's choice, made from the hardware and the image's `[evidence]`
config before the (still unverified) contract is read: TDX/SNP first (configfs-tsm provider
`tdx_guest` -> tdx, `sev_guest` -> snp, then `/dev/tdx_guest`, `/dev/sev-guest`), then a TPM
resource manager (`/dev/tpmrm0`). A TPM is never the root of trust while TDX/SNP is present unless
the image says its vTPM is part of the TEE (`vtpm_in_tee`); `sample` (no hardware) exists only
when the image says `allow_sample = true` and names it, and never while TDX/SNP is present.

"TDX/SNP is present" is also decided from what the CPU and the kernel report, not only from
the guest driver's device nodes (`cc_guest_reported`): a host that keeps the tdx_guest or
sev-guest driver from loading (say `modprobe.blacklist=` on the kernel command line) removes
the devices but not these signals, so it cannot push `auto` down to a TPM it attached itself.

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


# What the kernel reports whatever the guest driver does (Linux sources, read for this):
# * TDX: `tdx_early_init()` (arch/x86/coco/tdx/tdx.c) reads CPUID leaf 0x21, which the TDX
#   module answers (not the VMM), and on the "IntelTDX    " signature forces the CPU feature
#   X86_FEATURE_TDX_GUEST, shown as the flag `tdx_guest` in /proc/cpuinfo.
# * SEV-SNP: the kernel creates /sys/devices/system/cpu/sev (Documentation/ABI/testing/
#   sysfs-devices-system-cpu, "only present when running as an SEV-SNP guest", May 2024, with
#   `vmpl`); later kernels make it a symlink to /sys/hypervisor/sev/ (sysfs-hypervisor, with
#   `sev_status`, the SEV_STATUS MSR, which the hypervisor cannot intercept in an SNP guest).
#   Both come from cc_platform_has(CC_ATTR_GUEST_SEV_SNP), not from the sev-guest driver.
# A kernel older than these (SNP before the sysfs) reports nothing here: pin `tee` in the image.
CPUINFO = "proc/cpuinfo"
SNP_SYSFS = ("sys/devices/system/cpu/sev", "sys/hypervisor/sev")
MAX_CPUINFO_BYTES = 16 * 1024 * 1024


def cpu_flags(text: str) -> frozenset[str]:
    """Every CPU's `flags` of /proc/cpuinfo text (x86: `flags\t\t: fpu vme ...`)."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags.update(value.split())
    return frozenset(flags)


def cc_guest_reported(root: Path = Path("/")) -> str | None:
    """`tdx` or `snp` when the CPU/kernel says this VM is a TDX/SNP guest (with or without its
    guest driver), else None. An unreadable /proc/cpuinfo reports nothing (never on a real
    guest: the host cannot hide procfs)."""
    try:
        with (root / CPUINFO).open("rb") as f:
            text = f.read(MAX_CPUINFO_BYTES).decode("ascii", "replace")
    except OSError:
        text = ""
    if "tdx_guest" in cpu_flags(text):
        return "tdx"
    if any((root / path).exists() for path in SNP_SYSFS):
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
    reported = cc_guest_reported(root)
    if reported is not None:
        raise AttesterUnavailable(
            f"this VM is a {reported} guest ({_signal(reported)}) but its guest driver is"
            f' missing (no configfs-tsm provider, no {_DEVICE[reported]}): tee = "auto"'
            " never falls back to a TPM in a confidential guest; load the driver (check the"
            " kernel command line for a module blacklist), or pin [evidence] tee in"
            " /etc/cva/config.toml (tpm only with vtpm_in_tee = true for a paravisor vTPM)"
        )
    if _has_tpm(root):
        return "tpm"
    raise AttesterUnavailable(
        "no TEE found (no configfs-tsm provider, /dev/tdx_guest, /dev/sev-guest or /dev/tpmrm0);"
        f" {NO_TEE_NEXT_STEP}"
    )


_DEVICE = {"tdx": "/dev/tdx_guest", "snp": "/dev/sev-guest"}


def _signal(cc: str) -> str:
    return "the CPU flag tdx_guest" if cc == "tdx" else "the kernel's SEV-SNP sysfs"


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
    confidential = cc or cc_guest_reported(root)  # a driver kept from loading still counts
    if choice == "sample":
        if not allow_sample:
            raise AttesterUnavailable(
                'evidence: tee = "sample" needs allow_sample = true in the image config'
                " (test images only; production images never allow it)"
            )
        if confidential is not None:
            raise AttesterUnavailable(
                f"evidence: the sample TEE is refused on {confidential} hardware (a TEE device"
                " or CPU/kernel signal is present); set [evidence] tee to the real TEE in the"
                " image config"
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
    if confidential is not None and not vtpm_in_tee:
        raise AttesterUnavailable(
            f"evidence: a TPM is never the root of trust while {confidential} is present"
            f' (image config tee = "tpm"); use tee = "{confidential}", or vtpm_in_tee = true'
            " for a paravisor vTPM that is part of the TEE"
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
