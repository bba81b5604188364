"""The `sample` TEE: no hardware, no security. The daemon uses it only when the image config
says `[evidence] tee = "sample"` and `allow_sample = true` and no TDX/SNP device is present
(evidence.detect.decide_tee); the operator CLIs only when named (`--tee sample`).

Evidence is `{"svn": "1", "report_data": base64(report_data)}` with the exact bytes it is given
(Trustee's sample verifier compares them byte for byte, SPEC §c.1).
"""

from __future__ import annotations

import base64

from evidence.base import JSON
from evidence.errors import EvidenceError

MAX_REPORT_DATA = 64


class SampleAttester:
    """Emits sample evidence; has no initdata register."""

    @property
    def tee(self) -> str:
        return "sample"

    def evidence(self, report_data: bytes) -> JSON:
        if len(report_data) > MAX_REPORT_DATA:
            raise EvidenceError(
                f"report data is {len(report_data)} bytes; at most {MAX_REPORT_DATA} are allowed"
            )
        return {"svn": "1", "report_data": base64.b64encode(bytes(report_data)).decode("ascii")}

    def initdata_binding(self) -> bytes | None:
        return None
