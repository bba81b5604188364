"""`cva evidence events LOG --register ... --seq-state FILE`: the rollback check a verifier runs
over successive boots' logs (increase, replay, gap, read-only, a tampered or malformed state
file: exit 2 and nothing written), with logs built by cva's encoder and replayed here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from evidence.eventlog import ALG_SHA256, AaelEvent, encode_entry, event_digest, extend
from evidence.volume_event import VolumeEvent, VolumeOperation, volume_aael
from tests.conftest import run_cva

U1 = "6b1f8c1e-7d4a-4a55-9d0f-2c3e4b5a6d7e"
OPEN, CREATE, CLOSE = VolumeOperation.OPEN, VolumeOperation.CREATE, VolumeOperation.CLOSE


def ev(op: VolumeOperation, seq: int | None, ro: bool = False) -> AaelEvent:
    return volume_aael(VolumeEvent(op, "pgdata", U1, bytes(range(32)), "ext4", ro, seq))


def boot_log(tmp_path: Path, name: str, events: list[AaelEvent]) -> tuple[Path, str]:
    """A boot's log on PCR 23 and the register value a quote would report for it."""
    value = bytes(32)
    blob = b""
    for event in events:
        blob += encode_entry(23, ALG_SHA256, event)
        value = extend(ALG_SHA256, value, event_digest(ALG_SHA256, event.text))
    path = tmp_path / name
    path.write_bytes(blob)
    return path, f"23={value.hex()}"


def check(log: Path, register: str | None, state: Path) -> tuple[int, dict, str]:
    args = ["evidence", "events", str(log), "--seq-state", str(state)]
    if register:
        args += ["--register", register]
    proc = run_cva(*args)
    out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, out, proc.stderr.decode()


def recorded(state: Path) -> dict[str, int]:
    return json.loads(state.read_text())["volumes"]


def test_increase_across_boots_creates_then_updates_the_state(tmp_path: Path) -> None:
    state = tmp_path / "seq.json"
    log, reg = boot_log(tmp_path, "boot1", [ev(CREATE, 1), ev(CLOSE, 1)])
    rc, out, err = check(log, reg, state)
    assert rc == 0, err
    assert out["verified"] is True
    assert len(out["events"]) == 2  # the usual output is unchanged
    assert out["seq"]["ok"] is True
    assert out["seq"]["updated"] is True
    (vol,) = out["seq"]["volumes"]
    assert (vol["uuid"], vol["names"], vol["recorded"], vol["highest"]) == (
        U1,
        ["pgdata"],
        None,
        1,
    )
    assert recorded(state) == {U1: 1}
    log2, reg2 = boot_log(tmp_path, "boot2", [AaelEvent("kata-agent", "x", "y"), ev(OPEN, 2)])
    rc, out, err = check(log2, reg2, state)
    assert rc == 0, err
    assert out["seq"]["volumes"][0]["recorded"] == 1
    assert recorded(state) == {U1: 2}


def test_replay_exits_1_naming_the_uuid_and_both_numbers(tmp_path: Path) -> None:
    state = tmp_path / "seq.json"
    state.write_text(json.dumps({"v": 1, "volumes": {U1: 5}}))
    before = state.read_bytes()
    log, reg = boot_log(tmp_path, "boot", [ev(OPEN, 5)])  # the header from before the last open
    rc, out, err = check(log, reg, state)
    assert rc == 1
    assert out["verified"] is True
    assert out["seq"]["ok"] is False
    assert out["seq"]["updated"] is False
    assert U1 in err
    assert "seq 5 is not above the highest seen, 5" in err
    assert state.read_bytes() == before
    # an older header (two opens back): below
    log, reg = boot_log(tmp_path, "boot-old", [ev(OPEN, 4)])
    rc, _, err = check(log, reg, state)
    assert rc == 1
    assert "rollback" in err
    assert "seq 4" in err
    assert "5" in err
    assert state.read_bytes() == before


def test_gap_is_accepted_and_recorded(tmp_path: Path) -> None:
    state = tmp_path / "seq.json"
    state.write_text(json.dumps({"v": 1, "volumes": {U1: 5}}))
    log, reg = boot_log(tmp_path, "boot", [ev(OPEN, 8)])
    rc, out, err = check(log, reg, state)
    assert rc == 0, err
    assert out["seq"]["volumes"][0]["events"][0]["note"] == "gap"
    assert recorded(state) == {U1: 8}


def test_read_only_must_not_be_below(tmp_path: Path) -> None:
    state = tmp_path / "seq.json"
    state.write_text(json.dumps({"v": 1, "volumes": {U1: 5}}))
    log, reg = boot_log(tmp_path, "ro-same", [ev(OPEN, 5, ro=True), ev(CLOSE, 5, ro=True)])
    rc, out, err = check(log, reg, state)
    assert rc == 0, err
    assert out["seq"]["updated"] is False  # nothing changed: not rewritten
    log, reg = boot_log(tmp_path, "ro-old", [ev(OPEN, 4, ro=True)])
    rc, _, err = check(log, reg, state)
    assert rc == 1
    assert "read-only) seq 4 is below the highest seen, 5" in err
    assert recorded(state) == {U1: 5}


def test_unverified_log_never_updates_or_creates_the_state(tmp_path: Path) -> None:
    state = tmp_path / "seq.json"
    log, _ = boot_log(tmp_path, "boot", [ev(CREATE, 1)])
    rc, out, err = check(log, "23=" + "00" * 32, state)  # the quote says something else
    assert rc == 1
    assert out["seq"]["ok"] is True
    assert out["seq"]["updated"] is False
    assert "not updated" in err
    assert not state.exists()
    rc, _, _ = check(log, None, state)  # no register given: not verified either
    assert rc == 1
    assert not state.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b'{"v":1,"volumes":{"' + U1.encode() + b'":"9"}}',
        b'{"v":1,"volumes":{"' + U1.encode() + b'":9,"' + U1.encode() + b'":1}}',
        b'{"v":2,"volumes":{}}',
        b"\x00" * 64,
    ],
)
def test_tampered_or_malformed_state_exits_2_and_is_not_overwritten(
    tmp_path: Path, content: bytes
) -> None:
    state = tmp_path / "seq.json"
    state.write_bytes(content)
    log, reg = boot_log(tmp_path, "boot", [ev(OPEN, 6)])
    rc, out, err = check(log, reg, state)
    assert rc == 2
    assert out == {}
    assert "seq state" in err
    assert "nothing was written" in err
    assert state.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_state_that_is_a_symlink_or_a_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"v": 1, "volumes": {}}))
    link = tmp_path / "seq.json"
    os.symlink(target, link)
    log, reg = boot_log(tmp_path, "boot", [ev(OPEN, 6)])
    rc, _, err = check(log, reg, link)
    assert rc == 2
    assert "nothing was written" in err
    assert json.loads(target.read_text()) == {"v": 1, "volumes": {}}
    folder = tmp_path / "dir.json"
    folder.mkdir()
    rc, _, err = check(log, reg, folder)
    assert rc == 2


def test_malformed_log_leaves_the_state_alone(tmp_path: Path) -> None:
    state = tmp_path / "seq.json"
    state.write_text(json.dumps({"v": 1, "volumes": {U1: 5}}))
    before = state.read_bytes()
    log = tmp_path / "bad"
    log.write_bytes(b"\x01\x02\x03")
    rc, _, _ = check(log, "23=" + "00" * 32, state)
    assert rc == 2
    assert state.read_bytes() == before


def test_a_second_verifier_waits_for_the_lock_then_gives_up(tmp_path: Path) -> None:
    """Two verifiers on one FILE: the second cannot read the old value while the first holds it
    (a lost update could lower a recorded seq)."""
    import fcntl

    from agent.cli.evidence import _SeqStateFile, _StateFailure

    state = tmp_path / "seq.json"
    first = _SeqStateFile(str(state))
    with first:
        second = _SeqStateFile(str(state))
        second.LOCK_WAIT = 0.3
        with pytest.raises(_StateFailure, match="held by another verifier"):
            second.__enter__()
    # released: the next one gets it
    with _SeqStateFile(str(state)) as again:
        assert again.read() is None
    lock = tmp_path / "seq.json.lock"
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free after the with block
    finally:
        os.close(fd)
