"""The prestart hook's pure parsers: the OCI state on stdin and the private socket's messages
(hostile bytes: every input either parses to checked values or raises the module's one error)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.hook.state import HookState, StateError, parse_state
from agent.hook.wire import (
    Answer,
    Done,
    HookVolume,
    Request,
    WireError,
    decode_answer,
    decode_done,
    decode_request,
    encode_answer,
    encode_done,
    encode_request,
)

KATA_STATE = {  # what kata-agent writes (SPEC §e.7), empty fields left out
    "ociVersion": "1.1.0",
    "id": "3f1c2a",
    "status": "created",
    "pid": 4242,
    "bundle": "/run/kata-containers/3f1c2a",
    "annotations": {"io.kubernetes.cri.container-name": "postgres"},
}


def test_parse_kata_state() -> None:
    assert parse_state(json.dumps(KATA_STATE).encode()) == HookState(
        "3f1c2a", 4242, "/run/kata-containers/3f1c2a"
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": None}, "id"),
        ({"id": "../etc"}, "id"),
        ({"id": "a"}, "id"),
        ({"pid": 0}, "pid"),
        ({"pid": 1}, "pid"),
        ({"pid": True}, "pid"),
        ({"pid": "42"}, "pid"),
        ({"pid": 2**40}, "pid"),
        ({"bundle": "run/kata"}, "bundle"),
        ({"bundle": "/run/kata-containers/../x"}, "bundle"),
        ({"bundle": "/run//x"}, "bundle"),
        ({"bundle": "/run/x\0"}, "bundle"),
        ({"bundle": 5}, "bundle"),
    ],
)
def test_state_refusals_name_the_field(change: dict[str, object], field: str) -> None:
    doc = {**KATA_STATE, **change}
    with pytest.raises(StateError, match=field):
        parse_state(json.dumps(doc).encode())


@pytest.mark.parametrize("raw", [b"", b"[]", b"null", b"{", b"\xff", b"[" * 100000])
def test_state_not_an_object(raw: bytes) -> None:
    with pytest.raises(StateError):
        parse_state(raw)


def test_state_too_large() -> None:
    with pytest.raises(StateError, match="larger"):
        parse_state(b" " * (1024 * 1024 + 1))


@given(st.binary(max_size=512))
def test_state_hostile_bytes(raw: bytes) -> None:
    try:
        state = parse_state(raw)
    except StateError:
        return
    assert state.pid > 1 and state.bundle.startswith("/")


def test_messages_round_trip() -> None:
    req = Request("c1", 77, "/run/kata-containers/c1", 7.5)
    assert decode_request(encode_request(req)) == req
    answer = Answer(
        ok=True,
        rootfs="/run/kata-containers/c1/rootfs",
        volumes=(
            HookVolume("pg", "/var/lib/pg", False, "253:3", None),
            HookVolume("ro", "/ro", True, "253:4", "/dev/xvdb"),
        ),
    )
    assert decode_answer(encode_answer(answer)) == answer
    refusal = Answer(ok=False, error="KBS refused")
    assert decode_answer(encode_answer(refusal)) == refusal
    assert decode_done(encode_done(Done(True))) == Done(True)
    assert decode_done(encode_done(Done(False, "x"))) == Done(False, "x")


@pytest.mark.parametrize(
    "doc",
    [
        {"op": "other", "id": "c1", "pid": 5, "bundle": "/b", "budget": 1},
        {"op": "prestart", "id": "c1", "pid": 1, "bundle": "/b", "budget": 1},
        {"op": "prestart", "id": "c1", "pid": 5, "bundle": "/b", "budget": 301},
        {"op": "prestart", "id": "c1", "pid": 5, "bundle": "/b", "budget": True},
        {"op": "prestart", "id": 3, "pid": 5, "bundle": "/b", "budget": 1},
    ],
)
def test_bad_requests(doc: dict[str, object]) -> None:
    with pytest.raises(WireError):
        decode_request(json.dumps(doc).encode())


GOOD_VOL = {"name": "pg", "mount": "/d", "read_only": False, "dev": "253:3", "remove": None}


@pytest.mark.parametrize(
    "doc",
    [
        {"ok": "yes"},
        {"ok": True, "rootfs": "/r", "volumes": "x"},
        {"ok": True, "rootfs": "r", "volumes": []},
        {"ok": True, "rootfs": "/r", "volumes": [{**GOOD_VOL, "dev": "253"}]},
        {"ok": True, "rootfs": "/r", "volumes": [{**GOOD_VOL, "dev": "0253:3"}]},
        {"ok": True, "rootfs": "/r", "volumes": [{**GOOD_VOL, "mount": "rel"}]},
        {"ok": True, "rootfs": "/r", "volumes": [{**GOOD_VOL, "read_only": 0}]},
        {"ok": True, "rootfs": "/r", "volumes": [{**GOOD_VOL, "remove": "/etc/passwd"}]},
        {"ok": True, "rootfs": "/r", "volumes": [GOOD_VOL] * 65},
        {"ok": False},
    ],
)
def test_bad_answers(doc: dict[str, object]) -> None:
    with pytest.raises(WireError):
        decode_answer(json.dumps(doc).encode())


def test_closed_connection_is_an_error() -> None:
    for decode in (decode_request, decode_answer, decode_done):
        with pytest.raises(WireError, match="closed"):
            decode(b"")


@given(st.binary(max_size=512))
def test_wire_hostile_bytes(raw: bytes) -> None:
    for decode in (decode_request, decode_answer, decode_done):
        with contextlib.suppress(WireError):
            decode(raw)


def test_the_hooks_config_defaults_are_the_daemons(tmp_path: Path) -> None:
    from agent.config import DEFAULT_CONFIG_PATH, PathsConfig, load_config
    from agent.hook import prestart

    assert prestart.DEFAULT_CONFIG == DEFAULT_CONFIG_PATH
    assert Path(prestart.DEFAULT_STATE_DIR) == PathsConfig().state_dir
    cfg = tmp_path / "config.toml"
    cfg.write_text('[paths]\nstate_dir = "/run/elsewhere"\n[listen]\nvsock_port = 1040\n')
    assert prestart.socket_path_for(cfg) == load_config(cfg).paths.state_dir / "hook.sock"
    for bad in ('[paths]\nstate_dir = "rel"\n', "[paths\n", "[paths]\nstate_dir = 3\n"):
        cfg.write_text(bad)
        with pytest.raises(prestart.HookFailure):
            prestart.socket_path_for(cfg)
    with pytest.raises(prestart.HookFailure, match="does not exist"):
        prestart.socket_path_for(tmp_path / "missing.toml")
