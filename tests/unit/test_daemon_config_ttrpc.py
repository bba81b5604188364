"""`listen.ttrpc`: the optional ttRPC listener (default off), parsed strictly."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import CDH_TTRPC_SOCKET, ConfigError, parse_config


def test_off_by_default() -> None:
    assert parse_config("").listen.ttrpc is None


@pytest.mark.parametrize(
    "value",
    ["unix:///run/confidential-containers/cdh.sock", "/run/confidential-containers/cdh.sock"],
)
def test_cdh_socket_path(value: str) -> None:
    cfg = parse_config(f'[listen]\nttrpc = "{value}"\n')
    assert cfg.listen.ttrpc == CDH_TTRPC_SOCKET == Path("/run/confidential-containers/cdh.sock")


def test_ttrpc_alone_is_a_listen_address() -> None:
    cfg = parse_config('[listen]\nvsock_port = 0\nttrpc = "/run/x/cdh.sock"\n')
    assert cfg.listen.ttrpc == Path("/run/x/cdh.sock")


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("5", "must be a string"),
        ('"relative/cdh.sock"', "absolute path"),
        ('"unix://relative.sock"', "absolute path"),
        ('"unix:/run/cdh.sock"', "unix:///absolute/path"),
        ('"vsock://3:1024"', "unix:///absolute/path"),
        ('"tcp://127.0.0.1:1"', "unix:///absolute/path"),
        ('"/run/../etc/cdh.sock"', "without '..'"),
        ('"/run/cva/grpc.sock"', "must not be a gRPC socket path"),
        ('"/run/cva/cva.sock"', "must not be a gRPC socket path"),
    ],
)
def test_refused(value: str, rule: str) -> None:
    doc = f'[listen]\nunix = "/run/cva/cva.sock"\nttrpc = {value}\n'
    with pytest.raises(ConfigError, match=r"listen\.ttrpc") as info:
        parse_config(doc)
    assert rule in info.value.message


def test_state_dir_socket_collision_follows_paths() -> None:
    with pytest.raises(ConfigError, match="gRPC socket"):
        parse_config('[listen]\nttrpc = "/tmp/s/grpc.sock"\n[paths]\nstate_dir = "/tmp/s"\n')


def test_ttrpc_vsock_off_by_default_and_parsed() -> None:
    assert parse_config("").listen.ttrpc_vsock_port == 0
    cfg = parse_config("[listen]\nttrpc_vsock_port = 1041\n")
    assert (cfg.listen.ttrpc_vsock_port, cfg.listen.vsock_port) == (1041, 1040)
    alone = parse_config("[listen]\nvsock_port = 0\nttrpc_vsock_port = 1041\n")
    assert alone.listen.ttrpc_vsock_port == 1041


@pytest.mark.parametrize(
    ("doc", "rule"),
    [
        ("ttrpc_vsock_port = 1040", "must differ from listen.vsock_port"),
        ("ttrpc_vsock_port = 1024", "kata's own"),
        ("ttrpc_vsock_port = 1026", "kata's own"),
        ('ttrpc_vsock_port = "1041"', "integer port"),
        ("ttrpc_vsock_port = true", "integer port"),
        ("ttrpc_vsock_port = 4294967295", "below 4294967295"),
        ("ttrpc_vsock_port = -1", "below 4294967295"),
    ],
)
def test_ttrpc_vsock_refused(doc: str, rule: str) -> None:
    with pytest.raises(ConfigError, match=r"listen\.ttrpc_vsock_port") as info:
        parse_config(f"[listen]\n{doc}\n")
    assert rule in info.value.message
