"""A typed ctypes binding to the system's libcryptsetup (Debian's libcryptsetup12).

Only the calls cva needs, with the layouts of libcryptsetup 2.6's public header. Rules:

- libcryptsetup is not thread-safe: every call runs under one process-wide lock (`_LOCK`).
- Keys and passphrases go in as ctypes arrays made with `from_buffer` over a `Secret`'s own
  bytearray: no `bytes`/`str` copy is ever made on the Python side. The caller's `Secret` stays
  the owner and wipes it; this module never keeps a reference after the call.
- Errors become `CryptError` carrying the negative errno and libcryptsetup's own last log line
  (captured through `crypt_set_log_callback`); a wrong passphrase (-EPERM, which libcryptsetup
  does not log) becomes `WrongPassphrase`. Messages never contain key material.
- Reading can write (DESIGN §7): `load()` lets libcryptsetup "repair" a header copy it deems
  stale. Never call it on an on-disk header cva has not validated itself; the open path loads a
  validated in-memory copy (`header_copy()` here, passed as `CryptDevice.open(..., header=...)`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Final

from luks.errors import StorageError
from luks.secret import Secret

LIBRARY_NAME: Final = "libcryptsetup.so.12"

# --- the on-disk profile cva formats with (DESIGN §5) -------------------------------------
CIPHER: Final = "aes"
CIPHER_MODE: Final = "xts-plain64"
VOLUME_KEY_BYTES: Final = 64  # aes-xts-plain64 with a 512-bit key
INTEGRITY_ALGORITHM: Final = "hmac(sha256)"
INTEGRITY_KEY_BYTES: Final = 32  # libcryptsetup appends the hmac key to the volume key
METADATA_BYTES: Final = 16 * 1024  # per binary header + JSON copy
KEYSLOTS_BYTES: Final = 16352 * 1024
DATA_OFFSET_BYTES: Final = 16 * 1024 * 1024  # = 2 * METADATA_BYTES + KEYSLOTS_BYTES
# A detached header of an ephemeral volume never gets a keyslot (the volume key goes straight
# from libcryptsetup to the kernel), so its keyslots area is kept small: it lives in tmpfs.
DETACHED_KEYSLOTS_BYTES: Final = 64 * 1024
DETACHED_HEADER_BYTES: Final = 2 * METADATA_BYTES + DETACHED_KEYSLOTS_BYTES
SECTOR_SIZE: Final = 4096
PBKDF_TYPE: Final = "pbkdf2"
PBKDF_HASH: Final = "sha256"
PBKDF_ITERATIONS: Final = 1000  # the minimum libcryptsetup accepts for pbkdf2

# --- constants from libcryptsetup.h -------------------------------------------------------
CRYPT_LUKS2: Final = b"LUKS2"
CRYPT_ANY_SLOT: Final = -1
CRYPT_ANY_TOKEN: Final = -1
CRYPT_PBKDF_NO_BENCHMARK: Final = 1 << 1
CRYPT_ACTIVATE_READONLY: Final = 1 << 0
CRYPT_ACTIVATE_PRIVATE: Final = 1 << 4  # udev does not scan the new device (no blkid probe)
CRYPT_ACTIVATE_KEYRING_KEY: Final = 1 << 11
CRYPT_ACTIVATE_NO_JOURNAL: Final = 1 << 12  # dm-integrity: direct writes, no journal
CRYPT_ACTIVATE_NO_READ_WORKQUEUE: Final = 1 << 24
CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE: Final = 1 << 25
CRYPT_DEACTIVATE_DEFERRED: Final = 1 << 0
CRYPT_LOG_NORMAL: Final = 0
CRYPT_LOG_ERROR: Final = 1
CRYPT_DEBUG_NONE: Final = 0
_STATUS_NAMES: Final = {0: "invalid", 1: "inactive", 2: "active", 3: "busy"}

_MAX_LOG_LINE = 300


class CryptError(StorageError):
    """A libcryptsetup call failed; `errno` is the positive errno value."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class WrongPassphrase(CryptError):
    """The passphrase does not open the keyslot (libcryptsetup returned -EPERM)."""


class _PbkdfType(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_char_p),
        ("hash", ctypes.c_char_p),
        ("time_ms", ctypes.c_uint32),
        ("iterations", ctypes.c_uint32),
        ("max_memory_kb", ctypes.c_uint32),
        ("parallel_threads", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    )


class _ParamsLuks2(ctypes.Structure):
    _fields_ = (
        ("pbkdf", ctypes.POINTER(_PbkdfType)),
        ("integrity", ctypes.c_char_p),
        ("integrity_params", ctypes.c_void_p),
        ("data_alignment", ctypes.c_size_t),
        ("data_device", ctypes.c_char_p),
        ("sector_size", ctypes.c_uint32),
        ("label", ctypes.c_char_p),
        ("subsystem", ctypes.c_char_p),
    )


_LogFunc = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

# One lock for every call into the library (it is not thread-safe), re-entrant so a method can
# call another. The log lines the callback collects belong to the call holding the lock.
_LOCK = threading.RLock()
_log_lines: list[tuple[int, str]] = []
_lib: ctypes.CDLL | None = None


def _sanitize(text: str) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(text.split())[:_MAX_LOG_LINE]


def _on_log(level: int, msg: bytes | None, _usrptr: int | None) -> None:
    if msg is None:
        return
    line = _sanitize(msg.decode("utf-8", errors="replace"))
    if line:
        del _log_lines[:-20]
        _log_lines.append((level, line))


_LOG_CALLBACK = _LogFunc(_on_log)  # kept alive for the process' lifetime


def _c(func: str, restype: object, *argtypes: object) -> None:
    assert _lib is not None
    f = getattr(_lib, func)
    f.restype = restype
    f.argtypes = list(argtypes)


def _profile_pbkdf() -> _PbkdfType:
    """cva's PBKDF profile: PBKDF_TYPE/PBKDF_HASH, fixed PBKDF_ITERATIONS, no benchmark."""
    return _PbkdfType(
        type=PBKDF_TYPE.encode(),
        hash=PBKDF_HASH.encode(),
        time_ms=0,
        iterations=PBKDF_ITERATIONS,
        max_memory_kb=0,
        parallel_threads=0,
        flags=CRYPT_PBKDF_NO_BENCHMARK,
    )


def _library() -> ctypes.CDLL:
    """Load libcryptsetup once, declare the prototypes, route its log lines to us."""
    global _lib  # noqa: PLW0603 - the library is loaded once per process
    with _LOCK:
        if _lib is not None:
            return _lib
        try:
            _lib = ctypes.CDLL(LIBRARY_NAME, use_errno=True)
        except OSError:
            raise CryptError(
                f"{LIBRARY_NAME} not found; install Debian's libcryptsetup12", errno_mod.ENOENT
            ) from None
        vp, cp, i, u32, u64, sz = (
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_uint32,
            ctypes.c_uint64,
            ctypes.c_size_t,
        )
        pp = ctypes.POINTER(ctypes.c_void_p)
        ccp = ctypes.POINTER(ctypes.c_char_p)
        _c("crypt_init", i, pp, cp)
        _c("crypt_init_data_device", i, pp, cp, cp)
        _c("crypt_free", None, vp)
        _c("crypt_set_log_callback", None, vp, _LogFunc, vp)
        _c("crypt_set_debug_level", None, i)
        _c("crypt_set_pbkdf_type", i, vp, ctypes.POINTER(_PbkdfType))
        _c("crypt_set_metadata_size", i, vp, u64, u64)
        _c("crypt_set_data_offset", i, vp, u64)
        _c("crypt_format", i, vp, cp, cp, cp, cp, vp, sz, vp)
        _c("crypt_load", i, vp, cp, vp)
        _c("crypt_keyslot_add_by_volume_key", i, vp, i, vp, sz, vp, sz)
        _c("crypt_keyslot_add_by_passphrase", i, vp, i, vp, sz, vp, sz)
        _c("crypt_keyslot_destroy", i, vp, i)
        _c("crypt_activate_by_passphrase", i, vp, cp, i, vp, sz, u32)
        _c("crypt_activate_by_volume_key", i, vp, cp, vp, sz, u32)
        _c("crypt_deactivate_by_name", i, vp, cp, u32)
        _c("crypt_status", i, vp, cp)
        _c("crypt_token_json_get", i, vp, i, ccp)
        _c("crypt_token_json_set", i, vp, i, cp)
        _c("crypt_resize", i, vp, cp, u64)
        _c("crypt_get_uuid", cp, vp)
        _c("crypt_get_type", cp, vp)
        _c("crypt_dump_json", i, vp, ccp, u32)
        _c("crypt_metadata_locking", i, vp, i)
        _lib.crypt_set_debug_level(CRYPT_DEBUG_NONE)
        _lib.crypt_set_log_callback(None, _LOG_CALLBACK, None)
        return _lib


def _error(call: str, rc: int, what: str) -> CryptError:
    err = -rc if rc < 0 else errno_mod.EINVAL
    errors = [line for level, line in _log_lines if level == CRYPT_LOG_ERROR]
    detail = errors[-1] if errors else (_log_lines[-1][1] if _log_lines else "")
    name = errno_mod.errorcode.get(err, str(err))
    msg = f"{what}: libcryptsetup {call} failed ({name})"
    if detail:
        msg += f": {detail}"
    cls = WrongPassphrase if err == errno_mod.EPERM and "passphrase" in call else CryptError
    if cls is WrongPassphrase:
        msg = f"{what}: wrong passphrase: it opens no keyslot of this header; nothing was changed"
    return cls(msg, err)


def _encode(text: str) -> bytes:
    if "\x00" in text:
        raise CryptError(f"NUL byte in argument {text!r}", errno_mod.EINVAL)
    return text.encode("utf-8")


@contextmanager
def _key_buffer(secret: Secret | None, what: str) -> Iterator[ctypes.Array[ctypes.c_char] | None]:
    """A ctypes view over the Secret's own bytearray (no copy); released after the call."""
    if secret is None:
        yield None
        return
    if not len(secret):
        raise CryptError(f"empty {what}", errno_mod.EINVAL)
    arr: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * len(secret)).from_buffer(secret.data)
    try:
        yield arr
    finally:
        # drop the buffer export so the Secret can be wiped (a live export pins the bytearray)
        arr = None
        del arr


class CryptDevice:
    """One libcryptsetup context (`struct crypt_device *`). Use as a context manager."""

    def __init__(self, handle: int, device: str, header: str | None) -> None:
        self._handle: int | None = handle
        self.device = device
        self.header = header

    # --- life cycle -----------------------------------------------------------------------
    @classmethod
    def open(cls, device: str, *, header: str | None = None) -> CryptDevice:
        """Initialise a context on `device` (data device); `header` = detached header path.

        Touches nothing on disk: `load()` or `format_luks2()` come next.
        """
        lib = _library()
        handle = ctypes.c_void_p()
        with _LOCK:
            _log_lines.clear()
            if header is None:
                rc = lib.crypt_init(ctypes.byref(handle), _encode(device))
                call = "crypt_init"
            else:
                rc = lib.crypt_init_data_device(
                    ctypes.byref(handle), _encode(header), _encode(device)
                )
                call = "crypt_init_data_device"
            if rc < 0 or not handle.value:
                raise _error(call, rc, device)
            return cls(handle.value, device, header)

    def close(self) -> None:
        with _LOCK:
            if self._handle is not None:
                _library().crypt_free(self._handle)
                self._handle = None

    def __enter__(self) -> CryptDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # at interpreter shutdown ctypes may already be gone: nothing left to free then
        with contextlib.suppress(Exception):
            self.close()

    def _cd(self) -> int:
        if self._handle is None:
            raise CryptError(f"{self.device}: crypt device context already closed", errno_mod.EBADF)
        return self._handle

    def _set_profile_pbkdf(self, lib: ctypes.CDLL, cd: int) -> None:
        """Set cva's PBKDF profile on context `cd` (caller holds _LOCK)."""
        pbkdf = _profile_pbkdf()
        self._check("crypt_set_pbkdf_type", lib.crypt_set_pbkdf_type(cd, ctypes.byref(pbkdf)))

    def _check(self, call: str, rc: int) -> int:
        if rc < 0:
            raise _error(call, rc, self.device)
        return rc

    # --- format / load --------------------------------------------------------------------
    def format_luks2(
        self, *, integrity: bool, volume_key: Secret | None = None, detached: bool = False
    ) -> None:
        """Write a fresh LUKS2 header with cva's profile (DESIGN §5); no keyslot yet.

        `volume_key` None = libcryptsetup makes a random one (kept in this context for
        `keyslot_add_by_volume_key` / `activate_by_volume_key`). With `integrity` the volume
        key is 64 + 32 bytes (the hmac(sha256) key is appended) and libcryptsetup writes the
        dm-integrity superblock, which needs device-mapper.

        `detached` (a context opened with `header=`): the data segment starts at offset 0 of
        the data device and the keyslots area is DETACHED_KEYSLOTS_BYTES (ephemeral volumes).
        """
        if detached and self.header is None:
            raise CryptError(
                f"{self.device}: a detached format needs a context opened with a header file",
                errno_mod.EINVAL,
            )
        lib = _library()
        key_bytes = VOLUME_KEY_BYTES + (INTEGRITY_KEY_BYTES if integrity else 0)
        if volume_key is not None and len(volume_key) != key_bytes:
            raise CryptError(
                f"{self.device}: volume key must be {key_bytes} bytes, got {len(volume_key)}",
                errno_mod.EINVAL,
            )
        pbkdf = _profile_pbkdf()
        params = _ParamsLuks2(
            pbkdf=ctypes.pointer(pbkdf),
            integrity=INTEGRITY_ALGORITHM.encode() if integrity else None,
            integrity_params=None,
            data_alignment=0,
            data_device=None,
            sector_size=SECTOR_SIZE,
            label=None,
            subsystem=None,
        )
        with _LOCK:
            _log_lines.clear()
            cd = self._cd()
            # the PBKDF must be set before crypt_format, or format benchmarks (DEPENDENCIES.md)
            self._check("crypt_set_pbkdf_type", lib.crypt_set_pbkdf_type(cd, ctypes.byref(pbkdf)))
            keyslots = DETACHED_KEYSLOTS_BYTES if detached else KEYSLOTS_BYTES
            self._check(
                "crypt_set_metadata_size",
                lib.crypt_set_metadata_size(cd, METADATA_BYTES, keyslots),
            )
            # a detached header keeps libcryptsetup's default data offset there: 0
            if not detached:
                self._check(
                    "crypt_set_data_offset",
                    lib.crypt_set_data_offset(cd, DATA_OFFSET_BYTES // 512),
                )
            with _key_buffer(volume_key, "volume key") as vk:
                rc = lib.crypt_format(
                    cd,
                    CRYPT_LUKS2,
                    CIPHER.encode(),
                    CIPHER_MODE.encode(),
                    None,
                    vk,
                    key_bytes,
                    ctypes.byref(params),
                )
                del vk
            self._check("crypt_format", rc)

    def load(self) -> None:
        """Load the LUKS2 header (of the detached `header` when given). See the module note."""
        lib = _library()
        with _LOCK:
            _log_lines.clear()
            self._check("crypt_load", lib.crypt_load(self._cd(), CRYPT_LUKS2, None))

    # --- keyslots / activation ------------------------------------------------------------
    def keyslot_add_by_volume_key(
        self, passphrase: Secret, *, keyslot: int = 0, volume_key: Secret | None = None
    ) -> int:
        """Add a keyslot (PBKDF2 as set by `format_luks2`) for `passphrase`; returns its number.

        `volume_key` None = the key made by `format_luks2` in this same context.
        """
        lib = _library()
        with _LOCK:
            _log_lines.clear()
            cd = self._cd()
            # a loaded (not freshly formatted) context needs the profile's PBKDF again
            self._set_profile_pbkdf(lib, cd)
            with (
                _key_buffer(volume_key, "volume key") as vk,
                _key_buffer(passphrase, "passphrase") as pw,
            ):
                rc = lib.crypt_keyslot_add_by_volume_key(
                    cd,
                    keyslot,
                    vk,
                    len(volume_key) if volume_key is not None else 0,
                    pw,
                    len(passphrase),
                )
                del vk, pw
            return self._check("crypt_keyslot_add_by_volume_key", rc)

    def keyslot_add_by_passphrase(self, old: Secret, new: Secret, *, keyslot: int) -> int:
        """Add keyslot `keyslot` for passphrase `new`, unlocking the volume key with `old`
        (PBKDF2 as cva's profile); returns its number. Raises WrongPassphrase when `old` opens
        no keyslot."""
        lib = _library()
        with _LOCK:
            _log_lines.clear()
            cd = self._cd()
            self._set_profile_pbkdf(lib, cd)
            with (
                _key_buffer(old, "passphrase") as old_pw,
                _key_buffer(new, "passphrase") as new_pw,
            ):
                rc = lib.crypt_keyslot_add_by_passphrase(
                    cd, keyslot, old_pw, len(old), new_pw, len(new)
                )
                del old_pw, new_pw
            return self._check("crypt_keyslot_add_by_passphrase", rc)

    def keyslot_destroy(self, keyslot: int) -> None:
        """Remove keyslot `keyslot` and wipe its key material area."""
        lib = _library()
        with _LOCK:
            _log_lines.clear()
            self._check("crypt_keyslot_destroy", lib.crypt_keyslot_destroy(self._cd(), keyslot))

    def activate_by_passphrase(
        self,
        name: str | None,
        passphrase: Secret,
        *,
        read_only: bool = False,
        keyslot: int = CRYPT_ANY_SLOT,
        keyring: bool = False,
        private: bool = False,
    ) -> int:
        """Activate `/dev/mapper/<name>` (no_read/no_write_workqueue); `name=None` only checks
        the passphrase. Returns the keyslot that opened. Raises WrongPassphrase on -EPERM.
        `keyslot` defaults to any slot (the allow-list admits one, or two during a rotation).

        `keyring=True` with `name=None` loads the volume key into the kernel keyring for a later
        `resize` of a device whose key lives there. `private=True`: udev's rules do not probe
        the new device (a fresh integrity mapping reads as EIO, logged as AEAD errors, until
        written).
        """
        lib = _library()
        flags = CRYPT_ACTIVATE_NO_READ_WORKQUEUE | CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE
        if read_only:
            flags |= CRYPT_ACTIVATE_READONLY
        if private:
            flags |= CRYPT_ACTIVATE_PRIVATE
        if keyring:
            flags |= CRYPT_ACTIVATE_KEYRING_KEY
        c_name = _encode(name) if name is not None else None
        with _LOCK:
            _log_lines.clear()
            cd = self._cd()
            with _key_buffer(passphrase, "passphrase") as pw:
                rc = lib.crypt_activate_by_passphrase(
                    cd, c_name, keyslot, pw, len(passphrase), flags
                )
                del pw
            return self._check("crypt_activate_by_passphrase", rc)

    def activate_by_volume_key(
        self,
        name: str,
        *,
        read_only: bool = False,
        no_journal: bool = False,
        private: bool = False,
    ) -> None:
        """Activate `/dev/mapper/<name>` with the volume key this context made at format time.

        For ephemeral volumes: the random key goes from libcryptsetup's memory to the kernel
        (dm-crypt table) and nowhere else; `crypt_free` wipes libcryptsetup's copy. The key is
        checked against the header's digest first. `no_journal`: dm-integrity direct writes.
        `private`: as for `activate_by_passphrase` (no udev probe of a fresh integrity mapping).
        """
        lib = _library()
        flags = CRYPT_ACTIVATE_NO_READ_WORKQUEUE | CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE
        if read_only:
            flags |= CRYPT_ACTIVATE_READONLY
        if no_journal:
            flags |= CRYPT_ACTIVATE_NO_JOURNAL
        if private:
            flags |= CRYPT_ACTIVATE_PRIVATE
        with _LOCK:
            _log_lines.clear()
            rc = lib.crypt_activate_by_volume_key(self._cd(), _encode(name), None, 0, flags)
            self._check("crypt_activate_by_volume_key", rc)

    def deactivate(self, name: str) -> None:
        lib = _library()
        with _LOCK:
            _log_lines.clear()
            self._check(
                "crypt_deactivate_by_name",
                lib.crypt_deactivate_by_name(self._cd(), _encode(name), 0),
            )

    def resize(self, name: str, size_sectors: int = 0) -> None:
        """Resize the active mapping to `size_sectors` (512-byte units), 0 = the whole device.

        If the volume key lives in the kernel keyring, first call
        `activate_by_passphrase(None, passphrase, keyring=True)` on this context.
        """
        lib = _library()
        with _LOCK:
            _log_lines.clear()
            self._check("crypt_resize", lib.crypt_resize(self._cd(), _encode(name), size_sectors))

    # --- tokens / metadata ----------------------------------------------------------------
    def token_json_get(self, token: int) -> str | None:
        """The token's JSON text, or None when that token id is empty."""
        lib = _library()
        out = ctypes.c_char_p()
        with _LOCK:
            _log_lines.clear()
            rc = lib.crypt_token_json_get(self._cd(), token, ctypes.byref(out))
            if rc in (-errno_mod.EINVAL, -errno_mod.ENOENT) and out.value is None:
                return None
            self._check("crypt_token_json_get", rc)
            return out.value.decode("utf-8") if out.value is not None else None

    def token_json_set(self, token: int, json_text: str | None) -> int:
        """Store (or with None, remove) a token; returns its id. Writes both header copies."""
        lib = _library()
        with _LOCK:
            _log_lines.clear()
            rc = lib.crypt_token_json_set(
                self._cd(), token, _encode(json_text) if json_text is not None else None
            )
            return self._check("crypt_token_json_set", rc)

    @property
    def uuid(self) -> str:
        with _LOCK:
            raw = _library().crypt_get_uuid(self._cd())
        if not raw:
            raise CryptError(f"{self.device}: no LUKS header loaded (no UUID)", errno_mod.EINVAL)
        return str(raw.decode("ascii"))

    @property
    def type(self) -> str | None:
        with _LOCK:
            raw = _library().crypt_get_type(self._cd())
        return raw.decode("ascii") if raw else None

    def dump_json(self) -> str:
        """libcryptsetup's JSON dump of the loaded LUKS2 metadata."""
        lib = _library()
        out = ctypes.c_char_p()
        with _LOCK:
            _log_lines.clear()
            self._check("crypt_dump_json", lib.crypt_dump_json(self._cd(), ctypes.byref(out), 0))
            if out.value is None:
                raise CryptError(f"{self.device}: crypt_dump_json returned nothing", errno_mod.EIO)
            return out.value.decode("utf-8")


class StatusQueryFailed(CryptError):
    """libcryptsetup could not tell whether a mapping exists (no device-mapper, no permission):
    not the same as "the mapping exists", and never reported as such."""


def active_status(name: str) -> str:
    """ "inactive" | "active" | "busy" for `/dev/mapper/<name>`.

    libcryptsetup answers CRYPT_INVALID when its device-mapper query itself fails (no
    device-mapper in the kernel, no /dev/mapper/control, no permission): that raises
    `StatusQueryFailed`, so no caller can mistake a failed query for an existing mapping.
    """
    lib = _library()
    with _LOCK:
        _log_lines.clear()
        rc = lib.crypt_status(None, _encode(name))
        state = _STATUS_NAMES.get(rc, "invalid")
        if state == "invalid":
            detail = _log_lines[-1][1] if _log_lines else ""
            raise StatusQueryFailed(
                f"cannot query device-mapper for {name} (libcryptsetup crypt_status failed"
                + (f": {detail}" if detail else "")
                + "); is device-mapper available in this kernel (dm_mod, /dev/mapper/control)?",
                errno_mod.ENODEV,
            )
    return state


def deactivate_by_name(name: str, *, deferred: bool = False) -> None:
    """Remove `/dev/mapper/<name>` without a header context."""
    lib = _library()
    with _LOCK:
        _log_lines.clear()
        rc = lib.crypt_deactivate_by_name(
            None, _encode(name), CRYPT_DEACTIVATE_DEFERRED if deferred else 0
        )
        if rc < 0:
            raise _error("crypt_deactivate_by_name", rc, name)


def disable_metadata_locking() -> None:
    """Turn off libcryptsetup's file-based metadata locks for this process (global, one way).

    Useful when every header cva hands the library is its own private in-memory copy.
    """
    lib = _library()
    with _LOCK:
        _log_lines.clear()
        rc = lib.crypt_metadata_locking(None, 0)
        if rc < 0:
            raise _error("crypt_metadata_locking", rc, "libcryptsetup")


_ZERO_BLOCK = bytes(64 * 1024)  # header_copy's unit: an all-zero block is not written


@contextmanager
def header_copy(
    area: bytes | bytearray | memoryview, name: str = "cva-luks-header"
) -> Iterator[str]:
    """Put a (validated) header area in an anonymous memfd; yield a path libcryptsetup can open.

    The memfd lives in guest memory only and is freed when the block ends. Whatever the
    library writes goes to this copy, never to the disk.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(area).cast("B")
        os.ftruncate(fd, len(view))
        for at in range(0, len(view), len(_ZERO_BLOCK)):
            block = view[at : at + len(_ZERO_BLOCK)]
            if not _ZERO_BLOCK.startswith(block):  # zero blocks stay holes: they read as zeros
                done = 0
                while done < len(block):
                    done += os.pwrite(fd, block[done:], at + done)
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)
