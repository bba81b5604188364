"""The OCI state JSON that kata-agent writes to a prestart hook's stdin (hostile bytes, pure).

kata-agent (KC `kata-sys-util/src/hooks.rs`) sends
`{"ociVersion","id","status":"created","pid":<container init>,"bundle":"/run/kata-containers/<id>",
"annotations":{...}}` with empty strings and maps left out. cva needs `id`, `pid` and `bundle`;
everything else is ignored. The container id follows kata's rules (`agent.policy`), the pid is
a positive int that fits pid_t, the bundle an absolute, normalised path.
"""

from __future__ import annotations

import json
import posixpath
from typing import NamedTuple

from agent.errors import InputError
from agent.policy import RequestError, validate_container_id

MAX_STATE_BYTES = 1024 * 1024
PID_MAX = 4 * 1024 * 1024  # the kernel's PID_MAX_LIMIT on 64-bit


class StateError(InputError):
    """The OCI state on stdin cannot be used; the message names the field."""


class HookState(NamedTuple):  # not a dataclass: the hook process stays light
    container_id: str
    pid: int
    bundle: str


def parse_state(raw: bytes) -> HookState:
    """Parse and check the OCI state; raises StateError naming the field."""
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"OCI state on stdin is larger than {MAX_STATE_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise StateError("OCI state on stdin is not valid JSON") from None
    if not isinstance(doc, dict):
        raise StateError("OCI state on stdin is not a JSON object")
    cid = doc.get("id")
    if not isinstance(cid, str):
        raise StateError("OCI state: id is missing or not a string")
    try:
        validate_container_id(cid)
    except RequestError as exc:
        raise StateError(f"OCI state: id: {exc.message}") from None
    pid = doc.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 1 < pid <= PID_MAX:
        raise StateError(f"OCI state: pid must be an integer in 2..{PID_MAX} (the container init)")
    bundle = doc.get("bundle")
    if not isinstance(bundle, str) or not bundle.startswith("/") or "\0" in bundle:
        raise StateError("OCI state: bundle must be an absolute path")
    if posixpath.normpath(bundle) != bundle or bundle.startswith("//"):
        raise StateError("OCI state: bundle must be a normalised path")
    return HookState(container_id=cid, pid=pid, bundle=bundle)
