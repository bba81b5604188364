from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import (
    DEFAULT_VSOCK_PORT,
    ConfigError,
    DaemonConfig,
    load_config,
    parse_config,
    parse_tcp_address,
)


def test_empty_document_is_the_defaults() -> None:
    cfg = parse_config("")
    assert cfg == DaemonConfig()
    assert cfg.listen.vsock_port == DEFAULT_VSOCK_PORT == 1040
    assert cfg.paths.rootfs_base == Path("/run/kata-containers")
    assert cfg.private_socket == Path("/run/cva/grpc.sock")


def test_full_document() -> None:
    cfg = parse_config(
        """
[listen]
vsock_port = 0
unix = "/run/cva/cva.sock"
tcp = "127.0.0.1:50051"
[initdata]
devices = ["/dev/vdb"]
toml = "/run/x/initdata.toml"
[paths]
rootfs_base = "/tmp/kata"
state_dir = "/tmp/state"
mount_base = "/tmp/mnt"
[timeouts]
call = 5
disk_wait = 1.5
kbs = 2
shutdown_grace = 3
[log]
level = "debug"
"""
    )
    assert cfg.listen.tcp == ("127.0.0.1", 50051)
    assert cfg.listen.unix == Path("/run/cva/cva.sock")
    assert cfg.initdata.devices == (Path("/dev/vdb"),)
    assert cfg.timeouts.call == 5.0 and cfg.timeouts.disk_wait == 1.5
    assert cfg.log_level == "debug"


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ("bogus = 1", "unknown section or key bogus"),
        ("[listen]\nport = 1", "unknown key listen.port"),
        ("[listen]\nvsock_port = -1", "listen.vsock_port"),
        ("[listen]\nvsock_port = true", "listen.vsock_port"),
        ("[listen]\nvsock_port = 4294967295", "listen.vsock_port"),
        ('[listen]\ntcp = "0.0.0.0:1"', "loopback"),
        ('[listen]\ntcp = "10.0.0.1:80"', "loopback"),
        ('[listen]\ntcp = "localhost:80"', "loopback IP"),
        ('[listen]\ntcp = "127.0.0.1:0"', "port out of range"),
        ('[listen]\ntcp = "127.0.0.1"', "HOST:PORT"),
        ('[listen]\nunix = "relative.sock"', "absolute path"),
        ('[paths]\nstate_dir = "/run/../etc"', "without '..'"),
        ("[timeouts]\ncall = 0", "timeouts.call"),
        ('[timeouts]\ncall = "5"', "timeouts.call"),
        ('[log]\nlevel = "trace"', "log.level"),
        ("[listen]\nvsock_port = 0", "no listen address"),
        ("listen = 1", "[listen] must be a table"),
        ("[[listen]]", "[listen] must be a table"),
        ("[initdata]\ndevices = [1]", "initdata.devices[]"),
        ("= =", "not valid TOML"),
    ],
)
def test_refusals_name_the_key(doc: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(doc)
    assert needle in info.value.message
    assert "\n" not in info.value.message


def test_ipv6_loopback() -> None:
    assert parse_tcp_address("[::1]:9") == ("::1", 9)


def test_missing_default_file_means_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("agent.config.DEFAULT_CONFIG_PATH", tmp_path / "none.toml")
    assert load_config(None) == DaemonConfig()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_non_utf8_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


@given(st.text(max_size=300))
def test_any_text_gives_config_or_clean_error(text: str) -> None:
    try:
        assert isinstance(parse_config(text), DaemonConfig)
    except ConfigError as exc:
        assert "\n" not in exc.message
