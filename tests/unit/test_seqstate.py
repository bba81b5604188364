"""evidence.seqstate: the verifier's per-UUID highest seq (rollback check), pure; hostile state
files; properties of the check (never lowers, strict for read-write, not-below for read-only)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evidence.eventlog import AaelEvent
from evidence.seqstate import (
    MAX_STATE_BYTES,
    MAX_VOLUMES,
    SeqState,
    SeqStateError,
    check_sequences,
    encode_state,
    parse_state,
)
from evidence.volume_event import VolumeEvent, VolumeOperation, volume_aael

U1 = "6b1f8c1e-7d4a-4a55-9d0f-2c3e4b5a6d7e"
U2 = "00000000-0000-4000-8000-000000000002"
OPEN, CREATE, CLOSE = VolumeOperation.OPEN, VolumeOperation.CREATE, VolumeOperation.CLOSE


def ev(
    op: VolumeOperation, seq: int | None, uuid: str = U1, ro: bool = False, name: str = "pg"
) -> AaelEvent:
    ids = (b"\x01" * 32, None) if op is VolumeOperation.REKEY else (None, None)
    return volume_aael(VolumeEvent(op, name, uuid, bytes(32), "ext4", ro, seq, *ids))


def state(**kw: int) -> SeqState:
    return SeqState({U1 if k == "u1" else U2: v for k, v in kw.items()})


# --- the rules ------------------------------------------------------------------------------


def test_increase_is_ok_and_raises_the_record() -> None:
    report = check_sequences(state(u1=4), [ev(OPEN, 5), ev(CLOSE, 5), ev(OPEN, 6)])
    assert report.ok
    assert report.new_state.highest == {U1: 6}
    (vol,) = report.volumes
    assert (vol.recorded, vol.highest, vol.names) == (4, 6, ("pg",))
    assert [e.before for e in vol.events] == [4, 5, 5]
    assert all(e.note == "" for e in vol.events)


def test_new_volume_create_is_ok() -> None:
    report = check_sequences(SeqState(), [ev(CREATE, 1), ev(OPEN, 2)])
    assert report.ok
    assert report.new_state.highest == {U1: 2}
    assert report.volumes[0].recorded is None


@pytest.mark.parametrize(("seq", "kind"), [(5, "replay"), (3, "rollback"), (0, "rollback")])
def test_read_write_open_not_above_fails_naming_both_numbers(seq: int, kind: str) -> None:
    report = check_sequences(state(u1=5), [ev(OPEN, seq)])
    assert not report.ok
    (line,) = report.failures()
    assert line.startswith(f"volume {U1}: {kind}:")
    assert f"seq {seq}" in line
    assert "highest seen, 5" in line
    assert report.new_state.highest == {U1: 5}  # never lowered


def test_create_over_a_recorded_volume_fails() -> None:
    report = check_sequences(state(u1=3), [ev(CREATE, 1)])
    assert not report.ok
    assert "volume-create (read-write) seq 1" in report.failures()[0]


def test_replay_within_one_log_fails() -> None:
    report = check_sequences(SeqState(), [ev(OPEN, 7), ev(CLOSE, 7), ev(OPEN, 7)])
    assert not report.ok
    assert [e.ok for e in report.volumes[0].events] == [True, True, False]


def test_gap_is_ok_and_reported() -> None:
    report = check_sequences(state(u1=5), [ev(OPEN, 9)])
    assert report.ok
    assert report.volumes[0].events[0].note == "gap"
    assert report.new_state.highest == {U1: 9}


def test_read_only_open_must_not_be_below() -> None:
    assert check_sequences(state(u1=5), [ev(OPEN, 5, ro=True)]).ok
    above = check_sequences(state(u1=5), [ev(OPEN, 6, ro=True)])
    assert above.ok
    assert above.volumes[0].events[0].note == "gap"
    below = check_sequences(state(u1=5), [ev(OPEN, 4, ro=True)])
    assert not below.ok
    assert "volume-open (read-only) seq 4 is below the highest seen, 5" in below.failures()[0]


def test_close_must_not_be_below() -> None:
    assert check_sequences(state(u1=5), [ev(CLOSE, 5)]).ok
    assert not check_sequences(state(u1=5), [ev(CLOSE, 4)]).ok


def test_volumes_are_independent() -> None:
    report = check_sequences(state(u1=5, u2=2), [ev(OPEN, 6), ev(OPEN, 2, uuid=U2)])
    assert not report.ok
    verdicts = {v.uuid: v.ok for v in report.volumes}
    assert verdicts == {U1: True, U2: False}


def test_events_without_seq() -> None:
    # an ephemeral volume: listed, not tracked
    report = check_sequences(SeqState(), [ev(OPEN, None), ev(CLOSE, None)])
    assert report.ok
    assert report.volumes == ()
    assert len(report.skipped) == 2
    assert report.new_state.highest == {}
    # a volume with a recorded seq whose event lost it
    stripped = check_sequences(state(u1=5), [ev(OPEN, None)])
    assert not stripped.ok
    assert "carries no seq, but seq 5 is on record" in stripped.failures()[0]


def test_other_domains_are_ignored_and_unknown_cva_operations_tolerated() -> None:
    events = [
        AaelEvent("kata-agent", "PullImage", "x y"),
        AaelEvent("cva", "ephemeral-create", '{"name":"caa-x","uuid":"' + U2 + '"}'),
        AaelEvent("cva", "ephemeral-close", "not json"),
        ev(OPEN, 6),
    ]
    report = check_sequences(state(u1=5), events)
    assert report.ok
    assert [(s.index, s.operation) for s in report.skipped] == [
        (1, "ephemeral-create"),
        (2, "ephemeral-close"),
    ]
    # an unknown operation that carries a seq cannot be judged: a failure, not a silent skip
    with_seq = AaelEvent("cva", "volume-reopen", '{"seq":1,"uuid":"' + U1 + '"}')
    report = check_sequences(state(u1=5), [with_seq])
    assert not report.ok
    assert "volume-reopen" in report.failures()[0]


def test_known_operation_with_bad_content_fails() -> None:
    report = check_sequences(SeqState(), [AaelEvent("cva", "volume-open", '{"v":2}')])
    assert not report.ok
    assert report.failures()[0].startswith("event 0: volume-open:")


# --- the state file -------------------------------------------------------------------------


def test_state_round_trip_and_canonical_form() -> None:
    s = state(u1=5, u2=0)
    data = encode_state(s)
    assert parse_state(data) == s
    assert json.loads(data) == {"v": 1, "volumes": {U2: 0, U1: 5}}
    assert parse_state(b'{"v":1,"volumes":{}}') == SeqState()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "exactly"),
        (b'{"v":1}', "exactly"),
        (b'{"v":1,"volumes":{},"x":1}', "exactly"),
        (b'{"v":2,"volumes":{}}', "version"),
        (b'{"v":true,"volumes":{}}', "version"),
        (b'{"v":1.0,"volumes":{}}', "version"),
        (b'{"v":1,"volumes":[]}', "object"),
        (b'{"v":1,"volumes":{"' + U1.upper().encode() + b'":1}}', "UUID"),
        (b'{"v":1,"volumes":{"x":1}}', "UUID"),
        (b'{"v":1,"volumes":{"' + U1.encode() + b'":-1}}', "integer"),
        (b'{"v":1,"volumes":{"' + U1.encode() + b'":1.5}}', "integer"),
        (b'{"v":1,"volumes":{"' + U1.encode() + b'":"5"}}', "integer"),
        (b'{"v":1,"volumes":{"' + U1.encode() + b'":true}}', "integer"),
        (b'{"v":1,"volumes":{"' + U1.encode() + b'":18446744073709551616}}', "integer"),
        (b'{"v":1,"volumes":{"' + U1.encode() + b'":NaN}}', "NaN"),
        (b'{"v":1,"volumes":{"' + U1.encode() + b'":9,"' + U1.encode() + b'":1}}', "twice"),
        (b'{"v":1,"v":1,"volumes":{}}', "twice"),
        (b"[" * 100000 + b"]" * 100000, "not JSON|exactly"),
    ],
)
def test_hostile_state_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(SeqStateError, match=match):
        parse_state(data)


def test_state_limits() -> None:
    with pytest.raises(SeqStateError, match="limit"):
        parse_state(b" " * (MAX_STATE_BYTES + 1))
    many = {f"00000000-0000-4000-8000-{i:012x}": 1 for i in range(MAX_VOLUMES + 1)}
    with pytest.raises(SeqStateError, match="limit"):
        parse_state(json.dumps({"v": 1, "volumes": many}).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_property_any_bytes_parse_or_refuse(data: bytes) -> None:
    with contextlib.suppress(SeqStateError):
        parse_state(data)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.uuids().map(str), st.integers(0, 2**64 - 1), max_size=20))
def test_property_state_round_trip(volumes: dict[str, int]) -> None:
    s = SeqState(volumes)
    assert parse_state(encode_state(s)) == s


_event = st.tuples(
    st.sampled_from([OPEN, CREATE, CLOSE]),
    st.integers(0, 20),
    st.sampled_from([U1, U2]),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from([U1, U2]), st.integers(0, 20)),
    st.lists(_event, max_size=12),
)
def test_property_check_matches_the_rules(
    recorded: dict[str, int], items: list[tuple[VolumeOperation, int, str, bool]]
) -> None:
    events = [ev(op, seq, uuid, ro and op is OPEN) for op, seq, uuid, ro in items]
    report = check_sequences(SeqState(recorded), events)
    # a model of the rules
    high = dict(recorded)
    expect_ok = True
    for op, seq, uuid, ro in items:
        before = high.get(uuid)
        strict = op is CREATE or (op is OPEN and not ro)
        if before is not None and (seq <= before if strict else seq < before):
            expect_ok = False
        high[uuid] = max(seq, before if before is not None else 0)
    assert report.ok == expect_ok
    assert report.new_state.highest == high
    for uuid, value in recorded.items():  # never lowered
        assert report.new_state.highest[uuid] >= value


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 1000), st.lists(st.integers(1, 5), min_size=1, max_size=10))
def test_property_strictly_increasing_read_write_opens_pass(start: int, steps: list[int]) -> None:
    seqs = [start + sum(steps[: i + 1]) for i in range(len(steps))]
    report = check_sequences(SeqState({U1: start}), [ev(OPEN, s) for s in seqs])
    assert report.ok
    assert report.new_state.highest == {U1: seqs[-1]}


def test_a_rekey_is_judged_like_the_open_it_precedes() -> None:
    """luks.rotation: volume-rekey carries the seq of the open recorded right after it."""
    rekey = VolumeOperation.REKEY
    report = check_sequences(state(u1=5), [ev(rekey, 6), ev(OPEN, 6)])
    assert report.ok and report.new_state.highest == {U1: 6}
    replayed = check_sequences(state(u1=5), [ev(rekey, 5), ev(OPEN, 5)])
    assert not replayed.ok
