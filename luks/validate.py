"""DESIGN §6 steps 2-3 in one pure call: parse the in-memory header copy, apply the allow-list,
verify the `cva` token's MAC. The caller then activates from that same copy:

    area = read_header_area(disk)                      # step 1: the copy (immutable bytes)
    checked = validate_header_copy(area, volume_name=v.name, mac_key=mac_key,
                                   integrity=v.integrity)          # steps 2-3
    with header_copy(checked.area) as hdr_path, CryptDevice.open(disk, header=hdr_path) as cd:
        cd.load()
        cd.activate_by_passphrase(mapper_name, passphrase)        # from the copy, never the disk
    # step 4 (storage): read the live dm table back and compare it with the contract
"""

from __future__ import annotations

from dataclasses import dataclass

from luks.errors import StorageInputError
from luks.header import HeaderError, LuksHeader, allow_list_reasons, parse_luks2
from luks.secret import Secret
from luks.token import verify_token

_MAX_LISTED = 4


class HeaderRefused(StorageInputError):
    """The header is not exactly cva's profile; `reasons` lists every rule it breaks."""

    def __init__(self, volume_name: str, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        shown = "; ".join(reasons[:_MAX_LISTED])
        more = f" (+{len(reasons) - _MAX_LISTED} more)" if len(reasons) > _MAX_LISTED else ""
        super().__init__(
            f"volume {volume_name!r}: LUKS2 header refused: {shown}{more}; run "
            "`cva luks inspect` on the disk for the full list"
        )


@dataclass(frozen=True)
class ValidatedHeader:
    area: bytes  # the exact bytes that were checked: activate from these
    header: LuksHeader
    state: str  # the token state: "initializing" | "ready"


def validate_header_copy(
    area: bytes, *, volume_name: str, mac_key: Secret, integrity: bool
) -> ValidatedHeader:
    """Parse + allow-list + MAC check of an in-memory header area; raise on any doubt.

    Raises HeaderRefused (every allow-list reason, or why the header is unreadable) or
    luks.token.TokenError (no/malformed/foreign token, MAC mismatch).
    """
    if not isinstance(area, bytes):
        raise TypeError("area must be immutable bytes (the copy must not change after checks)")
    try:
        hdr = parse_luks2(area)
    except HeaderError as exc:
        raise HeaderRefused(volume_name, [f"header: {exc.message}"]) from None
    reasons = allow_list_reasons(hdr, integrity=integrity)
    if reasons:
        raise HeaderRefused(volume_name, reasons)
    state = verify_token(hdr, volume_name, mac_key)
    return ValidatedHeader(area=area, header=hdr, state=state)
