"""The errors the KBS client raises: one line each, naming the cause and the next step.

The classes let a caller (the daemon, the CLI, a test) tell *why* a key could not be fetched
without parsing messages: the KBS's policy said no, the KBS refused our evidence, the resource
does not exist, the two sides speak different protocol versions, the KBS answered something that
is not Trustee's protocol, or it could not be reached before the deadline. No message ever holds
resource bytes; KBS-supplied text is cut short and stripped of control characters first.
"""

from __future__ import annotations

from agent.errors import CvaError


class KbsError(CvaError):
    """Any failure to get a resource from the KBS."""


class PolicyDenied(KbsError):
    """The KBS's resource policy refused this resource to this (attested) TEE."""


class AttestationFailed(KbsError):
    """The KBS refused the handshake or the evidence (RCAR auth/attest), or our token twice."""


class ResourceNotFound(KbsError):
    """The KBS has no such resource / plugin, or its plugin failed to produce it."""


class ProtocolMismatch(KbsError):
    """The KBS speaks another KBS protocol version than 0.4.0."""


class KbsProtocolError(KbsError):
    """The KBS answered something that is not Trustee's protocol (hostile or broken peer)."""


class JweError(KbsProtocolError):
    """The resource's JWE is malformed, uses a refused algorithm, or fails its integrity check."""


class KbsUnavailable(KbsError):
    """The KBS could not be reached or kept failing transiently until the deadline."""


class KbsTlsError(KbsError):
    """The KBS's TLS certificate does not verify against the pinned CA (or TLS failed)."""


def clean_text(text: str, limit: int = 200) -> str:
    """Peer-supplied text made safe for a one-line message: printable, short."""
    out = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return out if len(out) <= limit else out[:limit] + "…"
