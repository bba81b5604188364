"""Secret bytes that can be wiped, and never print themselves.

Keys, passphrases and KBS resources live in a `Secret` (a `bytearray` underneath) and are wiped
when the `with` block ends. `repr`/`str` show only the length, so a secret that reaches a log
line or an exception by accident still does not leak. Python may have made copies elsewhere
(e.g. inside a library): keep the window short and never convert a secret to `str` or `bytes`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrite a mutable buffer with zeros in place."""
    view = memoryview(buf).cast("B")
    n = len(view)
    if n:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        ctypes.memset(addr, 0, n)


class Secret:
    """A wipeable secret byte string.

    Use as a context manager, or call `wipe()`; after wiping, `data` is empty.
    """

    __slots__ = ("_buf",)

    def __init__(self, data: bytes | bytearray | memoryview | int) -> None:
        if isinstance(data, int):
            self._buf = bytearray(data)
        else:
            self._buf = bytearray(data)
            if isinstance(data, bytearray):
                wipe(data)  # the caller's buffer is consumed, not copied and left behind

    @classmethod
    def take(cls, buf: bytearray) -> Secret:
        """Adopt `buf` without copying (the Secret now owns and will wipe it)."""
        s = cls(0)
        s._buf = buf
        return s

    @property
    def data(self) -> bytearray:
        """The live buffer. Do not keep references past the Secret's lifetime."""
        return self._buf

    def view(self) -> memoryview:
        return memoryview(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def __bool__(self) -> bool:
        return bool(self._buf)

    def equals(self, other: bytes | bytearray | Secret) -> bool:
        """Constant-time comparison."""
        o = other.data if isinstance(other, Secret) else other
        return hmac.compare_digest(bytes(self._buf), bytes(o))

    def wipe(self) -> None:
        wipe(self._buf)
        del self._buf[:]

    def __enter__(self) -> Secret:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"<Secret {len(self._buf)} bytes>"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")

    def __del__(self) -> None:
        # at interpreter shutdown ctypes may already be gone: nothing left to do then
        with contextlib.suppress(Exception):
            wipe(self._buf)


@contextmanager
def wiping(buf: bytearray) -> Iterator[bytearray]:
    """Yield `buf` and wipe it afterwards, whatever happens."""
    try:
        yield buf
    finally:
        wipe(buf)
