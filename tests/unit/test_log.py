"""agent.log: each processor on its own, then the whole pipeline never printing a key."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from agent.errors import CvaError
from agent.log import (
    REDACTED,
    add_log_level,
    add_timestamp,
    configure_logging,
    exception_dict,
    exception_message,
    get_logger,
    is_secret_key,
    redact,
    redact_value,
    render_exception,
    render_json,
)
from luks.secret import Secret

KEY = bytes(range(7, 39))  # 32 recognisable bytes


def forms(key: bytes) -> list[str]:
    """Every textual form of `key` a careless log line could contain."""
    return [
        key.hex(),
        key.hex().upper(),
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode().rstrip("="),
        repr(key)[2:-1],
        key.decode("latin-1"),
    ]


def assert_no_key(text: str, key: bytes = KEY) -> None:
    for form in forms(key):
        assert form not in text


# --- is_secret_key ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["secret", "key", "volume_key", "mac_key", "privateKey", "passphrase", "kbs_token",
     "Password", "session-cookie", "keys", "jwe", "tee_private"],
)  # fmt: skip
def test_secret_sounding_names(name: str) -> None:
    assert is_secret_key(name)


@pytest.mark.parametrize("name", ["keyslot", "volume", "monkey", "event", "path", "digest", 3])
def test_harmless_names(name: object) -> None:
    assert not is_secret_key(name)


# --- redact_value / redact ----------------------------------------------------------------


def test_bytes_like_values_are_redacted() -> None:
    for value in (KEY, bytearray(KEY), memoryview(KEY), Secret(KEY)):
        assert redact_value(value) == REDACTED


def test_nested_containers_are_walked() -> None:
    out = redact_value({"a": [KEY, {"b": (KEY, "fine")}], "n": 3, "s": {KEY}})
    assert out == {"a": [REDACTED, {"b": [REDACTED, "fine"]}], "n": 3, "s": [REDACTED]}


def test_secret_named_keys_are_redacted_whatever_the_value() -> None:
    out = redact(None, "info", {"event": "x", "token": "eyJhbGciOi", "key": 5, "keyslot": 1})
    assert out == {"event": "x", "token": REDACTED, "key": REDACTED, "keyslot": 1}


def test_unknown_objects_are_written_as_type_names_not_repr() -> None:
    class Leaky:
        def __repr__(self) -> str:
            return KEY.hex()

    assert redact_value(Leaky()) == "<Leaky>"


def test_dataclasses_are_walked_and_hidden_fields_stay_hidden() -> None:
    @dataclasses.dataclass
    class Thing:
        name: str
        blob: bytes
        hidden: str = dataclasses.field(default="h", repr=False)

    assert redact_value(Thing("n", KEY)) == {"name": "n", "blob": REDACTED}


def test_paths_and_depth() -> None:
    assert redact_value(Path("/a/b")) == "/a/b"
    deep: Any = "x"
    for _ in range(20):
        deep = [deep]
    assert "<list>" in json.dumps(redact_value(deep))


# --- exceptions ---------------------------------------------------------------------------


def test_exception_message_redacts_bytes_arguments() -> None:
    assert exception_message(ValueError(KEY, "ctx")) == f"{REDACTED}, ctx"


def test_exception_message_scrubs_hex_and_base64_runs() -> None:
    msg = exception_message(RuntimeError(f"bad {KEY.hex()} / {base64.b64encode(KEY).decode()}"))
    assert_no_key(msg)
    assert msg.startswith("bad ")


def test_exception_message_keeps_ordinary_paths() -> None:
    assert exception_message(RuntimeError("/var/lib/postgresql/data")) == (
        "/var/lib/postgresql/data"
    )


def test_cva_error_messages_are_kept() -> None:
    assert exception_message(CvaError("volume pgdata: disk missing; attach it")) == (
        "volume pgdata: disk missing; attach it"
    )


def test_oserror_keeps_errno_only() -> None:
    exc = FileNotFoundError(2, "No such file or directory", KEY.hex())
    assert exception_message(exc) == "[Errno 2] No such file or directory"


def test_exception_dict_has_frames_and_causes_but_no_locals() -> None:
    def inner(secret_local: bytes) -> None:
        raise ValueError("inner")

    try:
        try:
            inner(KEY)
        except ValueError as exc:
            raise RuntimeError("outer") from exc
    except RuntimeError as exc:
        out = exception_dict(exc)
    assert out["type"] == "RuntimeError"
    assert out["cause"]["type"] == "ValueError"
    assert any("inner" in f for f in out["cause"]["frames"])
    assert_no_key(json.dumps(out))


def test_exception_chain_cycles_terminate() -> None:
    a = ValueError("a")
    b = ValueError("b")
    a.__context__ = b
    b.__context__ = a
    out = exception_dict(a)
    assert "cause" in out and "cause" not in out["cause"]


def test_render_exception_processor() -> None:
    try:
        raise ValueError(KEY)
    except ValueError:
        out = render_exception(None, "error", {"event": "e", "exc_info": True, "stack_info": "s"})
    assert "exc_info" not in out and "stack_info" not in out
    assert out["exception"]["message"] == REDACTED


def test_render_exception_without_active_exception() -> None:
    assert render_exception(None, "error", {"event": "e", "exc_info": True}) == {"event": "e"}


def test_small_processors() -> None:
    assert add_log_level(None, "warning", {})["level"] == "warning"
    assert add_log_level(None, "exception", {})["level"] == "error"
    assert add_timestamp(None, "info", {})["ts"].endswith("+00:00")
    assert json.loads(render_json(None, "info", {"event": "x", "o": object()})) == {
        "event": "x",
        "o": "<object>",
    }


# --- the whole pipeline ---------------------------------------------------------------------


def logged(fn: Any) -> str:
    buf = io.StringIO()
    configure_logging("debug", buf)
    try:
        fn(get_logger("test"))
    finally:
        configure_logging("info")
    return buf.getvalue()


def test_output_is_json_lines() -> None:
    out = logged(lambda log: (log.info("one", n=1), log.debug("two")))
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(line["event"], line["level"], line["logger"]) for line in lines] == [
        ("one", "info", "test"),
        ("two", "debug", "test"),
    ]


def test_level_filter() -> None:
    buf = io.StringIO()
    configure_logging("warning", buf)
    try:
        get_logger("t").info("hidden")
        get_logger("t").warning("shown")
    finally:
        configure_logging("info")
    assert "hidden" not in buf.getvalue() and "shown" in buf.getvalue()


def test_unknown_level_is_a_clean_error() -> None:
    with pytest.raises(CvaError, match="log level"):
        configure_logging("loud")


def test_a_key_never_appears_in_output_even_inside_an_exception() -> None:
    key = os.urandom(32)

    def scenario(log: Any) -> None:
        secret = Secret(bytearray(key))
        log.info("values", secret=secret, data=key, nested={"x": [bytearray(key)]})
        log.info("named", passphrase=key.hex(), volume_key=base64.b64encode(key).decode())
        try:
            try:
                raise ValueError(key)
            except ValueError as exc:
                raise RuntimeError(f"unwrap failed for {key.hex()}", secret) from exc
        except RuntimeError:
            log.exception("boom")
        try:
            raise KeyError(base64.b64encode(key).decode())
        except KeyError as exc:
            log.error("lookup", exc_info=exc, error=exc)
        logging.getLogger("somelib").warning("lib says %s", key.hex())
        try:
            raise OSError(5, "I/O error", key.hex())
        except OSError:
            logging.getLogger("somelib").exception("io")

    out = logged(scenario)
    assert len(out.splitlines()) == 6
    assert_no_key(out, key)
    assert REDACTED in out


def test_get_logger_before_configure_still_redacts() -> None:
    import subprocess
    import sys

    code = (
        "from agent.log import get_logger\n"
        f"get_logger('early').info('e', data={KEY!r}, volume_key='x')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=60)
    line = json.loads(proc.stdout)
    assert line["data"] == REDACTED and line["volume_key"] == REDACTED
    assert_no_key(proc.stdout.decode())


def test_module_level_logger_follows_later_configuration() -> None:
    import io

    from agent.log import configure_logging, get_logger

    early = get_logger("made-at-import")
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", stream=first)
    early.info("one")
    configure_logging("warning", stream=second)
    early.info("filtered")
    early.warning("two")
    assert '"event": "one"' in first.getvalue() or '"event":"one"' in first.getvalue()
    assert "filtered" not in second.getvalue() and "two" in second.getvalue()
    assert "made-at-import" in second.getvalue()
