"""The image decides the TEE (evidence.detect.decide_tee): hardware first, the image's
`[evidence]` config second, the contract never. TDX/SNP machines are faked at the kernel ABI
(/dev nodes, configfs-tsm through tests.fake_kernel.FakeTsm)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evidence.detect import decide_tee, detect_tee
from evidence.errors import AttesterUnavailable
from tests.fake_kernel import FakeTsm


def _dev(root: Path, *names: str) -> Path:
    (root / "dev").mkdir(exist_ok=True)
    for name in names:
        (root / "dev" / name).touch()
    return root


def _tsm(root: Path, provider: str | None) -> FakeTsm:
    return FakeTsm(root, provider, lambda p, i, lvl: (b"", None))


def test_auto_prefers_tdx_snp_over_a_tpm(tmp_path: Path) -> None:
    _dev(tmp_path, "tpmrm0")
    assert decide_tee("auto", root=tmp_path) == "tpm"
    assert decide_tee("auto", root=tmp_path, fs=_tsm(tmp_path, "tdx_guest")) == "tdx"
    assert decide_tee("auto", root=tmp_path, fs=_tsm(tmp_path, "sev_guest")) == "snp"
    _dev(tmp_path, "sev-guest")
    assert decide_tee("auto", root=tmp_path) == "snp"
    assert decide_tee("auto", root=tmp_path, vtpm_in_tee=True) == "snp"  # tpm only by name


def test_auto_never_picks_sample(tmp_path: Path) -> None:
    with pytest.raises(AttesterUnavailable, match="no TEE found"):
        decide_tee("auto", allow_sample=True, root=tmp_path)


def test_no_tee_error_points_at_hardware_and_image_config_not_sample(tmp_path: Path) -> None:
    """Issue 13 #4: the start error suggested `tee = "sample"` (a contract value) as a fix."""
    with pytest.raises(AttesterUnavailable) as info:
        detect_tee(tmp_path)
    message = info.value.message
    assert "sample" not in message and "contract" not in message
    assert "/etc/cva/config.toml [evidence]" in message and "TDX, SNP or a TPM" in message
    assert "\n" not in message


def test_tpm_is_never_the_root_of_trust_next_to_tdx_or_snp(tmp_path: Path) -> None:
    _dev(tmp_path, "tpmrm0", "tdx_guest")
    with pytest.raises(AttesterUnavailable, match="TPM is never the root of trust while tdx"):
        decide_tee("tpm", root=tmp_path)
    fake = _tsm(tmp_path / "snp", "sev_guest")
    _dev(tmp_path / "snp", "tpmrm0")
    with pytest.raises(AttesterUnavailable, match="while snp is present"):
        decide_tee("tpm", root=tmp_path / "snp", fs=fake)


def test_a_paravisor_vtpm_is_the_root_only_when_the_image_says_so(tmp_path: Path) -> None:
    _dev(tmp_path, "tpmrm0", "sev-guest")
    assert decide_tee("tpm", vtpm_in_tee=True, root=tmp_path) == "tpm"
    (tmp_path / "dev/tpmrm0").unlink()
    with pytest.raises(AttesterUnavailable, match="tpmrm0 is missing"):
        decide_tee("tpm", vtpm_in_tee=True, root=tmp_path)


def test_image_tdx_or_snp_must_be_the_hardware(tmp_path: Path) -> None:
    with pytest.raises(AttesterUnavailable, match="no TDX/SNP device"):
        decide_tee("tdx", root=_dev(tmp_path, "tpmrm0"))
    _dev(tmp_path, "sev-guest")
    assert decide_tee("snp", root=tmp_path) == "snp"
    with pytest.raises(AttesterUnavailable, match="says tee = 'tdx' but this machine has snp"):
        decide_tee("tdx", root=tmp_path)


def test_sample_needs_allow_sample(tmp_path: Path) -> None:
    with pytest.raises(AttesterUnavailable, match="allow_sample = true"):
        decide_tee("sample", root=tmp_path)
    assert decide_tee("sample", allow_sample=True, root=tmp_path) == "sample"


def test_sample_with_a_tpm_but_no_tee_device(tmp_path: Path) -> None:
    """The VM suite's guest has a swtpm and runs sample scenarios: a TPM is not a TEE device."""
    _dev(tmp_path, "tpmrm0")
    assert decide_tee("sample", allow_sample=True, root=tmp_path) == "sample"
    assert decide_tee("sample", allow_sample=True, root=tmp_path, fs=_tsm(tmp_path, None)) == (
        "sample"
    )


@pytest.mark.parametrize("device", ["tdx_guest", "sev-guest"])
def test_sample_is_refused_when_a_tee_device_is_present(tmp_path: Path, device: str) -> None:
    _dev(tmp_path, device)
    with pytest.raises(AttesterUnavailable, match="sample TEE is refused on"):
        decide_tee("sample", allow_sample=True, root=tmp_path)


@pytest.mark.parametrize("provider", ["tdx_guest", "sev_guest", "arm_cca_guest"])
def test_sample_is_refused_with_a_configfs_tsm_provider(tmp_path: Path, provider: str) -> None:
    with pytest.raises(AttesterUnavailable, match=r"refused on|not supported"):
        decide_tee("sample", allow_sample=True, root=tmp_path, fs=_tsm(tmp_path, provider))


@pytest.mark.parametrize("choice", ["", "SAMPLE", "az-snp-vtpm", "az-tdx-vtpm", "sgx", "auto "])
def test_unknown_image_choices_are_refused(tmp_path: Path, choice: str) -> None:
    with pytest.raises(AttesterUnavailable, match="unknown tee"):
        decide_tee(choice, allow_sample=True, vtpm_in_tee=True, root=tmp_path)


# -- a confidential guest whose driver the host kept from loading (issue 21 #2) ----------------

CPUINFO = "processor\t: {n}\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse {extra}\n\n"


def _cpuinfo(root: Path, extra: str = "", cpus: int = 2) -> Path:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    text = "".join(CPUINFO.format(n=n, extra=extra) for n in range(cpus))
    (root / "proc/cpuinfo").write_text(text)
    return root


def _snp_sysfs(root: Path, path: str = "sys/devices/system/cpu/sev") -> Path:
    (root / path).mkdir(parents=True)
    (root / path / "vmpl").write_text("0\n")
    return root


def test_cpu_flags_are_every_flags_line() -> None:
    from evidence.detect import cpu_flags

    text = "flags\t\t: fpu tdx_guest\nbugs\t\t: spectre_v1\nflags : sse\nflagsx: nope\n"
    assert cpu_flags(text) == frozenset({"fpu", "tdx_guest", "sse"})
    assert cpu_flags("") == frozenset()
    assert cpu_flags("garbage\x00\nflags\n:::\n") == frozenset()


def test_reported_tdx_or_snp_without_the_driver_never_falls_back_to_the_tpm(
    tmp_path: Path,
) -> None:
    tdx = _dev(_cpuinfo(tmp_path / "tdx", "tdx_guest"), "tpmrm0")
    with pytest.raises(AttesterUnavailable, match=r"tdx guest \(the CPU flag tdx_guest\)"):
        decide_tee("auto", root=tdx)
    with pytest.raises(AttesterUnavailable, match="never falls back to a TPM"):
        detect_tee(tdx)
    for path in ("sys/devices/system/cpu/sev", "sys/hypervisor/sev"):
        snp = _dev(_snp_sysfs(_cpuinfo(tmp_path / path), path), "tpmrm0")
        with pytest.raises(AttesterUnavailable, match=r"snp guest \(the kernel's SEV-SNP sysfs"):
            decide_tee("auto", root=snp)


def test_a_plain_vm_with_a_tpm_still_decides_tpm(tmp_path: Path) -> None:
    root = _dev(_cpuinfo(tmp_path, "sse sse2 hypervisor"), "tpmrm0")
    assert decide_tee("auto", root=root) == "tpm"
    assert decide_tee("tpm", root=root) == "tpm"


def test_reported_guest_refuses_tpm_and_sample_unless_vtpm_in_tee(tmp_path: Path) -> None:
    root = _dev(_cpuinfo(tmp_path, "tdx_guest"), "tpmrm0")
    with pytest.raises(AttesterUnavailable, match="TPM is never the root of trust while tdx"):
        decide_tee("tpm", root=root)
    assert decide_tee("tpm", vtpm_in_tee=True, root=root) == "tpm"
    with pytest.raises(AttesterUnavailable, match="sample TEE is refused on tdx"):
        decide_tee("sample", allow_sample=True, root=root)
    snp = _dev(_snp_sysfs(tmp_path / "snp"), "tpmrm0")
    with pytest.raises(AttesterUnavailable, match="while snp is present"):
        decide_tee("tpm", root=snp)


def test_with_the_driver_the_reported_guest_decides_as_before(tmp_path: Path) -> None:
    root = _dev(_cpuinfo(tmp_path, "tdx_guest"), "tpmrm0", "tdx_guest")
    assert decide_tee("auto", root=root) == "tdx"
    assert decide_tee("tdx", root=root) == "tdx"
