"""The orchestrator's side of key rotation (luks.rotation does the storage side): the previous
key is fetched through the shared KBS session only when the storage layer asks for it, wiped,
and a rotated volume's `volume-rekey` event (key ids, never key bytes) is measured before its
open event and before anyone gets the volume."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from agent import contract as C
from agent.config import MeasureConfig
from agent.measure import Measurer
from agent.volumes import VolumeManager
from evidence.eventlog import parse_aael_text, parse_log
from evidence.volume_event import VolumeOperation, parse_volume_event
from tests.daemon_support import KEY_MARKER, FakeKeySource, MemoryBackend, contract, volume


class _Register:
    def __init__(self) -> None:
        self.value = bytes(32)

    def read(self) -> bytes:
        return self.value

    def extend(self, digest: bytes) -> None:
        self.value = hashlib.sha256(self.value + digest).digest()


def _manager(tmp_path: Path, backend: MemoryBackend, keys: FakeKeySource) -> VolumeManager:
    reg = _Register()
    vol = dataclasses.replace(
        volume("pg"), previous_key=C.KbsResourceUri("default", "pg", "luks-old")
    )
    measurer = Measurer(
        MeasureConfig(sink="tpm"),
        log_path=tmp_path / "eventlog",
        register_factory=lambda _tcti, _pcr: reg,
        tee="tpm",  # the tpm sink only on a tpm TEE (issue 21 #2)
    )
    return VolumeManager(
        contract(vol, volume("other")),
        backend,
        keys,
        rootfs_base=tmp_path / "kata",
        measurer=measurer,
    )


def _events(tmp_path: Path) -> list[tuple[str, str]]:
    out = []
    for entry in parse_log((tmp_path / "eventlog").read_bytes()):
        ev = parse_volume_event(parse_aael_text(entry.text))
        assert ev is not None
        out.append((ev.operation.value, ev.name))
        if ev.operation is VolumeOperation.REKEY:
            assert ev.new_key_id == b"\x0c" * 32 and ev.old_key_id == b"\x0b" * 32
    return out


async def test_rotation_is_measured_before_the_open(tmp_path: Path) -> None:
    backend = MemoryBackend(rotate={"pg": True})
    keys = FakeKeySource()
    manager = _manager(tmp_path, backend, keys)
    opened = await manager.open_volume("pg")
    assert opened.rekey is not None
    assert keys.requests == ["kbs:///default/pg/luks", "kbs:///default/pg/luks-old"]
    assert backend.previous_seen["pg"] > 32
    assert all(len(s) == 0 for s in keys.given), "every key given out is wiped"
    assert _events(tmp_path) == [("volume-rekey", "pg"), ("volume-create", "pg")]
    text = (tmp_path / "eventlog").read_bytes()
    assert KEY_MARKER not in text


async def test_previous_key_not_fetched_unless_asked(tmp_path: Path) -> None:
    backend = MemoryBackend()
    keys = FakeKeySource()
    manager = _manager(tmp_path, backend, keys)
    await manager.open_volume("pg")
    await manager.open_volume("other")
    assert keys.requests == ["kbs:///default/pg/luks", "kbs:///default/other/luks"]
    assert _events(tmp_path) == [("volume-create", "pg"), ("volume-create", "other")]
