"""The private hook socket's messages (pure): JSON objects, one per SOCK_SEQPACKET packet.

The socket is `<state_dir>/hook.sock` (state_dir is root-only, 0700); it carries three
messages, each one packet of at most MAX_MESSAGE bytes:

1. hook -> daemon `Request`: `{"op": "prestart", "id", "pid", "bundle", "budget"}` (the OCI
   state's fields and the seconds the hook can still wait).
2. daemon -> hook `Answer`: `{"ok": false, "error": "..."}`, or `{"ok": true, "rootfs": "...",
   "volumes": [{"name", "mount", "read_only", "dev": "MAJ:MIN", "remove": "/dev/..."|null}]}`
   with one detached mount fd per volume, in order, as SCM_RIGHTS on the same packet
   (`open_tree(OPEN_TREE_CLONE)` of the volume's mount; `remove` is a device node to drop from
   the container's /dev). `volumes: []` means the contract gives this container none.
3. hook -> daemon `Done`: `{"done": true}` once every volume is bound in the container's mount
   namespace, or `{"done": false, "error": "..."}`. The daemon kills the container's init if
   the connection ends before `done: true`.

Both ends are trusted code of the image; the parsers are still strict (a peer with a bug must
produce a refusal, never a half-bound container). The messages are NamedTuples, not dataclasses:
the hook process imports this module and stays light.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from agent.errors import InputError

MAX_MESSAGE = 64 * 1024
MAX_VOLUMES = 64  # the contract's own limit
_DEV = re.compile(r"(0|[1-9][0-9]{0,9}):(0|[1-9][0-9]{0,9})")
SOCKET_NAME = "hook.sock"


class WireError(InputError):
    """A hook-socket message that does not parse; the message names the field."""


class Request(NamedTuple):
    container_id: str
    pid: int
    bundle: str
    budget: float


class HookVolume(NamedTuple):
    name: str
    mount: str
    read_only: bool
    dev: str  # MAJ:MIN of the volume's filesystem (its st_dev)
    remove: str | None = None  # a raw device node to remove from the container's /dev


class Answer(NamedTuple):
    ok: bool
    error: str = ""
    rootfs: str = ""
    volumes: tuple[HookVolume, ...] = ()


class Done(NamedTuple):
    done: bool
    error: str = ""


def _load(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE:
        raise WireError(f"hook {what}: larger than {MAX_MESSAGE} bytes")
    if not data:
        raise WireError(f"hook {what}: the peer closed the connection")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise WireError(f"hook {what}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise WireError(f"hook {what}: not a JSON object")
    return doc


def _dump(doc: dict[str, Any]) -> bytes:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise WireError(f"hook message larger than {MAX_MESSAGE} bytes")
    return data


def _str(doc: dict[str, Any], key: str, what: str, *, limit: int = 4096) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or len(value) > limit or "\0" in value:
        raise WireError(f"hook {what}: {key} must be a string of at most {limit} characters")
    return value


def encode_request(req: Request) -> bytes:
    return _dump(
        {
            "op": "prestart",
            "id": req.container_id,
            "pid": req.pid,
            "bundle": req.bundle,
            "budget": req.budget,
        }
    )


def decode_request(data: bytes) -> Request:
    doc = _load(data, "request")
    if doc.get("op") != "prestart":
        raise WireError('hook request: op must be "prestart"')
    pid = doc.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 2:
        raise WireError("hook request: pid must be an integer >= 2")
    budget = doc.get("budget")
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 <= budget <= 300:
        raise WireError("hook request: budget must be a number of seconds in 0..300")
    return Request(
        container_id=_str(doc, "id", "request", limit=255),
        pid=pid,
        bundle=_str(doc, "bundle", "request"),
        budget=float(budget),
    )


def encode_answer(answer: Answer) -> bytes:
    if not answer.ok:
        return _dump({"ok": False, "error": answer.error[:2000]})
    return _dump(
        {
            "ok": True,
            "rootfs": answer.rootfs,
            "volumes": [
                {
                    "name": v.name,
                    "mount": v.mount,
                    "read_only": v.read_only,
                    "dev": v.dev,
                    "remove": v.remove,
                }
                for v in answer.volumes
            ],
        }
    )


def decode_answer(data: bytes) -> Answer:
    doc = _load(data, "answer")
    ok = doc.get("ok")
    if ok is False:
        return Answer(ok=False, error=_str(doc, "error", "answer"))
    if ok is not True:
        raise WireError("hook answer: ok must be true or false")
    raw_vols = doc.get("volumes")
    if not isinstance(raw_vols, list) or len(raw_vols) > MAX_VOLUMES:
        raise WireError(f"hook answer: volumes must be a list of at most {MAX_VOLUMES}")
    vols = []
    for i, v in enumerate(raw_vols):
        what = f"answer volumes[{i}]"
        if not isinstance(v, dict):
            raise WireError(f"hook {what}: not an object")
        read_only = v.get("read_only")
        if not isinstance(read_only, bool):
            raise WireError(f"hook {what}: read_only must be true or false")
        dev = _str(v, "dev", what, limit=21)
        if _DEV.fullmatch(dev) is None:
            raise WireError(f"hook {what}: dev must be MAJ:MIN")
        mount = _str(v, "mount", what)
        if not mount.startswith("/"):
            raise WireError(f"hook {what}: mount must be an absolute path")
        remove = v.get("remove")
        if remove is not None:
            remove = _str(v, "remove", what)
            if not remove.startswith("/dev/"):
                raise WireError(f"hook {what}: remove must be a path under /dev/")
        vols.append(HookVolume(_str(v, "name", what, limit=64), mount, read_only, dev, remove))
    rootfs = _str(doc, "rootfs", "answer")
    if not rootfs.startswith("/"):
        raise WireError("hook answer: rootfs must be an absolute path")
    return Answer(ok=True, rootfs=rootfs, volumes=tuple(vols))


def encode_done(done: Done) -> bytes:
    if done.done:
        return _dump({"done": True})
    return _dump({"done": False, "error": done.error[:2000]})


def decode_done(data: bytes) -> Done:
    doc = _load(data, "done")
    flag = doc.get("done")
    if flag is True:
        return Done(done=True)
    if flag is False:
        return Done(done=False, error=_str(doc, "error", "done"))
    raise WireError("hook done: done must be true or false")
