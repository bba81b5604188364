from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import policy
from agent.errors import CvaError
from tests.daemon_support import C, contract, make_bundle, volume

ALL = C.ApiPolicy(frozenset({"PrepareVolumes", "ReleaseVolumes", "ListVolumes"}))


@pytest.mark.parametrize("rpc", ["PrepareVolumes", "ReleaseVolumes", "ListVolumes"])
def test_listed_rpcs_are_allowed(rpc: str) -> None:
    policy.check_rpc_allowed(f"/cva.v1.VolumeAgent/{rpc}", ALL)


@pytest.mark.parametrize(
    "method",
    [
        "/cva.v1.VolumeAgent/ListVolumes",  # not in this contract's list
        "/cva.v1.VolumeAgent/Format",  # unknown method of our service
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.health.v1.Health/Other",
        "/other.Svc/PrepareVolumes",
        "cva.v1.VolumeAgent/PrepareVolumes",
        "//",
        "",
        "/cva.v1.VolumeAgent/PrepareVolumes/x",
    ],
)
def test_default_deny(method: str) -> None:
    api = C.ApiPolicy(frozenset({"PrepareVolumes"}))
    with pytest.raises(policy.PolicyDenied, match="not allowed"):
        policy.check_rpc_allowed(method, api)


def test_allow_list_cannot_admit_unknown_names() -> None:
    try:
        api = C.ApiPolicy(frozenset({"Format", "PrepareVolumes"}))
    except CvaError:
        return  # the contract refuses unknown names itself: fine too
    with pytest.raises(policy.PolicyDenied):
        policy.check_rpc_allowed("/cva.v1.VolumeAgent/Format", api)


def test_health_is_always_callable() -> None:
    api = C.ApiPolicy(frozenset())
    policy.check_rpc_allowed("/grpc.health.v1.Health/Check", api)
    policy.check_rpc_allowed("/grpc.health.v1.Health/Watch", api)


@pytest.mark.parametrize("cid", ["ab", "a" * 64, "0123abcdef", "pod_1.ctr-2", "A.b"])
def test_valid_container_ids(cid: str) -> None:
    assert policy.validate_container_id(cid) == cid


@pytest.mark.parametrize(
    "cid",
    ["", "a", ".a", "-a", "_a", "a/b", "..", "a b", "a\x00b", "ä1", "a" * 256, "a\nb", "../x"],
)
def test_invalid_container_ids(cid: str) -> None:
    with pytest.raises(policy.RequestError):
        policy.validate_container_id(cid)


@given(st.text(max_size=300))
def test_any_container_id_is_a_single_safe_component_or_refused(cid: str) -> None:
    try:
        policy.validate_container_id(cid)
    except policy.RequestError:
        return
    assert "/" not in cid and cid not in (".", "..") and "\x00" not in cid and len(cid) < 256


def _oci(annotations: object) -> bytes:
    return json.dumps({"annotations": annotations}).encode()


def test_name_from_oci() -> None:
    assert policy.container_name_from_oci(_oci({policy.NAME_ANNOTATION: "postgres"})) == "postgres"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"not json", "not valid JSON"),
        (b"[" * 100000, "not valid JSON"),
        (b"[]", "no annotations"),
        (_oci([]), "no annotations"),
        (_oci({}), "no io.kubernetes.cri.container-name"),
        (_oci({policy.NAME_ANNOTATION: 3}), "no io.kubernetes"),
        (_oci({policy.NAME_ANNOTATION: "Bad_Name"}), "DNS-1123"),
        (_oci({policy.NAME_ANNOTATION: "a" * 64}), "DNS-1123"),
        (b" " * (policy.MAX_OCI_CONFIG_BYTES + 1), "larger than"),
    ],
)
def test_hostile_oci_config(data: bytes, needle: str) -> None:
    with pytest.raises(policy.BundleError) as info:
        policy.container_name_from_oci(data)
    assert needle in info.value.message


@given(st.binary(max_size=500))
def test_any_oci_bytes_name_or_clean_error(data: bytes) -> None:
    try:
        name = policy.container_name_from_oci(data)
    except policy.BundleError:
        return
    assert isinstance(name, str)


def test_read_container_name(tmp_path: Path) -> None:
    make_bundle(tmp_path, "cid1", "postgres")
    assert policy.read_container_name(tmp_path, "cid1") == "postgres"


def test_missing_bundle_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(policy.ContainerNotFound, match="no container cid1"):
        policy.read_container_name(tmp_path, "cid1")


def test_symlinked_config_is_refused(tmp_path: Path) -> None:
    make_bundle(tmp_path, "other", "postgres")
    (tmp_path / "cid1").mkdir()
    os.symlink(tmp_path / "other" / "config.json", tmp_path / "cid1" / "config.json")
    with pytest.raises(policy.BundleError, match="symlink"):
        policy.read_container_name(tmp_path, "cid1")


def test_fifo_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cid1").mkdir()
    os.mkfifo(tmp_path / "cid1" / "config.json")
    with pytest.raises(policy.BundleError, match="not a regular file"):
        policy.read_container_name(tmp_path, "cid1")


def test_bad_cid_never_touches_the_filesystem(tmp_path: Path) -> None:
    with pytest.raises(policy.RequestError):
        policy.read_container_name(tmp_path, "../etc")


def test_volumes_for_container() -> None:
    c = contract(
        volume("pg", containers=("postgres",)),
        volume("shared"),
        volume("web", containers=("nginx", "sidecar")),
    )
    assert [v.name for v in policy.volumes_for_container(c, "postgres")] == ["pg", "shared"]
    assert [v.name for v in policy.volumes_for_container(c, "sidecar")] == ["shared", "web"]
    assert [v.name for v in policy.volumes_for_container(c, "other")] == ["shared"]
