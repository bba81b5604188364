"""`[measure]` in the image config: defaults, the register rules, strictness."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AA_SOCKET, ConfigError, parse_config


def test_defaults() -> None:
    c = parse_config("")
    assert c.measure.sink == "auto" and c.measure.required is True and c.measure.pcr is None
    assert c.measure.aa_socket == AA_SOCKET
    assert c.measure_log == Path("/run/cva/eventlog")
    assert parse_config('[paths]\nstate_dir = "/run/x"\n').measure_log == Path("/run/x/eventlog")


def test_values() -> None:
    c = parse_config(
        '[measure]\nsink = "tpm"\npcr = 16\nrequired = false\nlog = "/run/m/log"\n'
        'aa_socket = "/run/aa.sock"\ntcti = "swtpm:port=2321"\n'
    )
    m = c.measure
    assert (m.sink, m.pcr, m.required, m.tcti) == ("tpm", 16, False, "swtpm:port=2321")
    assert c.measure_log == Path("/run/m/log") and m.aa_socket == Path("/run/aa.sock")
    assert parse_config('[measure]\nsink = "aa"\npcr = 17\n').measure.pcr == 17
    assert parse_config('[measure]\nsink = "rtmr"\npcr = 17\n').measure.pcr == 17
    assert parse_config('[measure]\nsink = "rtmr"\n').measure.sink == "rtmr"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('sink = "tdx"', "measure.sink"),
        ('sink = "rtmr"\npcr = 15', "16..23"),
        ('sink = "rtmr"\npcr = 0', "16..23"),
        ("pcr = 8", "9..16 or 23"),
        ("pcr = 17", "9..16 or 23"),
        ('sink = "tpm"\npcr = 0', "9..16 or 23"),
        ("pcr = 24", "0..23"),
        ("pcr = true", "0..23"),
        ('required = "yes"', "measure.required"),
        ('log = "rel/path"', "measure.log"),
        ('tcti = ""', "measure.tcti"),
        ("extra = 1", "unknown key measure.extra"),
    ],
)
def test_refusals(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(f"[measure]\n{text}\n")
