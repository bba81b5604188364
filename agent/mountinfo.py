"""Reading the guest's own mount table (`/proc/self/mountinfo`, trusted: the guest kernel's)."""

from __future__ import annotations

from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_source(mountinfo: str, mountpoint: Path) -> str | None:
    """The source device of the topmost mount at `mountpoint` in a mountinfo text, if any."""
    found: str | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        if _unescape(fields[4]) == str(mountpoint):
            parts = right.split()
            found = _unescape(parts[1]) if len(parts) >= 2 else ""
    return found
