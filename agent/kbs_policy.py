"""Trustee KBS resource policies cva generates, pure: text in, Rego text out (SPEC.md §e.8).

Trustee evaluates ONE resource policy for the whole KBS (package `policy`, rule
`data.policy.allow`) on every plugin request: `data` = `{"plugin", "resource-path", "query"}` of
the request, `input` = the claims of the verified attestation token. The TEE's claims sit at
`input.submods.cpu0["ear.veraison.annotated-evidence"]`, keyed by the TEE's name (`tdx`, `snp`,
`tpm`, `sample`, ...), next to `init_data`, which the attestation service sets to the value of
the register that measures the initdata: hex of MRCONFIGID (tdx, 48 bytes), hex of HOST_DATA
(snp, 32 bytes), hex of PCR8 (tpm), or base64 of the digest (sample: never checked against
anything). The AS's appraisal of the whole evidence (its attestation policy and reference values)
is `input.submods.cpu0["ear.status"]`.

Two generators:

* `resource_policy(workloads, ...)`: for each initdata document, allow exactly the resource
  paths its contract's `key` URIs name, only to a token whose TEE is one of the allowed TEEs and
  whose `init_data` equals THIS document's register value for THAT TEE (the value differs per
  TEE, so each grant pairs a TEE with its own value), and (unless the caller opts out) whose
  `ear.status` is `affirming`. Several documents make one policy (the KBS has one).
* `volume_policy(...)`: allow given resource paths only to a TDX token whose event log (Trustee's
  TDX verifier replays it against the RTMRs and exposes it as `tdx.uefi_event_logs`) shows cva's
  `volume-create`/`volume-open` of the pinned volume (name, LUKS UUID, header digest, optionally
  a minimum seq) not followed by its `volume-close`; optionally also bound to an initdata. The
  same rules (`VolumeGrant`) can be added to `resource_policy` for its one workload, so one
  policy holds both (the KBS has one).

Everything the generated text contains comes from validated values (contract names and URI
segments, hex, UUIDs) and is written as JSON string literals, which are Rego string literals;
comments carry only such values. Deny by default: `default allow := false`; every rule is a
conjunction of positive checks, so a missing claim leaves `allow` false.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from agent.contract import Contract
from agent.errors import InputError
from agent.initdata import InitData, reference_field, reference_value

# TEEs whose `init_data` claim is a hardware- (or TPM-) reported register; `sample` is not one.
POLICY_TEES = ("tdx", "snp", "tpm")
# Without --tee and with a contract whose tee is "auto": the TEEs whose register is set at launch
# and signed by the CPU vendor's key. A TPM's PCR8 is extended by the guest and reported by a TPM
# the host may emulate: it is granted only when asked for by name (or the contract pins tpm).
DEFAULT_TEES = ("tdx", "snp")

CLAIMS_PATH = 'input.submods.cpu0["ear.veraison.annotated-evidence"]'
STATUS_PATH = 'input.submods.cpu0["ear.status"]'
# every generated policy's head after its comment block: package, import, deny by default
_REGO_PREAMBLE = (
    "",
    "package policy",
    "",
    "import rego.v1",
    "",
    "default allow := false",
    "",
    f"claims := {CLAIMS_PATH}",
    "",
)

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")  # evidence.volume_event's rule
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # a KBS path segment (agent.contract's rule)
_PLUGIN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_SEQUENCE = (1 << 64) - 1


class PolicyError(InputError):
    """The policy cannot be generated as asked (the message says why)."""


@dataclass(frozen=True)
class Workload:
    """One initdata document with its validated contract."""

    initdata: InitData
    contract: Contract


@dataclass(frozen=True)
class Grant:
    """Release `plugin`/`path` to a `tee` token whose init_data claim is `init_data`."""

    tee: str
    init_data: str
    plugin: str
    path: tuple[str, str, str]


def _lit(value: object) -> str:
    """A JSON value written as Rego (a JSON literal is a Rego literal)."""
    return json.dumps(value, ensure_ascii=True, separators=(", ", ": "))


def choose_tees(contract: Contract, requested: Sequence[str]) -> tuple[str, ...]:
    """The TEEs a workload's keys may go to: `requested` (checked against the contract's pin),
    else the contract's pinned TEE, else DEFAULT_TEES."""
    pinned = contract.kbs.tee
    if pinned == "sample" or "sample" in requested:
        raise PolicyError(
            "tee sample: Trustee does not check a sample TEE's init_data (it copies whatever"
            " initdata the client sends), so no policy can bind a key to it; for tests use"
            " `kbs-client ... set-resource-policy --allow-all` on a throw-away KBS"
        )
    for tee in requested:
        if tee not in POLICY_TEES:
            raise PolicyError(f"--tee {tee!r}: one of {', '.join(POLICY_TEES)}")
    if requested:
        if pinned != "auto" and any(tee != pinned for tee in requested):
            raise PolicyError(
                f"--tee {', '.join(requested)}: the contract pins kbs.tee = {pinned!r}; cva"
                f" refuses to run on any other TEE, so its keys go to {pinned} only"
            )
        return tuple(dict.fromkeys(requested))
    if pinned != "auto":
        return (pinned,)
    return DEFAULT_TEES


def workload_grants(workload: Workload, tees: Sequence[str]) -> list[Grant]:
    """One grant per (TEE, key URI) of the workload, duplicates dropped, in contract order."""
    out: list[Grant] = []
    for tee in tees:
        try:
            value = reference_value(workload.initdata, tee).hex()
        except InputError as exc:  # tpm with a sha384/sha512 document
            raise PolicyError(f"--tee {tee}: {exc.message}") from None
        for volume in workload.contract.volumes:
            uri = volume.key
            path = (uri.repo, uri.type, uri.tag)
            if not all(_SEGMENT.fullmatch(seg) for seg in path) or not _PLUGIN.fullmatch(
                uri.plugin_name
            ):  # the contract parser already enforces this: belt and braces for the literal
                raise PolicyError(f"volume {volume.name}: key {uri} is not a plain KBS path")
            grant = Grant(tee, value, uri.plugin_name, path)
            if grant not in out:
                out.append(grant)
    return out


def _affirming_lines(require_affirming: bool) -> list[str]:
    if require_affirming:
        return [f'    {STATUS_PATH} == "affirming"']
    return []


def _header_common(require_affirming: bool) -> list[str]:
    lines = [
        "# Deny by default: `allow` is true only through the rules below; a request that matches",
        "# none of them (another path, another TEE, another initdata, a claim missing) is refused",
        "# (Trustee answers 401). This replaces the KBS's whole resource policy, including",
        "# Trustee's default one, which releases any resource to any attested non-sample TEE.",
    ]
    if require_affirming:
        lines += [
            '# Also required: input.submods.cpu0["ear.status"] == "affirming", i.e. Trustee\'s',
            "# attestation policy found the evidence (firmware, kernel, TCB, debug off, ...)",
            "# matching the reference values registered in its RVPS. The initdata registers are",
            "# set by the host that launches the VM: they bind the contract, not the image.",
        ]
    else:
        lines += [
            "# NOT required (--allow-unaffirmed): an affirming appraisal. Any image, including one",
            "# the host built, booted with this initdata on a genuine TEE gets these keys.",
        ]
    return lines


def resource_policy(
    workloads: Sequence[Workload],
    requested_tees: Sequence[str] = (),
    *,
    require_affirming: bool = True,
    volume: VolumeGrant | None = None,
) -> str:
    """The complete KBS resource policy for `workloads` (see the module docstring); with
    `volume`, also its volume-gated resources, bound to the (single) workload's MRCONFIGID."""
    if not workloads:
        raise PolicyError("no initdata document given")
    if volume is not None and len(workloads) != 1:
        raise PolicyError("--volume binds to one workload: give exactly one initdata FILE")
    grants: list[Grant] = []
    lines = [
        "# KBS resource policy generated by `cva initdata policy` (Trustee: package policy, rule",
        "# data.policy.allow; install: `kbs-client ... set-resource-policy --policy-file FILE`).",
        "#",
        "# What it binds: each resource path below is released only to an attestation token of",
        "# the TEE named with it whose init_data claim (the register that measures the initdata:",
        "# tdx MRCONFIGID, snp HOST_DATA, tpm PCR8) equals the value computed from that initdata",
        "# document. A workload's keys go only to VMs launched with exactly its initdata.",
    ]
    lines += _header_common(require_affirming)
    lines += [
        "# What it does not bind: which VM or pod instance (every VM launched with the same",
        "# initdata gets the same keys); the container images (that is the agent policy inside",
        "# the initdata); the request's query string; the freshness of the disks (rollback).",
        "# tpm: PCR8 is only as trustworthy as the AS's check of the TPM's attestation key; a",
        "# TPM the host emulates can report any PCR8. sample is never granted: Trustee copies",
        "# a sample client's initdata into init_data without checking it.",
        "#",
    ]
    for number, workload in enumerate(workloads, 1):
        tees = choose_tees(workload.contract, requested_tees)
        these = workload_grants(workload, tees)  # raises first when a TEE has no value
        digest = workload.initdata.digest().hex()
        lines.append(
            f"# workload {number}: initdata {workload.initdata.algorithm}:{digest}"
            f" (contract kbs.tee = {workload.contract.kbs.tee}; granted to {', '.join(tees)})"
        )
        for tee in tees:
            value = reference_value(workload.initdata, tee).hex()
            lines.append(f"#   {tee} {reference_field(tee)} = {value}")
        for vol in workload.contract.volumes:
            lines.append(f"#   volume {vol.name}: {vol.key}")
        if not workload.contract.volumes:
            lines.append("#   (the contract names no volume: nothing is granted)")
        grants += [g for g in these if g not in grants]
    mrconfigid = None
    if volume is not None:
        keys = {g.path for g in grants if g.plugin == "resource"}
        for path in volume.resources:
            if path in keys:
                raise PolicyError(
                    f"--resource {'/'.join(path)} is a contract key: the key grant already"
                    " releases it without the volume condition (and a volume key is needed"
                    " before its open can be recorded)"
                )
        mrconfigid = reference_value(workloads[0].initdata, "tdx").hex()
        lines += ["#", *_volume_header(volume, mrconfigid, workloads[0].initdata)]
    lines += [
        *_REGO_PREAMBLE,
        "# one entry per (TEE, resource): the TEE's claim object must be present and init_data",
        "# must be this workload's value for that TEE",
        "grants := [",
    ]
    for grant in grants:
        entry = {
            "tee": grant.tee,
            "init_data": grant.init_data,
            "plugin": grant.plugin,
            "path": list(grant.path),
        }
        lines.append(f"    {_lit(entry)},")
    lines += [
        "]",
        "",
        "allow if {",
        *_affirming_lines(require_affirming),
        "    not claims.sample",
        "    some grant in grants",
        "    data.plugin == grant.plugin",
        '    data["resource-path"] == grant.path',
        "    is_object(claims[grant.tee])",
        "    is_string(claims.init_data)",
        "    claims.init_data == grant.init_data",
        "}",
        "",
    ]
    if volume is not None:
        lines += _volume_rules(volume, mrconfigid, require_affirming)
    return "\n".join(lines)


@dataclass(frozen=True)
class VolumePin:
    """The volume whose open a release requires (values as cva's volume events write them)."""

    name: str
    uuid: str
    header_sha256: str
    min_seq: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _VOLUME_NAME.fullmatch(self.name):
            raise PolicyError(f"--volume: {self.name!r:.80} must match {_VOLUME_NAME.pattern}")
        if not isinstance(self.uuid, str) or not _UUID.fullmatch(self.uuid):
            raise PolicyError(
                f"--uuid: {self.uuid!r:.80} must be a lowercase 8-4-4-4-12 hex LUKS UUID"
            )
        if not isinstance(self.header_sha256, str) or not _HEX64.fullmatch(self.header_sha256):
            raise PolicyError("--header-sha256: 64 lowercase hex digits (from cva's event)")
        if self.min_seq is not None and not 0 <= self.min_seq <= MAX_SEQUENCE:
            raise PolicyError(f"--min-seq: 0..{MAX_SEQUENCE}")


def parse_resource_path(text: str) -> tuple[str, str, str]:
    """`repo/type/tag` or a `kbs:///repo/type/tag` URI, as the policy's three segments."""
    path = text.removeprefix("kbs:///")
    segments = path.split("/")
    if len(segments) != 3 or not all(
        _SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments
    ):
        raise PolicyError(
            f"--resource {text!r:.80}: REPO/TYPE/TAG (or kbs:///REPO/TYPE/TAG), each segment"
            " [A-Za-z0-9_.-]{1,128}, not . or .."
        )
    return (segments[0], segments[1], segments[2])


@dataclass(frozen=True)
class VolumeGrant:
    """Release `resources` once the pinned volume is open (see `volume_policy`)."""

    volume: VolumePin
    resources: tuple[tuple[str, str, str], ...]

    def __post_init__(self) -> None:
        if not self.resources:
            raise PolicyError("--resource: name at least one resource path to release")


def _volume_header(
    grant: VolumeGrant, mrconfigid: str | None, initdata: InitData | None
) -> list[str]:
    volume = grant.volume
    lines = [
        "# Volume-gated resources: released only to a TDX attestation token whose event log",
        "# (tdx.uefi_event_logs: the CCEL plus the runtime entries the attester appended,",
        "# which Trustee's TDX verifier replays against RTMR0-3 before exposing them) holds",
        "# cva's volume-create or volume-open event for this volume, with its LUKS UUID and",
        "# header digest, and no volume-close for that UUID after it.",
        f"#   volume {volume.name}: uuid {volume.uuid}",
        f"#   header-sha256 {volume.header_sha256}",
    ]
    if volume.min_seq is not None:
        lines.append(f"#   seq >= {volume.min_seq} (an older header copy has a lower seq)")
    if initdata is not None and mrconfigid is not None:
        lines += [
            "#   and init_data (MRCONFIGID) of this initdata:",
            f"#   initdata {initdata.algorithm}:{initdata.digest().hex()}",
            f"#   tdx MRCONFIGID = {mrconfigid}",
        ]
    else:
        lines.append("#   with any initdata (add --initdata FILE to bind the workload too)")
    lines += [f"#   resource {'/'.join(p)}" for p in grant.resources]
    lines += [
        "# Not bound by these: SNP and TPM tokens (Trustee's SNP and TPM verifiers parse no",
        "# runtime event log, so they never match); that the volume's data is fresh (a host",
        "# can put back an old data area under the newest header).",
    ]
    return lines


def _volume_rules(grant: VolumeGrant, mrconfigid: str | None, require_affirming: bool) -> list[str]:
    volume = grant.volume
    pin = {"name": volume.name, "uuid": volume.uuid, "header-sha256": volume.header_sha256}
    paths = list(dict.fromkeys(grant.resources))
    lines = [
        f"volume_resources := {_lit([list(p) for p in paths])}",
        "",
        f"volume := {_lit(pin)}",
        "",
        "# cva's events in the replayed TDX event log (AAEL entries, content parsed as JSON)",
        "cva_event(event) := data_ if {",
        '    event.type_name == "EV_EVENT_TAG"',
        '    event.details.unicode_name == "AAEL"',
        "    data_ := event.details.data",
        '    data_.domain == "cva"',
        "    is_object(data_.content)",
        "    data_.content.uuid == volume.uuid",
        "}",
        "",
        "opened_at contains i if {",
        "    some i, event in claims.tdx.uefi_event_logs",
        "    ev := cva_event(event)",
        '    ev.operation in {"volume-create", "volume-open"}',
        "    ev.content.name == volume.name",
        '    ev.content["header-sha256"] == volume["header-sha256"]',
    ]
    if volume.min_seq is not None:
        lines += [
            "    is_number(ev.content.seq)",
            f"    ev.content.seq >= {volume.min_seq}",
        ]
    lines += [
        "}",
        "",
        "closed_after(i) if {",
        "    some j, event in claims.tdx.uefi_event_logs",
        "    j > i",
        '    cva_event(event).operation == "volume-close"',
        "}",
        "",
        "volume_is_open if {",
        "    some i in opened_at",
        "    not closed_after(i)",
        "}",
        "",
        "allow if {",
        *_affirming_lines(require_affirming),
        "    not claims.sample",
        '    data.plugin == "resource"',
        '    data["resource-path"] in volume_resources',
        "    is_object(claims.tdx)",
    ]
    if mrconfigid is not None:
        lines.append(f"    claims.init_data == {_lit(mrconfigid)}")
    lines += [
        "    volume_is_open",
        "}",
        "",
    ]
    return lines


def volume_policy(
    volume: VolumePin,
    resources: Sequence[tuple[str, str, str]],
    initdata: InitData | None = None,
    *,
    require_affirming: bool = True,
) -> str:
    """A KBS resource policy releasing `resources` (resource plugin) only to a TDX token whose
    replayed event log shows `volume` opened (or created) by cva and not closed since."""
    grant = VolumeGrant(volume, tuple(resources))
    mrconfigid = reference_value(initdata, "tdx").hex() if initdata is not None else None
    lines = [
        "# KBS resource policy generated by `cva evidence policy` (Trustee: package policy, rule",
        "# data.policy.allow; install: `kbs-client ... set-resource-policy --policy-file FILE`).",
        "#",
        *_volume_header(grant, mrconfigid, initdata),
        *_header_common(require_affirming),
        "# Also not bound: which VM (any VM with these events); the request's query string.",
        *_REGO_PREAMBLE,
        *_volume_rules(grant, mrconfigid, require_affirming),
    ]
    return "\n".join(lines)
