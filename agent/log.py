"""Structured logging: one JSON object per line on stdout (journald keeps it), secrets redacted.

The pipeline is a list of small processors, each a pure function of the event dict:

    add_log_level -> add_timestamp -> render_exception -> redact -> JSON

`redact` replaces every `Secret`, every bytes-like value and every value stored under a
secret-sounding key (secret, key, passphrase, password, token, ...) with "<redacted>", at any
depth. `render_exception` turns an exception into type, message and `file:line function` frames:
no source lines, no local variables, and a message built from the exception's arguments with
bytes-like and secret arguments redacted (and, for exceptions that are not `CvaError`, long
hex/base64 runs scrubbed). Objects the JSON encoder does not know are written as their type name,
never their `repr`. The standard library's `logging` (httpx, grpc, ...) goes through the same
redaction and renderer, with hex/base64 runs scrubbed from its (foreign) messages.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import logging
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import PurePath
from types import TracebackType
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from agent.errors import REFUSALS, CvaError
from luks.secret import Secret

REDACTED = "<redacted>"
MAX_DEPTH = 8
MAX_FRAMES = 30
MAX_CHAIN = 5

# key names whose values are never logged: substrings ...
_SECRET_WORDS = ("secret", "passphrase", "password", "passwd", "token", "cookie", "credential")
# ... and whole components (so `volume_key`/`mac_key`/`privateKey` are redacted, `keyslot` is not)
_SECRET_PARTS = frozenset({"key", "keys", "jwe", "private", "psk", "auth"})
_SPLIT_RE = re.compile(r"[^a-z0-9]+")
_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# long runs that look like encoded key material, scrubbed from foreign exception messages
_HEX_RE = re.compile(r"\b(?:[0-9a-fA-F]{2}[ :]?){16,}")
_B64_RE = re.compile(r"[A-Za-z0-9+/_-]{24,}={0,2}")


def _scrub_encoded(text: str) -> str:
    """Replace hex runs of >= 16 bytes and base64-looking runs (mixed case and digits)."""
    text = _HEX_RE.sub(REDACTED, text)

    def b64(match: re.Match[str]) -> str:
        run = match.group(0)
        mixed = (
            any(c.isdigit() for c in run)
            and any(c.isupper() for c in run)
            and any(c.islower() for c in run)
        )
        return REDACTED if mixed else run

    return _B64_RE.sub(b64, text)


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def is_secret_key(name: object) -> bool:
    """True when a log key's name says its value is secret."""
    if not isinstance(name, str):
        return False
    lowered = name.lower()
    if any(word in lowered for word in _SECRET_WORDS):
        return True
    parts = _SPLIT_RE.split(_CAMEL_RE.sub("_", name).lower())
    return any(part in _SECRET_PARTS for part in parts)


def redact_value(value: object, depth: int = 0) -> object:
    """`value` with secrets and bytes-like values replaced, containers walked recursively."""
    if isinstance(value, (Secret, bytes, bytearray, memoryview)):
        return REDACTED
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth >= MAX_DEPTH:
        return f"<{type(value).__name__}>"
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if is_secret_key(k) else redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [redact_value(v, depth + 1) for v in value]
    if isinstance(value, BaseException):
        return exception_dict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return redact_value(
            {
                f.name: getattr(value, f.name)
                for f in dataclasses.fields(value)
                if f.repr  # fields hidden from repr (e.g. InitData.raw) stay hidden
            },
            depth + 1,
        )
    if isinstance(value, (PurePath, enum.Enum, datetime.datetime, datetime.date)):
        return str(value.value if isinstance(value, enum.Enum) else value)
    return f"<{type(value).__name__}>"


def redact(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """Processor: redact secrets, bytes-like values and secret-named keys at any depth."""
    return cast(EventDict, redact_value(event_dict))


def _safe_arg(arg: object) -> str:
    if isinstance(arg, (Secret, bytes, bytearray, memoryview)):
        return REDACTED
    if isinstance(arg, (str, int, float, bool)) or arg is None:
        return str(arg)
    return f"<{type(arg).__name__}>"


def exception_message(exc: BaseException) -> str:
    """A message for `exc` that cannot carry key material.

    `CvaError` messages are secret-free by contract and kept. For any other exception the text
    is rebuilt from its arguments (bytes-like/Secret arguments redacted, other objects by type
    name) and long hex/base64 runs are scrubbed; `OSError` keeps errno and strerror only.
    """
    if isinstance(exc, REFUSALS):
        return exc.message
    if isinstance(exc, OSError) and exc.errno is not None:
        text = f"[Errno {exc.errno}] {exc.strerror}"
    else:
        text = ", ".join(_safe_arg(a) for a in exc.args)
    text = " ".join(text.split())
    return _scrub_encoded(text)[:500]


def exception_dict(exc: BaseException) -> dict[str, Any]:
    """type, message and `file:line function` frames of `exc` and of its causes (no locals)."""
    out: dict[str, Any] = {}
    current: dict[str, Any] = out
    seen: set[int] = set()
    link: BaseException | None = exc
    for _ in range(MAX_CHAIN):
        if link is None or id(link) in seen:
            break
        seen.add(id(link))
        current["type"] = type(link).__qualname__
        current["message"] = exception_message(link)
        frames = traceback.extract_tb(link.__traceback__, limit=MAX_FRAMES)
        current["frames"] = [f"{f.filename}:{f.lineno} {f.name}" for f in frames]
        nxt = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
        if nxt is not None and id(nxt) not in seen:
            current["cause"] = {}
            current = current["cause"]
        link = nxt
    return out


def _exc_info(value: object) -> ExcInfo | None:
    if isinstance(value, BaseException):
        return (type(value), value, value.__traceback__)
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return cast(ExcInfo, value)
    if value is True:
        info = sys.exc_info()
        return cast(ExcInfo, info) if info[1] is not None else None
    return None


def render_exception(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """Processor: `exc_info` -> a redacted `exception` dict; drop `stack_info`."""
    event_dict.pop("stack_info", None)
    raw = event_dict.pop("exc_info", None)
    info = _exc_info(raw)
    if info is not None:
        event_dict["exception"] = exception_dict(info[1])
    return event_dict


def add_timestamp(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """Processor: ISO-8601 UTC timestamp under `ts`."""
    event_dict["ts"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return event_dict


def add_log_level(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """Processor: the level name under `level` (`exception` logs as error)."""
    event_dict.setdefault("level", "error" if method == "exception" else method)
    return event_dict


def _json_default(obj: object) -> object:
    return f"<{type(obj).__name__}>"


def render_json(logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
    """Processor: one compact JSON line; unknown objects become their type name."""
    return json.dumps(event_dict, default=_json_default, ensure_ascii=False, sort_keys=False)


PROCESSORS: tuple[Processor, ...] = (
    structlog.contextvars.merge_contextvars,
    add_log_level,
    add_timestamp,
    render_exception,
    redact,
    render_json,
)

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}


def _level_number(level: str) -> int:
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise CvaError(f"unknown log level {level!r}; use debug, info, warning or error") from None


class _StdlibBridge(logging.Handler):
    """Route standard-library log records through the same processors."""

    def __init__(self, write: Callable[[str], None]) -> None:
        super().__init__()
        self._write = write

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event: EventDict = {
                "event": _scrub_encoded(record.getMessage())[:2000],
                "logger": record.name,
                "level": record.levelname.lower(),
            }
            if record.exc_info and record.exc_info[1] is not None:
                event["exc_info"] = record.exc_info
            line: object = event
            for proc in PROCESSORS[1:]:
                line = proc(None, record.levelname.lower(), cast(EventDict, line))
            self._write(cast(str, line))
        except Exception:  # noqa: BLE001 - logging must never take the daemon down
            self.handleError(record)


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send structlog and stdlib logging as JSON lines to `stream` (default stdout)."""
    out = stream if stream is not None else sys.stdout
    number = _level_number(level)

    def write(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    structlog.configure(
        processors=list(PROCESSORS),
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    bridge = _StdlibBridge(write)
    bridge.setLevel(number)
    root.addHandler(bridge)
    root.setLevel(max(number, logging.INFO))  # library debug chatter stays out


def get_logger(name: str) -> FilteringBoundLogger:
    """A logger bound to `logger=name` (configures the defaults first if nobody has, so a
    line logged before `configure_logging` still goes through the redaction).

    The logger is a lazy proxy: it resolves the configuration on every use, so a module-level
    logger made at import time follows a later `configure_logging` (level and stream)."""
    if not structlog.is_configured():
        configure_logging()
    return cast(FilteringBoundLogger, _LazyLogger(name))


class _LazyLogger:
    """Resolves structlog's current configuration on every call (structlog's own lazy proxy
    freezes it at the first `bind`)."""

    __slots__ = ("_context",)

    def __init__(self, name: str, **context: object) -> None:
        self._context = {"logger": name, **context}

    def bind(self, **values: object) -> _LazyLogger:
        merged = {**self._context, **values}
        name = str(merged.pop("logger"))
        return _LazyLogger(name, **merged)

    def __getattr__(self, attr: str) -> object:
        if not structlog.is_configured():
            configure_logging()
        return getattr(structlog.get_logger().bind(**self._context), attr)
