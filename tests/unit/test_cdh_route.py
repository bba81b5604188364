"""agent.cdh: which calls cva answers on the CDH socket and which go to the real CDH (pure), and
the `[cdh]` section of the image config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent._proto.cdh import api_pb2
from agent.cdh.route import Route, route
from agent.config import ConfigError, parse_config

SM = ("api.SecureMountService", "SecureMount")
SERVED = frozenset({"api.SecureMountService/SecureMount", "cva.v1.VolumeAgent/PrepareVolumes"})


def sm(volume_type: str) -> bytes:
    return api_pb2.SecureMountRequest(volume_type=volume_type).SerializeToString()


@pytest.mark.parametrize("upstream", [True, False])
@pytest.mark.parametrize("served", [SERVED, frozenset()])
@pytest.mark.parametrize("payload", [sm("block-device"), b"\xff\xff", b""])
def test_block_device_secure_mount_is_never_forwarded(
    upstream: bool, served: frozenset[str], payload: bytes
) -> None:
    # b"" decodes as volume_type "" -> not a block device: CDH's when there is an upstream
    decision = route(*SM, payload, served=served, upstream=upstream)
    if payload == b"":
        assert decision.route in (Route.FORWARD, Route.LOCAL, Route.NO_UPSTREAM)
        return
    want = Route.LOCAL if served else Route.SECURE_MOUNT_NOT_ALLOWED
    assert decision.route is want


def test_other_volume_types_go_to_cdh_only_with_an_upstream() -> None:
    oss = sm("alibaba-cloud-oss")
    assert route(*SM, oss, served=SERVED, upstream=True).route is Route.FORWARD
    assert route(*SM, oss, served=SERVED, upstream=False).route is Route.LOCAL  # cva refuses
    assert route(*SM, oss, served=frozenset(), upstream=False).route is Route.NO_UPSTREAM


@pytest.mark.parametrize(
    ("service", "method"),
    [
        ("api.ImagePullService", "PullImage"),
        ("api.SealedSecretService", "UnsealSecret"),
        ("api.GetResourceService", "GetResource"),
        ("keyprovider.KeyProviderService", "UnWrapKey"),
        ("api.SecureVolumeService", "Anything"),
    ],
)
def test_cdh_methods_are_forwarded(service: str, method: str) -> None:
    assert route(service, method, b"x", served=SERVED, upstream=True).route is Route.FORWARD
    assert route(service, method, b"x", served=SERVED, upstream=False).route is Route.NO_UPSTREAM


def test_cvas_namespace_is_never_forwarded() -> None:
    assert (
        route("cva.v1.VolumeAgent", "PrepareVolumes", b"", served=SERVED, upstream=True).route
        is Route.LOCAL
    )
    assert (
        route("cva.v1.VolumeAgent", "Nope", b"", served=SERVED, upstream=True).route
        is Route.UNKNOWN_CVA_METHOD
    )


@given(st.text(max_size=40), st.text(max_size=40), st.binary(max_size=256), st.booleans())
def test_route_is_total_and_keeps_block_devices(
    service: str, method: str, payload: bytes, upstream: bool
) -> None:
    decision = route(service, method, payload, served=SERVED, upstream=upstream)
    assert decision.full_method == f"{service}/{method}"
    if decision.route is Route.FORWARD:
        assert upstream
        assert not service.startswith("cva.")


@given(st.binary(max_size=512))
def test_hostile_secure_mount_payloads_are_never_forwarded_as_block_devices(
    payload: bytes,
) -> None:
    decision = route(*SM, payload, served=frozenset(), upstream=True)
    if decision.route is Route.FORWARD:
        assert api_pb2.SecureMountRequest.FromString(payload).volume_type != "block-device"


def test_config_cdh_section() -> None:
    cfg = parse_config(
        '[listen]\nttrpc = "unix:///run/confidential-containers/cdh.sock"\n'
        '[cdh]\nupstream = "unix:///run/confidential-containers/cdh-upstream.sock"\n'
        "timeout = 1500\n"
    )
    assert cfg.cdh.upstream == Path("/run/confidential-containers/cdh-upstream.sock")
    assert cfg.cdh.timeout == 1500.0
    assert parse_config("").cdh.upstream is None


@pytest.mark.parametrize(
    ("doc", "rule"),
    [
        ('[listen]\nttrpc = "/run/c/cdh.sock"\n[cdh]\nupstream = "/run/c/cdh.sock"\n', "own"),
        ('[cdh]\nupstream = "/run/c/up.sock"\n', "needs listen.ttrpc"),
        ('[listen]\nttrpc = "/run/c/cdh.sock"\n[cdh]\nupstream = "tcp://x:1"\n', "unix"),
        ('[listen]\nttrpc = "/run/c/cdh.sock"\n[cdh]\ntimeout = 0\n', "cdh.timeout"),
        ("[cdh]\nnope = 1\n", "cdh.nope"),
    ],
)
def test_config_cdh_refused(doc: str, rule: str) -> None:
    with pytest.raises(ConfigError, match=rule):
        parse_config(doc)
