"""`cva evidence events LOG`: logs built here with struct.pack and hashlib (not cva's encoder),
SHA-256 and SHA-384 entries of several domains, register checks, starting values, malformed
logs with their byte offset."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from tests.conftest import run_cva

ALGS = {"sha256": 0x0B, "sha384": 0x0C}


def _entry(register: int, alg: str, text: str) -> bytes:
    raw = text.encode()
    data = struct.pack("<II", 0x4141454C, len(raw)) + raw
    digest = hashlib.new(alg, data).digest()
    return (
        struct.pack("<IIIH", register, 6, 1, ALGS[alg])
        + digest
        + struct.pack("<I", len(data))
        + data
    )


def _replay(start: bytes, alg: str, texts: list[str]) -> bytes:
    value = start
    for text in texts:
        raw = text.encode()
        data = struct.pack("<II", 0x4141454C, len(raw)) + raw
        value = hashlib.new(alg, value + hashlib.new(alg, data).digest()).digest()
    return value


AA_TEXTS = [
    "github.com/confidential-containers attestation-agent-init {}",
    "kata-agent PullImage x y",
]
CVA_TEXTS = [
    f'cva volume-open {{"fs":"ext4","header-sha256":"{"ab" * 32}","name":"pg","ro":false,'
    '"seq":3,"uuid":"6b1f8c1e-7d4a-4a55-9d0f-2c3e4b5a6d7e","v":1}'
]


def _log(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    log = tmp_path / "eventlog"
    log.write_bytes(
        _entry(4, "sha384", AA_TEXTS[0])
        + _entry(23, "sha256", CVA_TEXTS[0])
        + _entry(4, "sha384", AA_TEXTS[1])
    )
    return log, _replay(bytes(48), "sha384", AA_TEXTS), _replay(bytes(32), "sha256", CVA_TEXTS)


def test_verifies_every_register(tmp_path: Path) -> None:
    log, r4, r23 = _log(tmp_path)
    proc = run_cva(
        "evidence",
        "events",
        str(log),
        "--register",
        f"4={r4.hex()}",
        "--register",
        f"23={r23.hex()}",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(proc.stdout)
    assert doc["verified"] is True
    assert doc["registers"] == {"4": r4.hex(), "23": r23.hex()}
    assert [(e["register"], e["domain"], e["operation"]) for e in doc["events"]] == [
        (4, "github.com/confidential-containers", "attestation-agent-init"),
        (23, "cva", "volume-open"),
        (4, "kata-agent", "PullImage"),
    ]
    assert doc["events"][1]["content"] == CVA_TEXTS[0].split(" ", 2)[2]
    assert set(doc["events"][0]) == {"register", "domain", "operation", "content", "digest"}


def test_mismatch_or_unchecked_or_nothing_claimed_is_exit_1(tmp_path: Path) -> None:
    log, r4, _r23 = _log(tmp_path)
    wrong = run_cva(
        "evidence",
        "events",
        str(log),
        "--register",
        f"4={r4.hex()}",
        "--register",
        f"23={'00' * 32}",
    )
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["verified"] is False
    assert "mismatch: 23" in wrong.stderr.decode()
    partial = run_cva("evidence", "events", str(log), "--register", f"4={r4.hex()}")
    assert partial.returncode == 1 and "not checked: 23" in partial.stderr.decode()
    none = run_cva("evidence", "events", str(log))
    assert none.returncode == 1 and "no --register" in none.stderr.decode()


def test_initial_values_for_pcr_17(tmp_path: Path) -> None:
    log = tmp_path / "eventlog"
    log.write_bytes(_entry(17, "sha256", CVA_TEXTS[0]))
    value = _replay(b"\xff" * 32, "sha256", CVA_TEXTS)
    plain = run_cva("evidence", "events", str(log), "--register", f"17={value.hex()}")
    assert plain.returncode == 1
    ok = run_cva(
        "evidence",
        "events",
        str(log),
        "--register",
        f"17={value.hex()}",
        "--initial",
        f"17={'ff' * 32}",
    )
    assert ok.returncode == 0, ok.stderr.decode()


def test_malformed_log_is_exit_2_with_the_offset(tmp_path: Path) -> None:
    good = _entry(23, "sha256", CVA_TEXTS[0])
    for name, data, offset in (
        ("truncated", good + good[:20], len(good)),
        ("altered", good[:-1] + b"X", 0),
        ("bad-type", good + struct.pack("<I", 23) + struct.pack("<I", 7) + good[8:], len(good)),
    ):
        log = tmp_path / name
        log.write_bytes(data)
        proc = run_cva("evidence", "events", str(log), "--register", f"23={'00' * 32}")
        assert proc.returncode == 2, (name, proc.stderr)
        err = proc.stderr.decode()
        assert f"byte offset {offset}" in err and err.count("\n") == 1, err
        assert proc.stdout == b""


def test_bad_register_argument_is_a_one_line_error(tmp_path: Path) -> None:
    log, _r4, _r23 = _log(tmp_path)
    for arg in ("23", "x=00", "23=zz", "23=00"):
        proc = run_cva("evidence", "events", str(log), "--register", arg)
        assert proc.returncode != 0 and proc.stderr.decode().count("\n") == 1
