"""The per-volume state machine: a disk and a key in, a mounted encrypted volume out.

States (DESIGN §4; the durable ones live in the LUKS2 `cva` token, MAC'd with a key only the
attested guest can derive, so the host cannot forge or roll them forward):

    ABSENT        no cva header: the LV/disk is provably blank (blank.py) or something else
    INITIALIZING  LUKS2 header + keyslot + token state "initializing"; the filesystem may be
                  missing or half made; never held user data (it is never mounted in this state)
    READY         token state "ready": filesystem complete; the only state that is mounted
    OPEN          dm-crypt mapping `cva_<name>` active, built from the validated in-memory
                  header copy and checked against the contract in the live dm table; the
                  copy's identity (LUKS UUID, header digest, seq) is recorded in the state dir
                  (luks.mapping_record, tmpfs) before the activation and completed before the
                  mount: what a measured event names, never re-read from the disk
    MOUNTED       filesystem mounted at /run/cva/volumes/<name> (nodev,nosuid[,ro])
    BOUND         bind-mounted into container root filesystems (luks.mount.bind_into_rootfs)

    ABSENT --create & blank--> INITIALIZING --mkfs ok--> READY --open--> OPEN --mount-->
    MOUNTED --bind--> BOUND.   Release walks back: BOUND -> MOUNTED -> OPEN -> READY.

A failure anywhere between the activation and the mount closes the mapping (and forgets its
record) unless its filesystem is mounted. A mapping a later run still finds (a killed cva, a
close that failed) is never taken as it is: not mounted, it is closed and activated again from
the header the disk holds now (validated as always); mounted, or held open so that it cannot be
closed, it is kept only when its record is complete, for the same backing device, and names the
LUKS UUID the kernel holds in the mapping's dm UUID (`CRYPT-LUKS2-<uuid>-cva_<name>`), and its
identity is then the record's; anything else is refused ("release the volume and prepare
again"). So a header the host swaps in after the activation never becomes the measured one.

Decisions are pure (`classify`, `decide`, `initializing_action`, `expected_table`): the shell
observes, asks, acts. Rules that hold on every path: format only when no signature is found
and every byte of the target (the whole disk, or the LV) reads as zeros (luks.blankproof; the
sampled look only when the contract says `blank_check = "sampled"`) and the contract says
`create = true`; never format after a failed
open, a wrong key or a bad MAC (a run that tried to open never reaches the create branch, and
a refused volume is left byte-for-byte untouched); activate only from the validated copy,
never from the disk. libcryptsetup formats into a memfd: the token's MAC is computed over that
in-memory header and cva writes it to the disk itself (nothing the host could swap in is
ever read back and MAC'd).

"initializing" is not proof of anything: the MAC does not cover the seqid, so the host can
put back an older genuine header of this volume that still says "initializing" and damage
the first data block so no filesystem is found. mkfs on an INITIALIZING volume therefore runs
only when (luks.volume_plan.initializing_action): this very run proved the disk blank and
formatted it; or the contract says `create = true` AND the whole raw data area (16 MiB to the
end of the disk/LV) reads as zeros on the medium (blank.scan_zeros). Anything written through
dm-crypt is ciphertext, never a zero sector, and discards are off: a zero data area was never
written through the mapping, so it holds no filesystem and no user data. `create = false`,
unreadable first blocks (EIO), a non-zero data area, or integrity (dm-integrity keeps its own
superblock and journal in the data area, so the proof cannot be made) all refuse, naming
rule initializing-needs-blank-data; the disk is left untouched.

Crash windows (a SIGKILL can land anywhere; each named point below is where tests kill the
process via `crash_hook`, and what the next run does):

    PV_CREATED           PV label on the disk, no VG      -> vgcreate, continue (LVM only)
    VG_CREATED           VG, no LV                        -> lvcreate, continue
    LV_CREATED           LV exists, still zeros           -> blank -> create, continue
    LUKS_FORMATTED       header only in the memfd         -> disk still blank -> create again
                                                             (with integrity the dm-integrity
                                                             superblock and journal are on the
                                                             disk: REFUSE, not blank, with the
                                                             hint to zero the LV and redo)
    KEYSLOT_ADDED        keyslot only in the memfd        -> same as LUKS_FORMATTED
    INITIALIZING_WRITTEN token "initializing" on disk     -> open; raw data area proven zero
                                                             (create = true) -> mkfs, ready;
                                                             else REFUSE (integrity always)
    OPENED_INITIALIZING  mapping active, no filesystem, record incomplete
                                                          -> mapping closed and activated
                                                             again, same rule as above
    MKFS_DONE            filesystem made, still "initializing" -> complete fs found: no mkfs,
                                                             only mark ready (also with
                                                             create = false)
    READY_HALF_WRITTEN   secondary copy says "ready", primary still "initializing"
                                                          -> the copies disagree: each alone
                                                             is validated and MAC-verified; if
                                                             they differ only in the token, the
                                                             initializing copy is written to both
                                                             slots (luks.header_copies), then as
                                                             INITIALIZING: fs complete -> ready
    READY_WRITTEN        "ready" written, not mounted, mapping up, record incomplete
                                                          -> mapping closed, open (writes the
                                                             next seq), mount
    SEQ_HALF_WRITTEN     read-write open: secondary copy has seq N+1, primary still N
                                                          -> the copies differ only in the
                                                             token and each verifies alone:
                                                             the primary (seq N) is written to
                                                             both slots (luks.header_copies),
                                                             the mapping is closed, the open
                                                             writes N+1 again; nothing was
                                                             measured or handed out with N+1
    SEQ_WRITTEN          seq N+1 on disk, mapping up, record incomplete, not mounted, not
                         measured                         -> mapping closed, the open writes
                                                             N+2 (a gap, never a repeat), mount,
                                                             record N+2
    MOUNTED              mounted, record complete, grow pending
                                                          -> mount and record are reused (dm
                                                             UUID checked), grow checked again
    LV_EXTENDED          lvextend done, fs not grown      -> next run: a kept (mounted) mapping
                                                             is resized, a new one spans the LV;
                                                             the fs is grown
    GROW_PV_RESIZED      the host enlarged the disk; pvresize done (at open, or online by
                         luks.grow), LV not extended      -> next grow/open: the "max" LV takes
                                                             the VG's free space (a fixed LV
                                                             keeps its size), then as below
    GROW_LV_EXTENDED     online: lvextend done, mapping not resized
                                                          -> next grow: crypt_resize (key
                                                             fetched again, header = the
                                                             recorded one), fs grown; next open:
                                                             as LV_EXTENDED
    GROW_MAPPING_RESIZED online: mapping spans the LV, fs not grown
                                                          -> next grow or open: fs grown
    GROW_FS_GROWN        online: done                     -> nothing (each grow step is chosen
                                                             from fresh sizes: luks.grow_plan;
                                                             never a shrink, integrity refused)
    REKEY_SLOT_ADDED_HALF, REKEY_SLOT_ADDED, REKEY_OLD_REMOVED_HALF, REKEY_DONE
                         a key rotation (contract previous_key) cut: luks.rotation names each
                                                             window and what the next open does

A crash while cva writes the header from its memfd (keyslots and secondary copy first, the
primary last) leaves a header region that is neither zero nor valid: refused, never
reformatted. Disagreeing header copies are never handed to libcryptsetup (the CVE-2025-59054
class: it would pick one itself); READY_HALF_WRITTEN is resolved by cva from its own
validation of each copy. Refusals leave the disk untouched for inspection.

Before any format the target is proven blank (luks.blankproof): no signature, and every byte
reads as zeros (the contract's `blank_check = "sampled"` reads only the header region and
samples). With LVM, a disk without a PV is proven blank in full before pvcreate; the LV this
run then creates lies inside it and needs only the signature probes; an LV found on a later
run is proven in full itself. A scan resumes within one boot from a tmpfs cursor
(<runtime_dir>/blank/) keyed by the device's major:minor, size and diskseq.

Sequence (luks.token: `seq` in the MAC'd token, what measured volume events carry so a
verifier sees a rolled-back header): the first ready token has seq 1; every read-write open
that activates the mapping writes seq + 1 (both copies, secondary first, from the validated
copy, only if the disk still holds it) after the volume is found complete and before it is
mounted, measured or handed out, so an event never names a seq the header does not hold.
A read-only open writes nothing and reports the current seq; keeping a mounted mapping (a
restarted cva) writes nothing either and reports the recorded seq. A host that puts back an
older header makes the next open report a seq not above one already in the log.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from luks import (
    blank,
    blankproof,
    dmtable,
    fs,
    header_copies,
    integrity_fresh,
    lvm,
    mapping_record,
    mount,
)
from luks.errors import StorageError
from luks.grow_plan import pv_needs_resize
from luks.header import allow_list_reasons, parse_luks2, read_header_area
from luks.libcryptsetup import (
    DATA_OFFSET_BYTES,
    METADATA_BYTES,
    CryptDevice,
    WrongPassphrase,
    active_status,
    deactivate_by_name,
    header_copy,
)
from luks.rotation import FetchPrevious, Rekeyed, settle, write_adopted_copy
from luks.secret import Secret
from luks.spec import VolumeSpec
from luks.token import (
    cva_token_id,
    derive_keys,
    make_token,
    metadata_sha256,
    next_sequence,
    token_json,
    verified_token,
    verify_token,
)
from luks.volume_plan import (
    INITIALIZING,
    READY,
    REINIT_HINT,
    CrashWindow,
    HeaderObservation,
    InitDecision,
    State,
    VolumeRefused,
    classify,
    decide,
    expected_table,
    fs_complete,
    fs_size_bytes,
    initializing_action,
    mapper_name,
    needs_grow,
)

# structlog's own lazy logger: the application configures the processors (agent.log redacts)
_log = structlog.get_logger()
_LOGGER = "cva.luks.volume"

__all__ = [
    "CrashWindow",
    "PreparedVolume",
    "State",
    "VolumeRefused",
    "bind_volume",
    "crash_hook",
    "mapper_name",
    "prepare_volume",
    "release_volume",
]


# Tests set this (inside the guest) to SIGKILL the process at a named window. Never set by cva.
crash_hook: Callable[[CrashWindow], None] | None = None


def _window(window: CrashWindow) -> None:
    if crash_hook is not None:
        crash_hook(window)


@dataclass(frozen=True)
class PreparedVolume:
    name: str
    state: State
    guest_path: Path  # where the filesystem is mounted in the guest
    device: Path  # the opened mapper device
    mapper_name: str
    created: bool  # this run formatted the volume
    luks_uuid: str = ""  # of the validated in-memory header copy (measured volume events)
    header_sha256: bytes = b""  # luks.token.metadata_sha256 of that copy
    sequence: int | None = None  # the token's seq the volume was opened with (luks.token)
    rekeyed: Rekeyed | None = None  # this open moved it to its key (luks.rotation)


# ---- the shell ----------------------------------------------------------------------------


def _observe(area: bytes, vol: VolumeSpec, mac_key: Secret) -> HeaderObservation:
    return classify(
        area,
        parse=parse_luks2,
        allow_reasons=lambda h: allow_list_reasons(h, integrity=vol.integrity),
        verify=lambda h: verify_token(h, vol.name, mac_key),
    )


def _read_area(device: Path) -> bytes:
    return read_header_area(str(device))


@contextlib.contextmanager
def _volume_lock(runtime_dir: Path, name: str) -> Iterator[None]:
    """One prepare/release of a volume at a time (the daemon may get concurrent requests)."""
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(
        runtime_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _format(device: Path, vol: VolumeSpec, passphrase: Secret, mac_key: Secret) -> bytes:
    """ABSENT -> INITIALIZING on a device proved blank just before; returns the header area.

    The header is made in memory (`_format_in_memory`); cva writes the whole header region to
    the disk itself. With integrity, format also writes dm-integrity's superblock into the
    data area of `device` (needs device-mapper).
    """
    return _write_formatted(device, _format_in_memory(device, vol, passphrase, mac_key))


def _format_in_memory(device: Path, vol: VolumeSpec, passphrase: Secret, mac_key: Secret) -> bytes:
    """libcryptsetup formats into a memfd (guest memory, a detached header with cva's on-disk
    layout: data at 16 MiB of `device`) and adds the keyslot there; cva MACs the token over
    that in-memory copy. No byte the host could swap in between is ever read back and MAC'd.
    Without integrity nothing is written to `device` (so it may run while the blank proof
    reads it: `_FormatAhead`)."""
    fd = os.memfd_create("cva-luks-format", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, DATA_OFFSET_BYTES)
        copy = f"/proc/{os.getpid()}/fd/{fd}"
        with CryptDevice.open(str(device), header=copy) as cd:
            cd.format_luks2(integrity=vol.integrity)
            _window(CrashWindow.LUKS_FORMATTED)
            cd.keyslot_add_by_volume_key(passphrase, keyslot=0)
            _window(CrashWindow.KEYSLOT_ADDED)
            hdr = parse_luks2(_read_fd(fd, DATA_OFFSET_BYTES))
            token = make_token(hdr, INITIALIZING, vol.name, mac_key, seq=0)
            cd.token_json_set(0, token_json(token))
        return _read_fd(fd, DATA_OFFSET_BYTES)
    finally:
        os.close(fd)


def _write_formatted(device: Path, area: bytes) -> bytes:
    _write_header(device, area)
    _window(CrashWindow.INITIALIZING_WRITTEN)
    return area


class _FormatAhead:
    """The in-memory format of a create without integrity, run in a thread while the blank
    proof reads the disk (libcryptsetup's calls are foreign calls: they run without the GIL).
    It writes nothing to the disk; its header is used only if the proof then says blank and
    the plan says create, else dropped. Leaving the block waits for it (the keys it borrows
    are wiped only after). With integrity (the format writes the data area) it does nothing."""

    def __init__(self, device: Path, vol: VolumeSpec, passphrase: Secret, mac_key: Secret):
        self._args = (device, vol, passphrase, mac_key)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._future: concurrent.futures.Future[bytes] | None = None

    def __enter__(self) -> _FormatAhead:
        if not self._args[1].integrity:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "cva-format-ahead")
            self._future = self._pool.submit(_format_in_memory, *self._args)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def area(self) -> bytes | None:
        """The header made ahead (raises what the format raised), or None (none was made)."""
        return None if self._future is None else self._future.result()


def _format_scratch(device: Path) -> None:
    """cva's integrity format (header into a memfd, dm-integrity superblock and journal onto
    `device`): what LUKS_FORMATTED leaves behind, made on a scratch device."""
    fd = os.memfd_create("cva-luks-scratch", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, DATA_OFFSET_BYTES)
        with CryptDevice.open(str(device), header=f"/proc/{os.getpid()}/fd/{fd}") as cd:
            cd.format_luks2(integrity=True)
    finally:
        os.close(fd)


def _fresh_integrity_only(
    device: Path, vol: VolumeSpec, scratch_dir: Path, verdict: blank.BlankVerdict
) -> blank.BlankVerdict:
    """Crash windows LUKS_FORMATTED / KEYSLOT_ADDED with integrity: a zero header region over
    a data area that holds exactly what cva's own integrity format writes (luks.integrity_fresh)
    is as blank as it was; anything else keeps `verdict` (not blank), with the reason."""
    ok, why = integrity_fresh.only_fresh_format(device, scratch_dir, _format_scratch)
    _log.info(
        "integrity data area compared with a fresh format",
        logger=_LOGGER,
        volume=vol.name,
        fresh=ok,
    )
    if ok:
        return blank.BlankVerdict(True, "")
    return blank.BlankVerdict(False, f"{verdict.reason}; {why}")


def _read_fd(fd: int, length: int) -> bytes:
    data = blank.read_range(fd, 0, length)
    if len(data) != length:
        raise VolumeRefused(f"short read of cva's in-memory header copy ({len(data)} bytes)")
    return data


def _write_header(device: Path, area: bytes) -> None:
    """Write a header region made in memory: keyslots and the secondary copy first, the
    primary binary header last (a crash before it leaves no valid primary: refused, never
    reformatted as long as the region is not zero)."""
    primary = _metadata_size(area)
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        view = memoryview(area)
        blank.write_all(fd, view[primary:], primary)
        os.fsync(fd)
        blank.write_all(fd, view[:primary], 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _mark_ready(
    device: Path,
    copy: str,
    area: bytes,
    vol: VolumeSpec,
    mac_key: Secret,
    *,
    half_window: CrashWindow = CrashWindow.READY_HALF_WRITTEN,
) -> bytes:
    """Write a READY token with the next sequence (INITIALIZING -> READY, or a read-write
    open): update the token in the copy, then write the copy's metadata back.

    The disk is only written with bytes derived from cva's validated copy, and only if the
    disk's header region still equals that copy (a swap in between is refused). Returns the
    new header area.
    """
    hdr = parse_luks2(area)
    seq = next_sequence(verified_token(hdr, vol.name, mac_key).seq)
    token = token_json(make_token(hdr, READY, vol.name, mac_key, seq=seq))
    with CryptDevice.open(str(device), header=copy) as cd:
        cd.load()
        cd.token_json_set(cva_token_id(cd), token)
    # read exactly the area back (no 16 MiB slice copies: peak memory on create, bench §2)
    with Path(copy).open("rb", buffering=0) as handle:
        updated = handle.read(len(area))
    if len(updated) != len(area):
        raise VolumeRefused(f"volume {vol.name}: short read of cva's own header copy; retry")
    metadata = updated[: 2 * _metadata_size(area)]
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        if not blank.range_equals(fd, 0, area):
            raise VolumeRefused(
                f"volume {vol.name}: the on-disk LUKS header changed while cva was using its "
                "copy; refusing to write the ready state (check who writes to the disk)"
            )
        half = len(metadata) // 2
        # secondary copy first, then the primary: a crash in between leaves two valid copies
        # that disagree, which the next run refuses (never a format)
        os.pwrite(fd, metadata[half:], half)
        os.fsync(fd)
        _window(half_window)
        os.pwrite(fd, metadata[:half], 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return updated


def _adopt_half_written(
    device: Path, area: bytes, vol: VolumeSpec, mac_key: Secret
) -> tuple[bytes, HeaderObservation]:
    """Crash window READY_HALF_WRITTEN: the two header copies disagree. Adopt one only when
    each alone is a valid, MAC-verified header of this volume and they differ only in the cva
    token (luks.header_copies); write it to both slots (the disk must still hold `area`), and
    go on with it ("initializing" then follows the replay-safe initializing rule)."""
    result = header_copies.adopt(
        area,
        allow_reasons=lambda h: allow_list_reasons(h, integrity=vol.integrity),
        verify=lambda h: verify_token(h, vol.name, mac_key),
    )
    if isinstance(result, str):
        raise VolumeRefused(
            f"volume {vol.name}: not a usable cva volume: the two LUKS2 header copies disagree "
            f"and {result}; restore the volume's current header, or zero the disk or LV on "
            "purpose (blkdiscard -z) to start over"
        )
    # secondary first, as _mark_ready does
    write_adopted_copy(device, area, result.area, _metadata_size(result.area), vol.name)
    _log.warning(
        "header copies disagreed (a cut write of the ready state); adopted one",
        logger=_LOGGER,
        volume=vol.name,
        adopted=result.state,
        other=result.other_state,
    )
    obs = _observe(result.area, vol, mac_key)
    if obs.kind != "cva":
        raise VolumeRefused(f"volume {vol.name}: internal error adopting a header copy")
    return result.area, obs


def _metadata_size(area: bytes) -> int:
    # LUKS2 binary header: hdr_size (u64 big-endian) at offset 8 (validated by the allow-list)
    size = int.from_bytes(area[8:16], "big")
    if size != METADATA_BYTES:
        raise VolumeRefused(f"LUKS2 header size {size} is not cva's {METADATA_BYTES}")
    return size


def _activate(
    device: Path,
    area: bytes,
    mapper: str,
    passphrase: Secret,
    *,
    read_only: bool,
    name: str,
    private: bool = False,
) -> None:
    """Activate from the validated copy (a memfd), never from the disk. `private`: udev does
    not probe the new mapping (a fresh integrity volume, whose unwritten blocks read as EIO)."""
    try:
        with header_copy(area) as copy, CryptDevice.open(str(device), header=copy) as cd:
            cd.load()
            cd.activate_by_passphrase(mapper, passphrase, read_only=read_only, private=private)
    except WrongPassphrase:
        raise VolumeRefused(
            f"volume {name}: the key from the KBS does not open this volume; nothing was changed "
            "(check the key resource in the contract)"
        ) from None


def _is_active(mapper: str) -> bool:
    return active_status(mapper) in ("active", "busy")


def _deactivate(mapper: str) -> None:
    if _is_active(mapper):
        deactivate_by_name(mapper)


def _check_table(mapper: str, vol: VolumeSpec, device: Path) -> None:
    """The live table against the contract (the caller closes the mapping unless mounted)."""
    expected = expected_table(integrity=vol.integrity, backing_devno=dmtable.device_number(device))
    dmtable.check_live(mapper, expected)


def _activate_recorded(
    device: Path,
    area: bytes,
    mapper: str,
    passphrase: Secret,
    mac_key: Secret,
    *,
    vol: VolumeSpec,
    read_only: bool,
    runtime_dir: Path,
    devno: str,
) -> mapping_record.MappingRecord:
    """Record the copy's identity (incomplete), activate from the copy, and check that the
    kernel's dm UUID of the new mapping names that copy. Returns the (incomplete) record."""
    validated = parse_luks2(area)
    record = mapping_record.MappingRecord(
        luks_uuid=validated.uuid,
        header_sha256=metadata_sha256(validated),
        seq=verified_token(validated, vol.name, mac_key).seq,
        device=devno,
        complete=False,
    )
    mapping_record.save(runtime_dir, vol.name, record)  # before: an active mapping has a record
    _activate(
        device, area, mapper, passphrase, read_only=read_only, name=vol.name, private=vol.integrity
    )
    live = mapping_record.live_dm_uuid(mapper)
    if live != mapping_record.dm_uuid(record.luks_uuid, mapper):
        raise VolumeRefused(
            f"volume {vol.name}: the new mapping {mapper} has dm UUID {live[:80]!r}, not the "
            f"validated header's {record.luks_uuid}; it was closed (check for another "
            "device-mapper user in the guest)"
        )
    return record


def _leftover_mapping(
    vol: VolumeSpec,
    mapper: str,
    target: Path,
    runtime_dir: Path,
    devno: str,
    *,
    initializing: bool,
) -> mapping_record.MappingRecord | None:
    """A mapping an earlier run left up (a failure it could not close, a killed cva).

    Not mounted at `target`: it is closed, and the caller activates again from the validated
    copy (None).
    Mounted, or held open so it cannot be closed: reused only when cva's record of its
    activation is complete, for this device, and names the header the kernel's dm UUID names;
    the record (never a re-read of the disk) is then the volume's identity. Otherwise refused.
    """
    if not _is_active(mapper):
        return None
    mounted = mount.is_mounted(target, Path("/dev/mapper") / mapper)
    why_open = f"is mounted at {target}"
    if not mounted:
        try:
            deactivate_by_name(mapper)
        except StorageError as exc:
            why_open = f"cannot be closed ({exc})"
        else:
            mapping_record.drop(runtime_dir, vol.name)
            _log.info(
                "closed a mapping left by an earlier run; activating again from the header",
                logger=_LOGGER,
                volume=vol.name,
            )
            return None
    if initializing:
        raise VolumeRefused(
            f"volume {vol.name}: the header says initializing but mapping {mapper} {why_open}; "
            "release the volume (ReleaseVolumes, or umount and cryptsetup close) and prepare again"
        )
    record = mapping_record.load(runtime_dir, vol.name)
    why = mapping_record.reuse_refusal(
        record, live_dm_uuid=mapping_record.live_dm_uuid(mapper), mapper=mapper, device=devno
    )
    if why is not None:
        raise VolumeRefused(
            f"volume {vol.name}: mapping {mapper} {why_open} but {why}; release the volume "
            "(ReleaseVolumes, or umount and cryptsetup close) and prepare again"
        )
    return record


def _close_unless_mounted(vol: VolumeSpec, mapper: str, target: Path, runtime_dir: Path) -> None:
    """After a failure: close the mapping unless its filesystem is mounted (then it is in use and
    its record stays). A close that fails is logged; the next run then refuses to reuse it
    without the record's proof."""
    try:
        if not _is_active(mapper) or mount.is_mounted(target, Path("/dev/mapper") / mapper):
            return
        deactivate_by_name(mapper)
        mapping_record.drop(runtime_dir, vol.name)
    except Exception as exc:  # noqa: BLE001 - the original failure is what the caller raises
        _log.warning(
            "could not close the mapping after a failure",
            logger=_LOGGER,
            volume=vol.name,
            error=str(exc)[:300],
        )


def _crypt_resize(device: Path, area: bytes, mapper: str, passphrase: Secret) -> None:
    """Grow the active mapping to the whole (grown) LV; the key goes through the keyring."""
    with header_copy(area) as copy, CryptDevice.open(str(device), header=copy) as cd:
        cd.load()
        cd.activate_by_passphrase(None, passphrase, keyring=True)
        cd.resize(mapper, 0)


ScanProgress = Callable[[str, int, int], None]  # (what, bytes proven, bytes in total)
LOG_EVERY = 5.0  # seconds between progress log lines of a zero scan


class _Scans:
    """The zero scans of one prepare: the contract's blank check, the cursor directory, and
    progress (a log line every LOG_EVERY s with bytes and rate, and the caller's callback)."""

    def __init__(self, vol: VolumeSpec, cursor_dir: Path, progress: ScanProgress | None) -> None:
        self.vol = vol
        self.cursor_dir = cursor_dir
        self._progress = progress

    def _reporter(self, what: str) -> blankproof.Progress:
        started = time.monotonic()
        state = {"logged": started, "first": -1}

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if state["first"] < 0:
                state["first"] = done  # a resumed scan: rate over what this run read
            if now - state["logged"] >= LOG_EVERY or done == total:
                state["logged"] = now
                elapsed = max(now - started, 1e-6)
                _log.info(
                    "proving blank",
                    logger=_LOGGER,
                    volume=self.vol.name,
                    what=what,
                    bytes=done,
                    total=total,
                    mib_per_s=round((done - state["first"]) / elapsed / (1 << 20), 1),
                )
            if self._progress is not None:
                self._progress(what, done, total)

        return report

    def prove(self, device: Path, what: str) -> blankproof.Proof:
        started = time.monotonic()
        proof = blankproof.prove_blank(
            device,
            mode=self.vol.blank_check,
            cursor_dir=self.cursor_dir,
            progress=self._reporter(what),
        )
        _log.info(
            "blank proof",
            logger=_LOGGER,
            volume=self.vol.name,
            what=what,
            mode=proof.mode,
            blank=proof.blank,
            bytes=proof.bytes_scanned,
            resumed_from=proof.resumed_from,
            first_nonzero=proof.first_nonzero_offset,
            seconds=round(time.monotonic() - started, 3),
        )
        return proof

    def scan_data_area(self, device: Path, size: int) -> blank.ZeroScan:
        """The raw data area (16 MiB to the end), every byte, for an 'initializing' header."""
        started = time.monotonic()
        report = self._reporter("data area")
        scan = blank.scan_zeros(
            device,
            DATA_OFFSET_BYTES,
            max(0, size - DATA_OFFSET_BYTES),
            progress=report,
            progress_every=1.0,
        )
        _log.info(
            "data area zero scan",
            logger=_LOGGER,
            volume=self.vol.name,
            zero=scan.zero,
            bytes=scan.bytes_scanned,
            seconds=round(time.monotonic() - started, 3),
        )
        return scan


def _ensure_lvm(vol: VolumeSpec, disk: Path, scans: _Scans) -> tuple[Path, bool]:
    """Bring up vol.lvm on `disk` (create/activate/extend as planned); returns the LV device
    and whether its whole extent was proven zero in this run (the disk was proven blank, in
    full, just before this run created the PV and the LV: lvcreate neither zeroes nor wipes)."""
    spec = vol.lvm
    if spec is None:
        return disk, False
    disk_s = str(disk.resolve())
    state = lvm.read_state(disk_s)
    if _pv_grown(state, disk_s, spec.vg) and not vol.integrity:
        # the host enlarged the disk while the volume was closed: the PV takes it first
        # (an integrity volume is never grown: luks.grow_plan.INTEGRITY_REASON)
        lvm.pvresize(disk_s)
        _window(CrashWindow.GROW_PV_RESIZED)
        state = lvm.read_state(disk_s)
    plan = lvm.plan(state, disk_s, spec.vg, spec.lv, spec.size_bytes, create=vol.create)
    if plan.refusal:
        raise VolumeRefused(f"volume {vol.name}: {plan.refusal}")
    disk_proven = False
    if plan.needs_blank_disk:
        proof = scans.prove(Path(disk_s), "disk")
        if not proof.blank:
            raise VolumeRefused(
                f"volume {vol.name}: disk {disk} has no LVM PV and is not blank "
                f"({proof.reason}); " + REINIT_HINT
            )
        disk_proven = proof.mode == "full"
        blankproof.drop_cursor(scans.cursor_dir, Path(disk_s))  # cva writes to it now
    created_lv = False
    for step in plan.steps:
        if step == "pvcreate":
            lvm.pvcreate(disk_s)
            _window(CrashWindow.PV_CREATED)
        elif step == "vgcreate":
            lvm.vgcreate(disk_s, spec.vg)
            _window(CrashWindow.VG_CREATED)
        elif step == "lvcreate":
            lvm.lvcreate(disk_s, spec.vg, spec.lv, spec.size_bytes)
            created_lv = True
            _window(CrashWindow.LV_CREATED)
        elif step == "activate":
            lvm.activate(disk_s, spec.vg, spec.lv)
        elif step == "extend":
            if vol.integrity:
                # libcryptsetup 2.6 cannot resize a LUKS2 mapping with dm-integrity (ENOTSUP):
                # keep the volume at its size rather than extend an LV that cannot be used
                _log.warning(
                    "integrity volume not grown: libcryptsetup cannot resize dm-integrity",
                    logger=_LOGGER,
                    volume=vol.name,
                    contract_size=spec.size_bytes,
                )
                continue
            lvm.extend(disk_s, spec.vg, spec.lv, spec.size_bytes)
            _window(CrashWindow.LV_EXTENDED)
    return lvm.dm_path(spec.vg, spec.lv), disk_proven and created_lv


def _pv_grown(state: lvm.LvmState, disk: str, vg: str) -> bool:
    pv = next((p for p in state.pvs if p.name == disk and p.vg == vg), None)
    group = next((g for g in state.vgs if g.name == vg), None)
    return (
        pv is not None
        and group is not None
        and pv_needs_resize(pv.dev_size, pv.size, group.extent_size)
    )


def _superblock(mapper_dev: Path, *, eio_is_zero: bool = True) -> tuple[bytes | None, int]:
    """(first 64 KiB, device size) of the opened volume.

    On a fresh integrity volume those blocks were never written and read as EIO/EILSEQ: with
    `eio_is_zero` that is reported as zeros (no filesystem), the truth for a block never
    written; without it, as None (unreadable).
    """
    fd = os.open(mapper_dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        # the mounted filesystem writes its superblock through its own cache: drop ours
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            head: bytes | None = blank.read_range(fd, 0, 65536)
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EILSEQ):
                raise
            head = bytes(65536) if eio_is_zero else None
        return head, size
    finally:
        os.close(fd)


def _initializing_decision(
    vol: VolumeSpec, device: Path, mapper_dev: Path, *, formatted_now: bool, scans: _Scans
) -> InitDecision:
    """Observe an opened INITIALIZING volume and decide (luks.volume_plan.initializing_action);
    the full zero scan of the raw data area runs only when the decision needs it."""
    if formatted_now:
        # this run proved the target blank and formatted it: mkfs, without reading the fresh
        # mapping first (with integrity every block not yet written reads as EIO and logs an
        # "INTEGRITY AEAD ERROR" line, which must mean tampering and nothing else)
        return InitDecision("mkfs")
    head, _ = _superblock(mapper_dev, eio_is_zero=False)

    def decide_with(zero: bool | None = None, first: int | None = None) -> InitDecision:
        return initializing_action(
            filesystem=vol.filesystem,
            superblock_readable=head is not None,
            filesystem_complete=head is not None and fs_complete(vol.filesystem, head),
            formatted_now=formatted_now,
            create=vol.create,
            integrity=vol.integrity,
            data_area_zero=zero,
            first_nonzero=first,
        )

    decision = decide_with()
    if decision.action != "prove-zero":
        return decision
    size = blank.device_size(device)
    scan = scans.scan_data_area(device, size)
    decision = decide_with(scan.zero, scan.first_nonzero)
    if decision.action == "prove-zero":  # cannot happen: the proof was given
        raise VolumeRefused(f"volume {vol.name}: internal error deciding an initializing volume")
    return decision


def prepare_volume(
    vol: VolumeSpec,
    secret: Secret,
    *,
    disk: Path,
    runtime_dir: Path,
    mount_base: Path,
    progress: ScanProgress | None = None,
    previous: FetchPrevious | None = None,
) -> PreparedVolume:
    """Open (or create, when allowed and provably blank) and mount one volume; idempotent.

    `disk` is the contract's disk (luks.disk.wait_for_disk); `runtime_dir` holds the per-volume
    lock and the blank scans' cursors (tmpfs, e.g. /run/cva); the filesystem is mounted at
    `mount_base/<name>`. `progress(what, bytes_done, bytes_total)` hears about zero scans.
    `previous` fetches the contract's previous key, for a volume still under it (key rotation,
    luks.rotation: crash windows REKEY_*); None: the contract names none.
    """
    scans = _Scans(vol, runtime_dir / "blank", progress)
    with _volume_lock(runtime_dir, vol.name):
        return _prepare(
            vol,
            secret,
            disk=disk,
            mount_base=mount_base,
            scans=scans,
            runtime_dir=runtime_dir,
            previous=previous,
        )


def _prepare(
    vol: VolumeSpec,
    secret: Secret,
    *,
    disk: Path,
    mount_base: Path,
    scans: _Scans,
    runtime_dir: Path,
    previous: FetchPrevious | None = None,
) -> PreparedVolume:
    device, lv_proven = _ensure_lvm(vol, disk, scans)
    mapper = mapper_name(vol.name)
    mapper_dev = Path("/dev/mapper") / mapper
    target = mount_base / vol.name
    created = False
    passphrase, mac_key = derive_keys(secret, vol.name)
    with passphrase, mac_key:
        area = _read_area(device)  # step 1: the copy; everything below uses these bytes
        obs = _observe(area, vol, mac_key)
        settled = settle(  # a volume under its previous key, or in a cut rotation
            device, area, obs, name=vol.name, integrity=vol.integrity, read_only=vol.read_only,
            secret=secret, previous=previous, observe=lambda a: _observe(a, vol, mac_key),
            window=_window,
        )  # fmt: skip
        area, obs = settled.area, settled.obs
        if obs.kind == "invalid" and all(r.startswith("header-copies") for r in obs.reasons):
            area, obs = _adopt_half_written(device, area, vol, mac_key)
        verdict = None
        ahead: bytes | None = None  # the header formatted in memory during the blank proof
        if obs.kind == "zero":
            if not vol.create:  # no format possible: the cheap sampled look names the reason
                verdict = blankproof.prove_blank(device, mode="sampled").verdict
            elif lv_proven:  # its whole extent was proven zero moments ago, in this run
                sigs = blankproof.signatures(device)
                verdict = blank.BlankVerdict(not sigs, "signature found: " + ", ".join(sigs))
            else:
                with _FormatAhead(device, vol, passphrase, mac_key) as formatting:
                    # every byte with O_DIRECT, the header region `area` (a buffered copy) too
                    proof = scans.prove(device, "volume")
                verdict = proof.verdict
                if proof.blank:
                    ahead = formatting.area()
                if vol.integrity and proof.first_nonzero_offset == DATA_OFFSET_BYTES:
                    verdict = _fresh_integrity_only(device, vol, scans.cursor_dir, verdict)
        decision = decide(obs, verdict, create=vol.create)
        if decision.action == "refuse":
            raise VolumeRefused(f"volume {vol.name}: {decision.reason}")
        if decision.action == "create":
            blankproof.drop_cursor(scans.cursor_dir, device)  # cva writes to it now
            # the header cva made and MAC'd in memory; the disk is not read back
            if ahead is not None:
                area = _write_formatted(device, ahead)
            else:
                area = _format(device, vol, passphrase, mac_key)
            created = True
            obs = _observe(area, vol, mac_key)
            if obs.kind != "cva" or obs.token_state != INITIALIZING:
                raise VolumeRefused(
                    f"volume {vol.name}: the header cva just wrote does not validate "
                    f"({'; '.join(obs.reasons)}); nothing was mounted"
                )
        initializing = obs.token_state == INITIALIZING
        devno = dmtable.device_number(device)
        # a mapping left up by an earlier run: closed unless mounted, reused only with proof
        record = _leftover_mapping(
            vol, mapper, target, runtime_dir, devno, initializing=initializing
        )
        try:
            record = _open_mapping(
                vol, device, area, passphrase, mac_key, leftover=record, target=target,
                runtime_dir=runtime_dir, devno=devno, initializing=initializing, created=created,
                scans=scans,
            )  # fmt: skip
            mount.mount_volume(mapper_dev, target, fs=vol.filesystem, read_only=vol.read_only)
        except BaseException:
            _close_unless_mounted(vol, mapper, target, runtime_dir)
            raise
        _window(CrashWindow.MOUNTED)
        if not vol.read_only:
            _grow_if_needed(vol, mapper_dev, target)
    return PreparedVolume(
        vol.name,
        State.MOUNTED,
        target,
        mapper_dev,
        mapper,
        created,
        record.luks_uuid,
        record.header_sha256,
        record.seq,
        settled.rekeyed,
    )


def _open_mapping(
    vol: VolumeSpec,
    device: Path,
    area: bytes,
    passphrase: Secret,
    mac_key: Secret,
    *,
    leftover: mapping_record.MappingRecord | None,
    target: Path,
    runtime_dir: Path,
    devno: str,
    initializing: bool,
    created: bool,
    scans: _Scans,
) -> mapping_record.MappingRecord:
    """OPEN: activate from the validated copy (or keep the proven `leftover` mapping), check the
    live table, finish an initializing volume, check the filesystem, write the next seq, and
    complete the record. Returns the identity to measure. The caller closes the mapping on any
    failure unless it is mounted."""
    mapper = mapper_name(vol.name)
    mapper_dev = Path("/dev/mapper") / mapper
    record = leftover
    activated: mapping_record.MappingRecord | None = None
    if record is None:
        ro = vol.read_only and not initializing
        # integrity: no udev blkid probe of the mapping, whose blocks the filesystem
        # never wrote read as EIO and log "INTEGRITY AEAD ERROR" (a fresh volume: all of
        # them; xfs: blkid's probes at 2 MiB); cva reads the superblock itself
        activated = _activate_recorded(
            device, area, mapper, passphrase, mac_key, vol=vol, read_only=ro,
            runtime_dir=runtime_dir, devno=devno,
        )  # fmt: skip
    _check_table(mapper, vol, device)
    if initializing:
        _window(CrashWindow.OPENED_INITIALIZING)
        if mount.is_mounted(target):
            raise VolumeRefused(
                f"volume {vol.name}: {target} is mounted while the volume is still "
                "initializing; unmount it and prepare again"
            )
        init = _initializing_decision(vol, device, mapper_dev, formatted_now=created, scans=scans)
        if init.action == "refuse":
            raise VolumeRefused(f"volume {vol.name}: {init.reason}")
        if init.action == "mkfs":
            fs.make_fs(mapper_dev, vol.filesystem, integrity=vol.integrity)
            _window(CrashWindow.MKFS_DONE)
        with header_copy(area) as copy:
            area = _mark_ready(device, copy, area, vol, mac_key)
        _window(CrashWindow.READY_WRITTEN)
        if vol.read_only:
            _deactivate(mapper)
            activated = _activate_recorded(
                device, area, mapper, passphrase, mac_key, vol=vol, read_only=True,
                runtime_dir=runtime_dir, devno=devno,
            )  # fmt: skip
            _check_table(mapper, vol, device)
    elif record is not None and vol.lvm is not None and not vol.read_only and not vol.integrity:
        # a kept mapping: the LV may have grown under it (crash window LV_EXTENDED); resized
        # only with the header it was activated from (the resize loads that header's key)
        validated = parse_luks2(area)
        if (validated.uuid, metadata_sha256(validated)) == (record.luks_uuid, record.header_sha256):
            _crypt_resize(device, area, mapper, passphrase)
            _check_table(mapper, vol, device)
        else:
            _log.warning(
                "mapping not resized: the disk's header is not the one it was activated from",
                logger=_LOGGER,
                volume=vol.name,
            )
    head, _size = _superblock(mapper_dev)
    if head is None or not fs_complete(vol.filesystem, head):
        raise VolumeRefused(
            f"volume {vol.name}: no complete {vol.filesystem} filesystem inside the "
            "volume; refusing to mount (the contract's filesystem must match the volume's)"
        )
    if record is None:
        # a read-write open writes the next sequence before anyone sees the volume (also
        # after SEQ_HALF_WRITTEN: the adopted copy holds the old seq)
        if not initializing and not vol.read_only:
            with header_copy(area) as copy:
                area = _mark_ready(
                    device, copy, area, vol, mac_key,
                    half_window=CrashWindow.SEQ_HALF_WRITTEN,
                )  # fmt: skip
            _window(CrashWindow.SEQ_WRITTEN)
        # the identity measured from now on: the activated copy's UUID and digest, and
        # the seq cva itself just wrote (or read, read-only) in that copy
        seq = verified_token(parse_luks2(area), vol.name, mac_key).seq
        assert activated is not None  # record is None: activated above
        record = dataclasses.replace(activated, seq=seq, complete=True)
        mapping_record.save(runtime_dir, vol.name, record)
    return record


def _grow_if_needed(vol: VolumeSpec, mapper_dev: Path, target: Path) -> None:
    head, size = _superblock(mapper_dev)
    current = fs_size_bytes(vol.filesystem, head) if head is not None else None
    if not needs_grow(current, size):
        return
    if vol.integrity and current is not None:
        fs.write_zeros(mapper_dev, fs.grow_prewrite_ranges(current, size))
    fs.grow_fs(vol.filesystem, mapper_dev, target)


def bind_volume(prepared: PreparedVolume, rootfs: Path, target: str, *, read_only: bool) -> Path:
    """MOUNTED -> BOUND for one container: bind the volume at `target` inside `rootfs`."""
    return mount.bind_into_rootfs(
        prepared.guest_path, rootfs, target, device=prepared.device, read_only=read_only
    )


def release_volume(
    vol: VolumeSpec,
    *,
    disk: Path,
    mount_base: Path,
    runtime_dir: Path | None = None,
    binds: Iterable[tuple[Path, str]] = (),
) -> None:
    """BOUND/MOUNTED/OPEN -> READY: unbind, unmount, close the mapping, deactivate the LV."""
    lock = (
        _volume_lock(runtime_dir, vol.name) if runtime_dir is not None else contextlib.nullcontext()
    )
    with lock:
        target = mount_base / vol.name
        if target.is_dir():
            for rootfs, in_container in binds:
                with contextlib.suppress(mount.MountError, FileNotFoundError):
                    mount.unbind_from_rootfs(target, rootfs, in_container)
        mount.unmount(target)
        _deactivate(mapper_name(vol.name))
        if runtime_dir is not None:
            mapping_record.drop(runtime_dir, vol.name)
        if vol.lvm is not None:
            lvm.deactivate_lv(str(disk.resolve()), vol.lvm.vg, vol.lvm.lv)
