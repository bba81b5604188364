"""Key rotation without re-encryption: a volume under its contract's `previous_key` is moved to
`key` when it is opened (the data and its volume key stay; only the keyslot and the token's MAC
key change).

On-disk states (each a complete header cva validated, MAC'd, wrote copy by copy):

    H0  OLD       one keyslot (the old passphrase), token "ready" MAC'd with the old MAC key, seq N
    R1  ROTATING  both keyslots '0' and '1' (old and new passphrase, the same volume key),
                  token "rotating" MAC'd with the NEW MAC key, seq N+1
    R2  NEW       one keyslot (the new passphrase; the old slot destroyed and its area wiped),
                  token "ready" MAC'd with the new MAC key, seq N+2

    H0 --add the new keyslot (needs the old key)--> R1 --destroy the old keyslot--> R2

The header allow-list (luks.header) accepts two keyslots only while the token says "rotating",
and only the new key's MAC makes that state count, so the host cannot make cva keep or reach a
two-keyslot header of its own. Each step is made in a memfd copy of the validated header
(libcryptsetup), re-validated, and written by cva only if the disk still holds the copy it
started from: keyslot area and secondary copy first, fsync, then the primary.

Crash windows (luks.volume_plan.CrashWindow; killed in tests/guest/test_day_two.py), what the
next open does, and which keys open the header meanwhile (never neither):

    REKEY_SLOT_ADDED_HALF   secondary R1 (+ the new keyslot's area), primary H0: the copies
                            disagree -> each alone is validated and MAC-verified (H0 with the old
                            key, which the contract still names) and they describe the same
                            volume key: R1 is adopted (written to both slots) after the new
                            passphrase is shown to open it; then as R1.       old: yes, new: yes
    REKEY_SLOT_ADDED        R1 on disk -> destroy the old keyslot (the old key is not needed
                            any more), then as R2.                          old: yes, new: yes
    REKEY_OLD_REMOVED_HALF  secondary R2 (and the old slot's area wiped), primary R1 -> the
                            copies disagree, both verify with the new key: R2 is adopted after
                            the new passphrase is shown to open it.  old: no (area wiped), new: yes
    REKEY_DONE              R2 on disk, nothing measured or mounted yet -> an ordinary open (the
                            open path then writes seq N+3 as every read-write open does). new: yes

The new passphrase is checked against the exact bytes cva then writes before the old keyslot is
destroyed or a rotated copy adopted, so no step leaves a header the new key does not open; the old
keyslot is destroyed only when the new one opens. A rotation a crash interrupted after R1 is
finished with the new key alone. A read-only open never rotates (it never writes): it refuses
and says to open the volume read-write once. One measured `volume-rekey` event names the old and
new key ids (luks.token.key_id; the old one only when the old key was at hand, i.e. this run
added the new keyslot) -- never key bytes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from luks import blank
from luks.errors import StorageError
from luks.header import (
    TOKEN_STATE_ROTATING,
    LuksHeader,
    allow_list_reasons,
    parse_luks2,
)
from luks.header_copies import Which, single_copy_area
from luks.libcryptsetup import METADATA_BYTES, CryptDevice, WrongPassphrase, header_copy
from luks.secret import Secret
from luks.token import (
    cva_token_id,
    derive_keys,
    key_id,
    make_token,
    next_sequence,
    token_json,
    verified_token,
)
from luks.volume_plan import READY, CrashWindow, HeaderObservation, VolumeRefused

_log = structlog.get_logger()
_LOGGER = "cva.luks.rotation"

# what the caller gives: the previous key's KBS resource, fetched only when needed
FetchPrevious = Callable[[], Secret]
Window = Callable[[CrashWindow], None]
Observe = Callable[[bytes], HeaderObservation]


class PreviousKeyRefused(VolumeRefused):
    """The previous key does not verify the header either (or could not be had)."""


@dataclass(frozen=True)
class Rekeyed:
    """A rotation this open finished: the key ids for the measured volume-rekey event."""

    old_key_id: bytes | None  # None: the run that added the new keyslot was cut off
    new_key_id: bytes


@dataclass(frozen=True)
class Settled:
    area: bytes
    obs: HeaderObservation
    rekeyed: Rekeyed | None = None


@dataclass(frozen=True)
class _Spec:
    name: str
    integrity: bool
    read_only: bool


@dataclass(frozen=True)
class _Ctx:
    """One settle: the device, the volume, the new key's passphrase and MAC key, the windows."""

    device: Path
    spec: _Spec
    passphrase: Secret
    mac_key: Secret
    window: Window


KeyTag = Literal["new", "old"]


def settle(
    device: Path,
    area: bytes,
    obs: HeaderObservation,
    *,
    name: str,
    integrity: bool,
    read_only: bool,
    secret: Secret,
    previous: FetchPrevious | None,
    observe: Observe,
    window: Window,
) -> Settled:
    """Bring a volume that is under the previous key, or in a rotation, to the new key (R2);
    anything else is returned as it is (the open path decides on it). `secret` is the new key's
    KBS resource; `previous` fetches the old one (None: the contract names no previous key)."""
    unchanged = Settled(area, obs)
    if obs.kind == "cva" and obs.token_state != TOKEN_STATE_ROTATING:
        return unchanged  # the common case: nothing to do, nothing read or fetched
    if obs.kind == "zero":
        return unchanged
    spec = _Spec(name, integrity, read_only)
    passphrase, mac_key = derive_keys(secret, name)
    new_id = key_id(secret, name)
    with passphrase, mac_key:
        ctx = _Ctx(device, spec, passphrase, mac_key, window)
        if obs.kind == "cva":  # R1 under the new key (a rotation cut off after its first step)
            _refuse_read_only(spec)
            area = _retire_old_slot(ctx, area)
            return Settled(area, observe(area), Rekeyed(None, new_id))
        copies = bool(obs.reasons) and all(r.startswith("header-copies") for r in obs.reasons)
        mac = any("cva token:" in r and "MAC" in r for r in obs.reasons)
        if not (copies or mac):
            return unchanged
        if copies:
            old_id: bytes | None = None
            pair = _rotation_pair(area, spec, mac_key, None)
            if pair is None and previous is not None and not _both_verify(area, spec, mac_key):
                with _previous_keys(previous, name) as (_pp, old_mac, old_id):
                    pair = _rotation_pair(area, spec, mac_key, old_mac)
            if pair is None:
                return unchanged  # not a rotation's cut write: the open path decides
            _refuse_read_only(spec)
            adopted = _adopt(ctx, area, pair)
            if pair.state == TOKEN_STATE_ROTATING:
                adopted = _retire_old_slot(ctx, adopted)
            return Settled(adopted, observe(adopted), Rekeyed(old_id, new_id))
        if previous is None:
            return unchanged
        with _previous_keys(previous, name) as (old_pp, old_mac, prev_id):
            hdr = parse_luks2(area)
            try:
                old_state = verified_token(hdr, name, old_mac).state
            except StorageError:
                raise PreviousKeyRefused(
                    f"volume {name}: its header verifies with neither the contract's key nor "
                    "its previous_key; refusing it (check both key resources)"
                ) from None
            if old_state != READY:
                raise PreviousKeyRefused(
                    f"volume {name}: under the previous key but in state {old_state!r}; only a "
                    "ready volume is rotated (open it with its previous key as key first)"
                )
            _refuse_read_only(spec)
            area = _add_new_slot(ctx, area, old_pp, old_mac)
            area = _retire_old_slot(ctx, area)
            _log.info("volume rekeyed", logger=_LOGGER, volume=name)
            return Settled(area, observe(area), Rekeyed(prev_id, new_id))


@contextlib.contextmanager
def _previous_keys(previous: FetchPrevious, name: str) -> Iterator[tuple[Secret, Secret, bytes]]:
    """The previous key's passphrase, MAC key and key id (the resource wiped at once)."""
    old_secret = previous()  # a KBS refusal or outage propagates as itself (the caller maps it)
    with old_secret:
        old_pp, old_mac = derive_keys(old_secret, name)
        old_id = key_id(old_secret, name)
    with old_pp, old_mac:
        yield old_pp, old_mac, old_id


def _refuse_read_only(spec: _Spec) -> None:
    if spec.read_only:
        raise VolumeRefused(
            f"volume {spec.name}: its key is being rotated (previous_key), which writes the "
            "header; a read-only open never writes: open it read-write once to finish"
        )


# ---- the two steps -------------------------------------------------------------------------


def _add_new_slot(ctx: _Ctx, area: bytes, old_pp: Secret, old_mac: Secret) -> bytes:
    """H0 -> R1: a keyslot for the new passphrase beside the old one, token "rotating" under
    the new MAC key."""
    device, spec, passphrase, mac_key, window = (
        ctx.device, ctx.spec, ctx.passphrase, ctx.mac_key, ctx.window
    )  # fmt: skip
    seq = next_sequence(verified_token(parse_luks2(area), spec.name, old_mac).seq)
    with header_copy(area) as copy:
        with CryptDevice.open(str(device), header=copy) as cd:
            cd.load()
            try:
                old_slot = cd.activate_by_passphrase(None, old_pp)
            except WrongPassphrase:
                raise PreviousKeyRefused(
                    f"volume {spec.name}: the previous key's passphrase opens no keyslot although "
                    "its MAC verifies; refusing to rotate (nothing was changed)"
                ) from None
            new_slot = 1 - old_slot
            cd.keyslot_add_by_passphrase(old_pp, passphrase, keyslot=new_slot)
        updated = _with_token(ctx, copy, area, TOKEN_STATE_ROTATING, seq)
    _check(updated, spec, mac_key, TOKEN_STATE_ROTATING)
    _write(ctx, area, updated, CrashWindow.REKEY_SLOT_ADDED_HALF)
    window(CrashWindow.REKEY_SLOT_ADDED)
    return updated


def _retire_old_slot(ctx: _Ctx, area: bytes) -> bytes:
    """R1 -> R2: destroy the keyslot the new passphrase does not open (only once it is shown to
    open the other), token "ready" under the new MAC key."""
    device, spec, passphrase, mac_key, window = (
        ctx.device, ctx.spec, ctx.passphrase, ctx.mac_key, ctx.window
    )  # fmt: skip
    seq = next_sequence(verified_token(parse_luks2(area), spec.name, mac_key).seq)
    with header_copy(area) as copy:
        with CryptDevice.open(str(device), header=copy) as cd:
            cd.load()
            new_slot = _opening_slot(cd, passphrase, spec.name)
            cd.keyslot_destroy(1 - new_slot)
        updated = _with_token(ctx, copy, area, READY, seq)
    _check(updated, spec, mac_key, READY)
    _write(ctx, area, updated, CrashWindow.REKEY_OLD_REMOVED_HALF)
    window(CrashWindow.REKEY_DONE)
    return updated


def _opening_slot(cd: CryptDevice, passphrase: Secret, name: str) -> int:
    try:
        return cd.activate_by_passphrase(None, passphrase)
    except WrongPassphrase:
        raise VolumeRefused(
            f"volume {name}: the contract's key does not open the rotated keyslot; refusing to "
            "go on with the rotation (nothing was changed; the previous key still opens it)"
        ) from None


def _with_token(ctx: _Ctx, copy: str, area: bytes, state: str, seq: int) -> bytes:
    """The copy's header area with cva's token set to `state`/`seq`, MAC'd over the copy."""
    name = ctx.spec.name
    current = _read_copy(copy, len(area), name)
    token = token_json(make_token(parse_luks2(current), state, name, ctx.mac_key, seq=seq))
    with CryptDevice.open(str(ctx.device), header=copy) as cd:
        cd.load()
        cd.token_json_set(cva_token_id(cd), token)
    return _read_copy(copy, len(area), name)


def _read_copy(copy: str, length: int, name: str) -> bytes:
    with Path(copy).open("rb", buffering=0) as handle:
        data = handle.read(length)
    if len(data) != length:
        raise VolumeRefused(f"volume {name}: short read of cva's own header copy; retry")
    return data


def _check(area: bytes, spec: _Spec, mac_key: Secret, state: str) -> None:
    """What cva is about to write passes its own allow-list and MAC (else nothing is written)."""
    hdr = parse_luks2(area)
    reasons = allow_list_reasons(hdr, integrity=spec.integrity)
    if reasons or verified_token(hdr, spec.name, mac_key).state != state:
        raise VolumeRefused(
            f"volume {spec.name}: the rotated header cva made does not validate "
            f"({'; '.join(reasons) or 'token state'}); nothing was written"
        )


def _write(ctx: _Ctx, expected: bytes, area: bytes, half: CrashWindow) -> None:
    """Write `area` if the disk still holds `expected`: keyslot area and secondary copy first,
    then the primary."""
    name = ctx.spec.name
    size = METADATA_BYTES
    fd = os.open(ctx.device, os.O_RDWR | os.O_CLOEXEC)
    try:
        if not blank.range_equals(fd, 0, expected):
            raise VolumeRefused(
                f"volume {name}: the on-disk LUKS header changed while cva was rotating its key "
                "in a copy; nothing was written (check who writes to the disk)"
            )
        view = memoryview(area)
        blank.write_all(fd, view[size:], size)
        os.fsync(fd)
        ctx.window(half)
        blank.write_all(fd, view[:size], 0)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- a rotation's cut write: two copies that disagree ----------------------------------------


@dataclass(frozen=True)
class _Pair:
    area: bytes  # the copy to adopt, in both slots
    state: str  # its token state (under the new key): rotating or ready


def _verify(hdr: LuksHeader, name: str, mac_key: Secret) -> str | None:
    try:
        return verified_token(hdr, name, mac_key).state
    except StorageError:
        return None


def _same_volume(a: LuksHeader, b: LuksHeader) -> bool:
    """The same UUID, segment, config and volume-key digest; keyslots and tokens may differ,
    and a keyslot both have is the same."""
    if a.uuid != b.uuid:
        return False
    for section in ("segments", "config"):
        if a.metadata.get(section) != b.metadata.get(section):
            return False
    da, db = a.section("digests").get("0"), b.section("digests").get("0")
    if not isinstance(da, dict) or not isinstance(db, dict):
        return False
    if {k: v for k, v in da.items() if k != "keyslots"} != {
        k: v for k, v in db.items() if k != "keyslots"
    }:
        return False
    ka, kb = a.section("keyslots"), b.section("keyslots")
    return all(ka[k] == kb[k] for k in set(ka) & set(kb))


def _both_verify(area: bytes, spec: _Spec, mac_key: Secret) -> bool:
    """Both copies verify under the new key (a cut write of cva's ready state or seq, not of a
    rotation's first step): the previous key cannot change the outcome, so it is not fetched."""
    which: Which
    for which in ("primary", "secondary"):
        try:
            hdr = parse_luks2(single_copy_area(area, which))
        except StorageError:
            return False
        if _verify(hdr, spec.name, mac_key) is None:
            return False
    return True


def _rotation_pair(
    area: bytes, spec: _Spec, mac_key: Secret, old_mac: Secret | None
) -> _Pair | None:
    """The copy to adopt when the two copies are the two sides of one rotation step, cut:
    (old ready, new rotating) -> the rotating one; (new rotating, new ready) -> the ready one.
    Each copy alone must pass the allow-list and its MAC; anything else -> None."""
    views: list[tuple[bytes, LuksHeader, KeyTag, str]] = []
    which: Which
    for which in ("primary", "secondary"):
        try:
            single = single_copy_area(area, which)
            hdr = parse_luks2(single)
        except StorageError:
            return None
        if allow_list_reasons(hdr, integrity=spec.integrity):
            return None
        state = _verify(hdr, spec.name, mac_key)
        tag: KeyTag = "new"
        if state is None and old_mac is not None:
            state, tag = _verify(hdr, spec.name, old_mac), "old"
        if state is None:
            return None
        views.append((single, hdr, tag, state))
    (a_area, a_hdr, a_tag, a_state), (b_area, b_hdr, b_tag, b_state) = views
    if not _same_volume(a_hdr, b_hdr):
        return None
    sides = {(a_tag, a_state): a_area, (b_tag, b_state): b_area}
    if set(sides) == {("old", READY), ("new", TOKEN_STATE_ROTATING)}:
        return _Pair(sides[("new", TOKEN_STATE_ROTATING)], TOKEN_STATE_ROTATING)
    if set(sides) == {("new", TOKEN_STATE_ROTATING), ("new", READY)}:
        return _Pair(sides[("new", READY)], READY)
    return None


def _adopt(ctx: _Ctx, area: bytes, pair: _Pair) -> bytes:
    """Write the adopted copy to both slots, once the new passphrase is shown to open it."""
    spec = ctx.spec
    with header_copy(pair.area) as copy, CryptDevice.open(str(ctx.device), header=copy) as cd:
        cd.load()
        _opening_slot(cd, ctx.passphrase, spec.name)
    write_adopted_copy(ctx.device, area, pair.area, METADATA_BYTES, spec.name)
    _log.warning(
        "header copies disagreed (a cut write of a key rotation); adopted one",
        logger=_LOGGER,
        volume=spec.name,
        adopted=pair.state,
    )
    return pair.area


def write_adopted_copy(device: Path, area: bytes, adopted: bytes, size: int, name: str) -> None:
    """Write the adopted header copy (the first `size` bytes of `adopted`, standing in both
    slots) to both slots of `device`, secondary first, only if the disk still holds the first
    two slots of `area`; else refuse with nothing written. Also luks.volume's adoption of a cut
    ready-state write."""
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        if not blank.range_equals(fd, 0, area[: 2 * size]):
            raise VolumeRefused(
                f"volume {name}: the on-disk LUKS header changed while cva was reading it; "
                "prepare again (check who writes to the disk)"
            )
        view = memoryview(adopted)
        blank.write_all(fd, view[size : 2 * size], size)
        os.fsync(fd)
        blank.write_all(fd, view[:size], 0)
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "FetchPrevious",
    "PreviousKeyRefused",
    "Rekeyed",
    "Settled",
    "settle",
    "write_adopted_copy",
]
