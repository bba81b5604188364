"""Two LUKS2 header copies that disagree because cva's own write of the ready state was cut
(crash window READY_HALF_WRITTEN): which copy may be adopted, as a pure function.

cva writes the ready state copy by copy (secondary, fsync, primary). A crash in between leaves
two copies that each are a complete, checksummed header of this volume, one saying
"initializing" and one "ready". cva never hands disagreeing copies to libcryptsetup (the
CVE-2025-59054 class: which copy it trusts is its choice, not cva's). Instead each copy is
turned into a whole header area of its own (that copy in both slots, each slot re-stamped
with its own magic, offset, salt and checksum; the keyslot area unchanged) and run through the
same parser, allow-list and token MAC as any header. The pair is adopted only when:

- both copies pass the allow-list and their cva token MAC (both are headers cva made for this
  volume with the attested key: the host cannot forge either),
- they agree on everything but the token (same UUID; same keyslots, segments, digests and
  config), so they describe one volume differing only in its recorded state.

The adopted area is the copy whose state is "initializing" when there is one: the caller then
applies the "initializing" rule (luks.volume_plan.initializing_action: a complete filesystem
is only marked ready; mkfs only over a data area proven never written), which is safe whatever
the host did, because a genuine older copy the host puts back is exactly a replayed
"initializing" header. Otherwise (two "ready" copies that differ, e.g. in seqid) the primary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from luks.header import (
    BINARY_HEADER_BYTES,
    MAGIC_PRIMARY,
    MAGIC_SECONDARY,
    PROFILE_HDR_SIZE,
    HeaderError,
    LuksHeader,
    parse_luks2,
)

Which = Literal["primary", "secondary"]


def single_copy_area(area: bytes, which: Which) -> bytes:
    """`area` with copy `which` in both metadata slots (each slot keeps its own salt and gets
    its own magic, hdr_offset and checksum); the keyslot area is unchanged. Raises HeaderError
    when the area is not cva's metadata size."""
    size = int.from_bytes(area[8:16], "big")
    if size != PROFILE_HDR_SIZE or len(area) < 2 * size:
        raise HeaderError(f"hdr_size {size} is not cva's {PROFILE_HDR_SIZE}")
    src = area[0:size] if which == "primary" else area[size : 2 * size]
    out = bytearray(area)
    for offset, magic in ((0, MAGIC_PRIMARY), (size, MAGIC_SECONDARY)):
        copy = bytearray(src)
        copy[0:6] = magic
        copy[104:168] = area[offset + 104 : offset + 168]  # the slot's own salt
        copy[256:264] = offset.to_bytes(8, "big")
        copy[448:512] = bytes(64)
        copy[448:480] = hashlib.sha256(copy).digest()
        out[offset : offset + size] = copy
    return bytes(out)


@dataclass(frozen=True)
class Adoption:
    area: bytes  # a consistent header area (the adopted copy in both slots)
    state: str  # its cva token state
    other_state: str


def _without_tokens(hdr: LuksHeader) -> dict[str, object]:
    return {k: v for k, v in hdr.metadata.items() if k != "tokens"}


def adopt(
    area: bytes,
    *,
    allow_reasons: Callable[[LuksHeader], list[str]],
    verify: Callable[[LuksHeader], str],
) -> Adoption | str:
    """The copy to adopt from a header area whose two copies disagree, or why none may be."""
    views: dict[Which, tuple[bytes, LuksHeader, str]] = {}
    for which in ("primary", "secondary"):
        try:
            single = single_copy_area(area, which)
            hdr = parse_luks2(single)
        except HeaderError as exc:
            return f"the {which} copy alone is not a header ({exc.message})"
        reasons = allow_reasons(hdr)
        if reasons:
            return f"the {which} copy alone is refused ({'; '.join(reasons)})"
        try:
            state = verify(hdr)
        except Exception as exc:  # noqa: BLE001 - any failure to verify refuses (fail closed)
            return f"the {which} copy's cva token does not verify ({getattr(exc, 'message', exc)})"
        views[which] = (single, hdr, state)
    (p_area, p_hdr, p_state), (s_area, s_hdr, s_state) = views["primary"], views["secondary"]
    if p_hdr.uuid != s_hdr.uuid or _without_tokens(p_hdr) != _without_tokens(s_hdr):
        return "the two copies describe different volumes (they differ beyond the cva token)"
    if s_state == "initializing" and p_state != "initializing":
        return Adoption(s_area, s_state, p_state)
    return Adoption(p_area, p_state, s_state)


__all__ = ["BINARY_HEADER_BYTES", "Adoption", "adopt", "single_copy_area"]
