"""evidence.eventlog: AAEL/TCG2 entries byte for byte, strict parsing of hostile logs, replay,
register checks, the write-ahead entry and the crash-recovery decision."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evidence import eventlog as el
from evidence.errors import EvidenceError
from evidence.eventlog import (
    ALG_SHA256,
    ALG_SHA384,
    ALG_SHA512,
    ALG_SM3,
    AaelEvent,
    AaelTextError,
    EventLogError,
    RecoveryAction,
    WalEntry,
    WalError,
    aael_event,
    check_registers,
    encode_entry,
    encode_wal,
    event_digest,
    parse_aael_text,
    parse_log,
    parse_wal,
    plan_recovery,
    register_before,
    replay,
)

HASH = {ALG_SHA256: hashlib.sha256, ALG_SHA384: hashlib.sha384, ALG_SHA512: hashlib.sha512}


def _expected_entry(register: int, alg: int, text: bytes) -> bytes:
    """The TCG2 entry built independently of the module, straight from SPEC §e.6."""
    data = struct.pack("<I", 0x4141454C) + struct.pack("<I", len(text)) + text
    return (
        struct.pack("<I", register)
        + struct.pack("<I", 6)
        + struct.pack("<I", 1)
        + struct.pack("<H", alg)
        + HASH[alg](data).digest()
        + struct.pack("<I", len(data))
        + data
    )


def _entry(content: str = "content", register: int = 17, alg: int = ALG_SHA384) -> bytes:
    return encode_entry(register, alg, aael_event("domain", "operation", content))


# -- known answers -------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", [ALG_SHA256, ALG_SHA384, ALG_SHA512])
def test_entry_known_answer_struct_packed(alg: int) -> None:
    text = "cva volume-open v=1 name=data ro=false"
    got = encode_entry(3, alg, aael_event("cva", "volume-open", "v=1 name=data ro=false"))
    assert got == _expected_entry(3, alg, text.encode())


def test_entry_sha384_field_offsets_match_upstream_layout() -> None:
    entry = _entry("two", register=4)
    assert struct.unpack_from("<I", entry, 4)[0] == 6  # event type
    assert struct.unpack_from("<I", entry, 8)[0] == 1  # digest count
    assert struct.unpack_from("<H", entry, 12)[0] == 0x0C
    assert struct.unpack_from("<I", entry, 66)[0] == 0x4141454C  # tag
    assert struct.unpack_from("<I", entry, 70)[0] == len(b"domain operation two")


@pytest.mark.parametrize(
    ("alg", "hexdigest"),
    [
        # guest-components eventlog/mod.rs test_event_digest ("domain", "operation", "content")
        (ALG_SHA256, "46df8dacf00a07d34a83cdf56d7978697790787cf2ba1432ef7c38f22cd96351"),
        (
            ALG_SHA384,
            "dad5f0e226318ffa9839b75a472c6aa7fdb5834949d0a0a22990cf04d5692440"
            "fb00f3aa0609db7e49cd8d793f670d02",
        ),
        (
            ALG_SHA512,
            "b708d222ca8bd44dfe6ba0c4ca2cbb72379276fba8091025217064be45a813e5"
            "d6124ccf073219edb617d1faf007d55061465bdf34b7437dbdc9a7405bd4e9c0",
        ),
    ],
)
def test_event_digest_matches_upstream_vectors(alg: int, hexdigest: str) -> None:
    assert event_digest(alg, "domain operation content").hex() == hexdigest


def test_replay_known_answer_and_register_check() -> None:
    log = _entry("one") + _entry("two") + _entry("x", register=2, alg=ALG_SHA256)
    events = parse_log(log)
    assert [(e.offset, e.register, e.content) for e in events] == [
        (0, 17, "one"),
        (len(_entry("one")), 17, "two"),
        (len(_entry("one")) + len(_entry("two")), 2, "x"),
    ]
    r17 = bytes(48)
    for c in (b"one", b"two"):
        d = hashlib.sha384(struct.pack("<II", 0x4141454C, 17 + len(c)) + b"domain operation " + c)
        r17 = hashlib.sha384(r17 + d.digest()).digest()
    r2 = hashlib.sha256(
        bytes(32)
        + hashlib.sha256(struct.pack("<II", 0x4141454C, 18) + b"domain operation x").digest()
    ).digest()
    values = replay(events)
    assert values == {17: r17, 2: r2}

    ok = check_registers(values, {17: r17, 2: r2})
    assert ok.verified and ok.matched == (2, 17) and not ok.mismatched and not ok.unchecked
    bad = check_registers(values, {17: r17, 2: bytes(32)})
    assert not bad.verified and bad.mismatched == (2,)
    partial = check_registers(values, {17: r17})
    assert not partial.verified and partial.unchecked == (2,)
    assert not check_registers(values, {}).verified
    # A claimed register the log never touches must be at its initial value.
    assert check_registers({}, {5: bytes(48)}).verified
    assert not check_registers({}, {5: b"\x01" * 48}).verified
    assert check_registers({}, {17: b"\xff" * 32}, initial={17: b"\xff" * 32}).verified


def test_replay_initial_values_and_mixed_algorithms() -> None:
    events = parse_log(_entry("a", alg=ALG_SHA256))
    start = b"\xff" * 32
    expected = hashlib.sha256(start + events[0].digest).digest()
    assert replay(events, {17: start}) == {17: expected}
    with pytest.raises(EventLogError, match="initial value"):
        replay(events, {17: bytes(48)})
    mixed = _entry("a", alg=ALG_SHA256) + _entry("b", alg=ALG_SHA384)
    with pytest.raises(EventLogError, match="mixes") as err:
        replay(parse_log(mixed))
    assert err.value.offset == len(_entry("a", alg=ALG_SHA256))


# -- AAEL text -----------------------------------------------------------------------------------


def test_aael_text_split_rules() -> None:
    assert parse_aael_text("d o c with  spaces") == AaelEvent("d", "o", "c with  spaces")
    assert parse_aael_text("d o ") == AaelEvent("d", "o", "")
    assert parse_aael_text("d o  lead") == AaelEvent("d", "o", " lead")
    assert parse_aael_text('github.com/confidential-containers PullImage {"a":1}').domain == (
        "github.com/confidential-containers"
    )
    for bad in ["", "d", "d o", " d o c", "d  o c", "d o c\n", "d\no c", "d o c\nx"]:
        with pytest.raises(AaelTextError):
            parse_aael_text(bad)
    with pytest.raises(AaelTextError, match="limit"):
        parse_aael_text("d o " + "x" * el.MAX_TEXT_BYTES)


def test_aael_encode_validation_is_stricter() -> None:
    assert aael_event("cva", "volume-open", "a b").text == "cva volume-open a b"
    assert aael_event("cva", "op", "").text == "cva op "
    bad = [
        ("", "op", "c"),
        ("d", "", "c"),
        ("d d", "op", "c"),
        ("d", "o\tp", "c"),
        ("d", "op", "line\nbreak"),
        ("d", "op", "cr\r"),
        ("d", "op", "nul\x00"),
        ("d", "op", "del\x7f"),
        ("d", "op", "c1\x85"),
        ("d\u00a0x", "op", "c"),  # non-ASCII white space
        ("x" * 256, "op", "c"),
        ("d", "op", "\ud800"),
        ("d", "op", "x" * el.MAX_TEXT_BYTES),
    ]
    for domain, op, content in bad:
        with pytest.raises(AaelTextError):
            aael_event(domain, op, content)
    with pytest.raises(AaelTextError):
        encode_entry(17, ALG_SHA384, AaelEvent("d", "op", "a\nb"))
    with pytest.raises(EvidenceError, match="u32"):
        encode_entry(1 << 32, ALG_SHA384, AaelEvent("d", "op", "c"))
    with pytest.raises(EvidenceError, match="not supported"):
        encode_entry(17, ALG_SM3, AaelEvent("d", "op", "c"))


_word = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="\x85"),
    min_size=1,
    max_size=20,
).filter(lambda s: not any(c.isspace() for c in s))
_content = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=80)


@given(_word, _word, _content, st.integers(0, 2**32 - 1), st.sampled_from(sorted(HASH)))
def test_round_trip(domain: str, op: str, content: str, register: int, alg: int) -> None:
    event = aael_event(domain, op, content)
    entry = encode_entry(register, alg, event)
    assert entry == _expected_entry(register, alg, event.text.encode())
    (parsed,) = parse_log(entry)
    assert (parsed.register, parsed.alg, parsed.domain, parsed.operation, parsed.content) == (
        register,
        alg,
        domain,
        op,
        content,
    )
    assert parsed.digest == event_digest(alg, event.text)
    assert parse_aael_text(event.text) == event


# -- hostile logs --------------------------------------------------------------------------------


def _set(entry: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(entry)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def _rehash(entry: bytes, alg: int = ALG_SHA384) -> bytes:
    """Fix the digest after altering the event data (so the check under test is the other one)."""
    size = el.DIGEST_SIZES[alg]
    data = entry[14 + size + 4 :]
    return entry[:14] + HASH[alg](data).digest() + entry[14 + size :]


def _with_text(text: bytes, alg: int = ALG_SHA384) -> bytes:
    return _expected_entry(17, alg, text)


GOOD = _entry("one")


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (_entry("two")[:-1], "truncated"),
        (_entry("two")[:10], "truncated"),
        (_entry("two")[:40], "truncated"),
        (_set(_entry("two"), 4, "<I", 1), "event type"),
        (_set(_entry("two"), 8, "<I", 2), "digests"),
        (_set(_entry("two"), 8, "<I", 0), "digests"),
        (_set(_entry("two"), 12, "<H", 4), "unknown"),
        (_set(_entry("two"), 12, "<H", 0x12), "recognised but not supported"),
        (_rehash(_set(_entry("two"), 66, "<I", 0)), "tag"),
        (_rehash(_set(_entry("two"), 70, "<I", 4)), "does not match"),
        (_set(_entry("two"), 62, "<I", 0xFFFFFFFF), "limit"),
        (_set(_entry("two"), 62, "<I", 3), "shorter"),
        (_set(_entry("two"), 62, "<I", 200), "truncated"),
        (_entry("two")[:-1] + b"X", "digest is not"),
        (_with_text(b"d o \xff"), "not UTF-8"),
        (_with_text(b"d o a\nb"), "newline"),
        (_with_text(b"d  o c"), "empty domain"),
        (_with_text(b"do"), "two spaces"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_entry_names_its_offset(bad: bytes, match: str) -> None:
    with pytest.raises(EventLogError, match=match) as err:
        parse_log(GOOD + bad)
    assert err.value.offset == len(GOOD)
    assert f"byte offset {len(GOOD)}" in err.value.message
    assert isinstance(err.value, EvidenceError)


def test_trailing_bytes_name_their_own_offset() -> None:
    with pytest.raises(EventLogError, match="truncated") as err:
        parse_log(GOOD + GOOD + b"\x00")
    assert err.value.offset == 2 * len(GOOD)


def test_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_log(b"") == ()
    monkeypatch.setattr(el, "MAX_EVENTS", 2)
    with pytest.raises(EventLogError, match="more than 2") as err:
        parse_log(GOOD * 3)
    assert err.value.offset == 2 * len(GOOD)
    monkeypatch.setattr(el, "MAX_LOG_BYTES", len(GOOD) * 2)
    with pytest.raises(EventLogError, match="limit"):
        parse_log(GOOD * 3)


def test_sm3_digest_mismatch_free_refusal() -> None:
    # A well-formed SM3 entry (digest size 32) is refused as unsupported, never replayed.
    entry = _set(_expected_entry(17, ALG_SHA256, b"d o c"), 12, "<H", ALG_SM3)
    with pytest.raises(EventLogError, match="sm3 is recognised but not supported"):
        parse_log(entry)


def _check_fuzz(data: bytes) -> None:
    try:
        events = parse_log(data)
    except EventLogError as e:
        assert 0 <= e.offset <= len(data)
        assert "\n" not in e.message
    else:
        assert sum(len(_expected_entry(0, e.alg, e.text.encode())) for e in events) == len(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _check_fuzz(data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from([GOOD, _entry("b c", 2, ALG_SHA256), _entry("", 9, ALG_SHA512)])),
    st.data(),
)
def test_fuzz_mutated_valid_logs(parts: list[bytes], data: st.DataObject) -> None:
    log = bytearray(b"".join(parts))
    for _ in range(data.draw(st.integers(0, 3))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(log)))
        if kind == "flip" and at < len(log):
            log[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del log[at : at + data.draw(st.integers(1, 8))]
        else:
            log[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    _check_fuzz(bytes(log))


# -- write-ahead entry and recovery --------------------------------------------------------------


def test_wal_known_answer_and_round_trip() -> None:
    expected = bytes(range(48))
    wal = WalEntry(0x0102, expected, "cva volume-open a b")
    raw = encode_wal(wal, ALG_SHA384)
    assert raw == struct.pack(">Q", 0x0102) + expected + b"cva volume-open a b"
    assert parse_wal(raw, ALG_SHA384) == wal


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "shorter"),
        (struct.pack(">Q", 0) + bytes(47), "shorter"),
        (struct.pack(">Q", 0) + bytes(48) + b"d o \xff", "UTF-8"),
        (struct.pack(">Q", 0) + bytes(48) + b"d o a\nb", "newline"),
        (struct.pack(">Q", 0) + bytes(48) + b"do", "two spaces"),
        (struct.pack(">Q", 2**63) + bytes(48) + b"d o c", "beyond"),
        (struct.pack(">Q", 0) + bytes(48) + b"d o " + b"x" * el.MAX_TEXT_BYTES, "limit"),
    ],
)
def test_wal_hostile(raw: bytes, match: str) -> None:
    with pytest.raises(WalError, match=match):
        parse_wal(raw, ALG_SHA384)


def test_wal_encode_validation() -> None:
    with pytest.raises(WalError, match="bytes"):
        encode_wal(WalEntry(0, bytes(32), "d o c"), ALG_SHA384)
    with pytest.raises(WalError, match="offset"):
        encode_wal(WalEntry(-1, bytes(48), "d o c"), ALG_SHA384)
    with pytest.raises(AaelTextError):
        encode_wal(WalEntry(0, bytes(48), "d o c\x00"), ALG_SHA384)
    with pytest.raises(WalError, match="not supported"):
        parse_wal(bytes(100), ALG_SM3)


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_fuzz_wal(raw: bytes) -> None:
    try:
        wal = parse_wal(raw, ALG_SHA256)
    except WalError:
        return
    assert 0 <= wal.offset <= el.MAX_LOG_BYTES
    try:
        again = encode_wal(wal, ALG_SHA256)
    except AaelTextError:
        return  # parses (other writers' grammar) but cva would not write it
    assert again == raw


def _crash_state(alg: int = ALG_SHA384) -> tuple[bytes, WalEntry, bytes, bytes]:
    """A log with one committed entry, and the WAL for the next one."""
    log = _entry("first", 17, alg)
    before = replay(parse_log(log))[17]
    text = "cva volume-open v=1"
    after = hashlib.new(el.ALG_NAMES[alg], before + event_digest(alg, text)).digest()
    return log, WalEntry(len(log), after, text), before, after


def test_recovery_rewrite_entry_only() -> None:
    log, wal, before, after = _crash_state()
    assert register_before(log, wal.offset, 17, ALG_SHA384) == before
    plan = plan_recovery(wal, register=17, alg=ALG_SHA384, current=after, before=before)
    assert plan.action is RecoveryAction.REWRITE_ENTRY
    assert plan.offset == len(log)
    assert plan.entry == _expected_entry(17, ALG_SHA384, b"cva volume-open v=1")
    # Finishing the plan leaves a log that replays to the register.
    assert replay(parse_log(log + plan.entry))[17] == after


def test_recovery_extend_then_write() -> None:
    log, wal, before, after = _crash_state(ALG_SHA256)
    plan = plan_recovery(wal, register=17, alg=ALG_SHA256, current=before, before=before)
    assert plan.action is RecoveryAction.EXTEND_THEN_WRITE
    assert hashlib.sha256(before + plan.digest).digest() == after
    # A partially written entry at the offset is overwritten by the same bytes.
    half = log + plan.entry[:20]
    assert register_before(half, wal.offset, 17, ALG_SHA256) == before


def test_recovery_fatal_names_both_values() -> None:
    _log, wal, before, after = _crash_state()
    other = b"\x42" * 48
    with pytest.raises(WalError, match="another process") as err:
        plan_recovery(wal, register=17, alg=ALG_SHA384, current=other, before=before)
    assert other.hex() in err.value.message and after.hex() in err.value.message
    # A WAL that does not follow from the log is fatal even if the register "matches".
    with pytest.raises(WalError, match="does not follow"):
        plan_recovery(wal, register=17, alg=ALG_SHA384, current=after, before=other)
    with pytest.raises(WalError, match="WAL text"):
        plan_recovery(
            WalEntry(wal.offset, after, "d o \x00"),
            register=17,
            alg=ALG_SHA384,
            current=after,
            before=before,
        )
    with pytest.raises(WalError, match="48-byte"):
        plan_recovery(wal, register=17, alg=ALG_SHA384, current=after[:32], before=before)


def test_register_before_hostile() -> None:
    log, _wal, _before, _after = _crash_state()
    with pytest.raises(WalError, match="past the end"):
        register_before(log, len(log) + 1, 17, ALG_SHA384)
    with pytest.raises(EventLogError, match="truncated"):
        register_before(log, len(log) - 1, 17, ALG_SHA384)
    with pytest.raises(WalError, match="another algorithm"):
        register_before(log, len(log), 17, ALG_SHA256)
    assert register_before(log, len(log), 3, ALG_SHA256) == bytes(32)
    assert register_before(b"", 0, 17, ALG_SHA256, b"\xff" * 32) == b"\xff" * 32
    with pytest.raises(WalError, match="initial"):
        register_before(b"", 0, 17, ALG_SHA256, b"\xff" * 48)


def test_new_modules_import_only_stdlib_and_evidence_errors() -> None:
    """They stay movable in the package refactor: nothing from agent/ or luks/ directly."""
    import ast
    import sys
    from pathlib import Path

    allowed = {"evidence.errors", "evidence.eventlog", "__future__"}
    for name in ("eventlog", "aa_wire", "volume_event"):
        tree = ast.parse((Path(el.__file__).parent / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert mod in allowed or mod.split(".")[0] in sys.stdlib_module_names, (name, mod)
