"""agent.kbs_policy: the generated Trustee resource policies, evaluated in a real Rego engine
(rego-cpp through regopy) against token-shaped claims, as Trustee's KBS evaluates them."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.initdata import InitData, load_contract, parse_initdata, reference_value
from agent.kbs_policy import (
    DEFAULT_TEES,
    PolicyError,
    VolumeGrant,
    VolumePin,
    Workload,
    choose_tees,
    parse_resource_path,
    resource_policy,
    volume_policy,
)
from tests.rego_eval import allow, token

PG = ["default", "pgdata", "luks"]
CFG = ["default", "config", "luks"]
UUID = "6b1f8c1e-7d4a-4a55-9d0f-2c3e4b5a6d7e"
HEADER = "ab" * 32


def initdata(
    tee: str = "auto",
    keys: tuple[str, ...] = ("kbs:///default/pgdata/luks", "kbs:///default/config/luks"),
    algorithm: str = "sha384",
    salt: str = "",
) -> InitData:
    volumes = "".join(
        f"""
[[volumes]]
name = "vol{i}"
key = "{key}"
disk = "serial:disk{i}"
mount = "/data{i}"
"""
        for i, key in enumerate(keys)
    )
    contract = f"""version = 1
[kbs]
url = "https://kbs.example:8080"
tee = "{tee}"
{volumes}"""
    text = (
        f'version = "0.1.0"\nalgorithm = "{algorithm}"\n[data]\n'
        f'"cva.toml" = """\n{contract}"""\n"note" = "{salt}"\n'
    )
    return parse_initdata(text.encode())


def workload(doc: InitData) -> Workload:
    return Workload(doc, load_contract(doc))


def value(doc: InitData, tee: str) -> str:
    return reference_value(doc, tee).hex()


# --- the resource policy: what is allowed -------------------------------------------------


@pytest.mark.parametrize("tee", ["tdx", "snp"])
def test_matching_digest_releases_each_contract_key(tee: str) -> None:
    doc = initdata()
    policy = resource_policy([workload(doc)])
    claims = token(tee, value(doc, tee))
    assert allow(policy, claims, PG)
    assert allow(policy, claims, CFG)


def test_tdx_claim_is_the_48_byte_mrconfigid_and_snp_the_32_byte_host_data() -> None:
    doc = initdata(algorithm="sha256")
    policy = resource_policy([workload(doc)])
    digest = doc.digest()
    assert allow(policy, token("tdx", (digest + bytes(16)).hex()), PG)
    assert allow(policy, token("snp", digest.hex()), PG)
    # the bare 32-byte digest is not what the TDX verifier reports
    assert not allow(policy, token("tdx", digest.hex()), PG)


def test_tpm_claim_is_pcr8_one_extend_of_the_digest() -> None:
    doc = initdata(algorithm="sha256")
    policy = resource_policy([workload(doc)], ["tpm"])
    pcr8 = hashlib.sha256(bytes(32) + doc.digest()).hexdigest()
    assert allow(policy, token("tpm", pcr8), PG)
    assert not allow(policy, token("tpm", doc.digest().hex()), PG)


# --- what is denied -------------------------------------------------------------------------


def test_other_digest_is_denied() -> None:
    doc, other = initdata(), initdata(salt="other workload")
    policy = resource_policy([workload(doc)])
    for tee in ("tdx", "snp"):
        assert not allow(policy, token(tee, value(other, tee)), PG)
        assert not allow(policy, token(tee, value(doc, tee).upper()), PG)
        assert not allow(policy, token(tee, value(doc, tee)[:-2]), PG)


def test_other_path_and_other_plugin_are_denied() -> None:
    doc = initdata()
    policy = resource_policy([workload(doc)])
    claims = token("tdx", value(doc, "tdx"))
    for path in (
        ["default", "pgdata", "other"],
        ["default", "pgdata"],
        ["default", "pgdata", "luks", "x"],
        ["other", "pgdata", "luks"],
        [],
    ):
        assert not allow(policy, claims, path)
    assert not allow(policy, claims, PG, plugin="pkcs11")


def test_other_tee_is_denied_even_with_the_right_value_for_it() -> None:
    doc = initdata()
    policy = resource_policy([workload(doc)], ["tdx"])
    assert allow(policy, token("tdx", value(doc, "tdx")), PG)
    # SNP evidence carrying this document's HOST_DATA, or even the TDX value: not granted
    assert not allow(policy, token("snp", value(doc, "snp")), PG)
    assert not allow(policy, token("snp", value(doc, "tdx")), PG)
    # a TEE's value under another TEE's key (the values differ per TEE)
    both = resource_policy([workload(doc)])
    assert not allow(both, token("snp", value(doc, "tdx")), PG)
    assert not allow(both, token("tdx", value(doc, "snp")), PG)


def test_tpm_is_not_granted_unless_named() -> None:
    doc = initdata(algorithm="sha256")
    policy = resource_policy([workload(doc)])
    assert DEFAULT_TEES == ("tdx", "snp")
    assert not allow(policy, token("tpm", value(doc, "tpm")), PG)
    assert not allow(policy, token("az-snp-vtpm", value(doc, "tpm")), PG)


@pytest.mark.parametrize(
    "claims",
    [
        token("tdx", None),  # no init_data claim (initdata not sent / not checked)
        token(None, "x"),  # no TEE claims at all
        {"submods": {"cpu0": {"ear.status": "affirming"}}},
        {"submods": {}},
        {},
    ],
)
def test_missing_claims_are_denied(claims: dict[str, Any]) -> None:
    policy = resource_policy([workload(initdata())])
    assert not allow(policy, claims, PG)


def test_init_data_of_another_type_is_denied() -> None:
    doc = initdata()
    policy = resource_policy([workload(doc)])
    raw = value(doc, "tdx")
    for bad in ([raw], {"v": raw}, None, 1):
        claims = token("tdx", "x")
        claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["init_data"] = bad
        assert not allow(policy, claims, PG)
    # the TEE key present but not a claims object
    assert not allow(policy, token("tdx", raw, tee_claims=True), PG)  # type: ignore[arg-type]


def test_sample_is_denied() -> None:
    doc = initdata()
    policy = resource_policy([workload(doc)])
    b64 = base64.b64encode(doc.digest()).decode()
    assert not allow(policy, token("sample", b64), PG)
    assert not allow(policy, token("sample", value(doc, "tdx")), PG)
    # a token with a sample entry next to a real one is refused too
    assert not allow(policy, token("tdx", value(doc, "tdx"), extra={"sample": {}}), PG)


def test_sample_cannot_be_asked_for() -> None:
    with pytest.raises(PolicyError, match="sample"):
        resource_policy([workload(initdata())], ["sample"])
    with pytest.raises(PolicyError, match="sample"):
        resource_policy([workload(initdata(tee="sample"))])


def test_unaffirmed_appraisal_is_denied_unless_opted_out() -> None:
    doc = initdata()
    strict = resource_policy([workload(doc)])
    lax = resource_policy([workload(doc)], require_affirming=False)
    for status in ("warning", "contraindicated", "none", ""):
        claims = token("tdx", value(doc, "tdx"), status=status)
        assert not allow(strict, claims, PG)
        assert allow(lax, claims, PG)
    assert "NOT required (--allow-unaffirmed)" in lax
    # still bound to the initdata without the appraisal
    assert not allow(lax, token("tdx", value(initdata(salt="x"), "tdx"), status="warning"), PG)


# --- TEE choice -----------------------------------------------------------------------------


def test_contract_pinned_tee_is_the_default_and_the_only_choice() -> None:
    doc = initdata(tee="snp")
    policy = resource_policy([workload(doc)])
    assert allow(policy, token("snp", value(doc, "snp")), PG)
    assert not allow(policy, token("tdx", value(doc, "tdx")), PG)
    with pytest.raises(PolicyError, match=r"pins kbs\.tee = 'snp'"):
        resource_policy([workload(doc)], ["tdx"])
    assert choose_tees(load_contract(doc), ["snp"]) == ("snp",)


def test_tpm_needs_a_sha256_document() -> None:
    with pytest.raises(PolicyError, match="sha256"):
        resource_policy([workload(initdata(algorithm="sha384"))], ["tpm"])
    with pytest.raises(PolicyError, match="sha256"):
        resource_policy([workload(initdata(tee="tpm", algorithm="sha512"))])


def test_several_tees_and_several_workloads_in_one_policy() -> None:
    a = initdata(keys=("kbs:///default/a/luks",), algorithm="sha256")
    b = initdata(keys=("kbs:///default/b/luks",), salt="b")
    policy = resource_policy([workload(a), workload(b)], ["tdx", "snp"])
    path_a, path_b = ["default", "a", "luks"], ["default", "b", "luks"]
    for tee in ("tdx", "snp"):
        assert allow(policy, token(tee, value(a, tee)), path_a)
        assert allow(policy, token(tee, value(b, tee)), path_b)
        # one workload's VM never gets the other's key
        assert not allow(policy, token(tee, value(a, tee)), path_b)
        assert not allow(policy, token(tee, value(b, tee)), path_a)


def test_plugin_uris_grant_their_plugin_and_path() -> None:
    doc = initdata(keys=("kbs+pkcs11:///default/hsm/key1",))
    policy = resource_policy([workload(doc)])
    claims = token("tdx", value(doc, "tdx"))
    assert allow(policy, claims, ["default", "hsm", "key1"], plugin="pkcs11")
    assert not allow(policy, claims, ["default", "hsm", "key1"])


def test_contract_without_volumes_grants_nothing() -> None:
    doc = initdata(keys=())
    policy = resource_policy([workload(doc)])
    assert "grants nothing" not in policy  # the comment says it in other words
    assert "nothing is granted" in policy
    assert not allow(policy, token("tdx", value(doc, "tdx")), PG)


def test_header_says_what_it_binds_and_not() -> None:
    doc = initdata()
    policy = resource_policy([workload(doc)])
    head = policy.split("\npackage policy\n")[0]
    assert all(line.startswith("#") or not line for line in head.splitlines())
    for text in ("What it binds", "What it does not bind", "Deny by default", "default one"):
        assert text in head
    assert value(doc, "tdx") in head
    assert value(doc, "snp") in head
    assert "kbs:///default/pgdata/luks" in head
    assert "\npackage policy\n" in policy
    assert "default allow := false" in policy


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    salt=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ", max_size=20),
    algorithm=st.sampled_from(["sha256", "sha384", "sha512"]),
    tee=st.sampled_from(["tdx", "snp"]),
    seg=st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,12}", fullmatch=True),
    flip=st.integers(min_value=0, max_value=1000),
)
def test_property_only_the_exact_value_and_path_are_allowed(
    salt: str, algorithm: str, tee: str, seg: str, flip: int
) -> None:
    key = f"kbs:///repo/{seg}/tag"
    doc = initdata(keys=(key,), algorithm=algorithm, salt=salt)
    policy = resource_policy([workload(doc)], [tee])
    right = value(doc, tee)
    path = ["repo", seg, "tag"]
    assert allow(policy, token(tee, right), path)
    i = flip % len(right)
    wrong = right[:i] + ("0" if right[i] != "0" else "1") + right[i + 1 :]
    assert not allow(policy, token(tee, wrong), path)
    assert not allow(policy, token(tee, right), ["repo", seg + "x", "tag"])


# --- the measured-volume policy -------------------------------------------------------------


def aael(operation: str, content: Any, domain: str = "cva", index: int = 4) -> dict[str, Any]:
    """An entry of `tdx.uefi_event_logs` as Trustee's eventlog crate exposes an AAEL event."""
    return {
        "details": {
            "data": {"content": content, "domain": domain, "operation": operation},
            "string": f"{domain} {operation} ...",
            "unicode_name": "AAEL",
        },
        "digest_matches_event": True,
        "digests": [{"alg": "SHA-384", "digest": "00" * 48}],
        "event": "",
        "index": index,
        "type_name": "EV_EVENT_TAG",
    }


def content(
    uuid: str = UUID, header: str = HEADER, name: str = "pgdata", seq: int | None = 5
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "fs": "ext4",
        "header-sha256": header,
        "name": name,
        "ro": False,
        "uuid": uuid,
        "v": 1,
    }
    if seq is not None:
        out["seq"] = seq
    return out


FIRMWARE = {
    "details": {"string": "Exit Boot Services Invocation"},
    "digests": [{"alg": "SHA-384", "digest": "11" * 48}],
    "event": "",
    "index": 2,
    "type_name": "EV_EFI_ACTION",
}
SECRET = ["default", "app", "token"]


def tdx_token(events: list[dict[str, Any]], init_data: str = "00" * 48, **kw: Any) -> dict:
    return token(
        "tdx", init_data, tee_claims={"quote": {}, "uefi_event_logs": [FIRMWARE, *events]}, **kw
    )


def test_volume_policy_allows_after_open_and_denies_otherwise() -> None:
    policy = volume_policy(VolumePin("pgdata", UUID, HEADER), [tuple(SECRET)])  # type: ignore[list-item]
    assert allow(policy, tdx_token([aael("volume-open", content())]), SECRET)
    assert allow(policy, tdx_token([aael("volume-create", content(seq=1))]), SECRET)
    # no event, another uuid / header / name / domain, not an AAEL entry
    assert not allow(policy, tdx_token([]), SECRET)
    other_uuid = UUID[:-1] + "f"
    assert not allow(policy, tdx_token([aael("volume-open", content(uuid=other_uuid))]), SECRET)
    assert not allow(policy, tdx_token([aael("volume-open", content(header="cd" * 32))]), SECRET)
    assert not allow(policy, tdx_token([aael("volume-open", content(name="other"))]), SECRET)
    assert not allow(policy, tdx_token([aael("volume-open", content(), domain="evil")]), SECRET)
    not_aael = aael("volume-open", content())
    not_aael["details"]["unicode_name"] = "X"
    assert not allow(policy, tdx_token([not_aael]), SECRET)
    # content that Trustee left as a string (it did not parse as JSON) never matches
    assert not allow(policy, tdx_token([aael("volume-open", "uuid=" + UUID)]), SECRET)
    # another path, another TEE (SNP/TPM tokens carry no event log), sample
    assert not allow(policy, tdx_token([aael("volume-open", content())]), ["default", "x", "y"])
    snp = token("snp", "00" * 32, tee_claims={"uefi_event_logs": [aael("volume-open", content())]})
    assert not allow(policy, snp, SECRET)
    # unaffirmed appraisal
    assert not allow(policy, tdx_token([aael("volume-open", content())], status="warning"), SECRET)


def test_volume_policy_close_after_open_denies_and_reopen_allows() -> None:
    policy = volume_policy(VolumePin("pgdata", UUID, HEADER), [tuple(SECRET)])  # type: ignore[list-item]
    opened, closed = aael("volume-open", content()), aael("volume-close", content())
    assert not allow(policy, tdx_token([opened, closed]), SECRET)
    assert allow(policy, tdx_token([opened, closed, aael("volume-open", content(seq=6))]), SECRET)
    # a close of another volume does not count
    other_close = aael("volume-close", content(uuid="00000000-0000-4000-8000-000000000000"))
    assert allow(policy, tdx_token([opened, other_close]), SECRET)
    # unknown cva operations (e.g. a later cva's ephemeral-*) neither open nor close it
    assert allow(policy, tdx_token([opened, aael("ephemeral-close", content())]), SECRET)


def test_volume_policy_min_seq_and_initdata() -> None:
    doc = initdata()
    pin = VolumePin("pgdata", UUID, HEADER, min_seq=5)
    policy = volume_policy(pin, [tuple(SECRET)], doc)  # type: ignore[list-item]
    mr = value(doc, "tdx")
    assert allow(policy, tdx_token([aael("volume-open", content(seq=5))], mr), SECRET)
    assert allow(policy, tdx_token([aael("volume-open", content(seq=9))], mr), SECRET)
    assert not allow(policy, tdx_token([aael("volume-open", content(seq=4))], mr), SECRET)
    assert not allow(policy, tdx_token([aael("volume-open", content(seq=None))], mr), SECRET)
    other = value(initdata(salt="x"), "tdx")
    assert not allow(policy, tdx_token([aael("volume-open", content(seq=5))], other), SECRET)


def test_volume_pin_and_resource_path_validation() -> None:
    with pytest.raises(PolicyError, match="--uuid"):
        VolumePin("pgdata", UUID.upper(), HEADER)
    with pytest.raises(PolicyError, match="--header-sha256"):
        VolumePin("pgdata", UUID, HEADER[:-1])
    with pytest.raises(PolicyError, match="--volume"):
        VolumePin('a"b', UUID, HEADER)
    with pytest.raises(PolicyError, match="--min-seq"):
        VolumePin("pgdata", UUID, HEADER, min_seq=-1)
    assert parse_resource_path("kbs:///default/app/token") == ("default", "app", "token")
    assert parse_resource_path("default/app/token") == ("default", "app", "token")
    for bad in ("default/app", "a/b/c/d", "a/../c", 'a/b/"c', "kbs://host/a/b/c"):
        with pytest.raises(PolicyError, match="--resource"):
            parse_resource_path(bad)
    with pytest.raises(PolicyError, match="at least one"):
        volume_policy(VolumePin("pgdata", UUID, HEADER), [])


def test_one_policy_holds_the_keys_and_a_volume_gated_resource() -> None:
    doc = initdata()
    grant = VolumeGrant(VolumePin("pgdata", UUID, HEADER), (tuple(SECRET),))  # type: ignore[arg-type]
    policy = resource_policy([workload(doc)], volume=grant)
    mr = value(doc, "tdx")
    opened = [aael("volume-open", content())]
    # the keys: as without the volume grant (no event needed, snp too)
    assert allow(policy, tdx_token([], mr), PG)
    assert allow(policy, token("snp", value(doc, "snp")), PG)
    # the gated resource: TDX, this initdata, the volume open
    assert allow(policy, tdx_token(opened, mr), SECRET)
    assert not allow(policy, tdx_token([], mr), SECRET)
    assert not allow(policy, tdx_token(opened, value(initdata(salt="x"), "tdx")), SECRET)
    assert not allow(policy, tdx_token(opened, mr, extra={"sample": {}}), SECRET)
    assert not allow(policy, tdx_token([*opened, aael("volume-close", content())], mr), SECRET)
    assert "Volume-gated resources" in policy.split("\npackage policy\n")[0]


def test_volume_gated_resource_may_not_be_a_key_or_span_workloads() -> None:
    doc = initdata()
    key = VolumeGrant(VolumePin("pgdata", UUID, HEADER), (tuple(PG),))  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="is a contract key"):
        resource_policy([workload(doc)], volume=key)
    grant = VolumeGrant(VolumePin("pgdata", UUID, HEADER), (tuple(SECRET),))  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="exactly one"):
        resource_policy([workload(doc), workload(initdata(salt="b"))], volume=grant)
