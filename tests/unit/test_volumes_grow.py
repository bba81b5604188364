"""VolumeManager.grow (issue 26 #4): only an open volume, under its lock, the key fetched only
when the backend asks for it, the outcome in ListVolumes' status and `cva status`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.control.collect import collect
from agent.control.report import report_from_json
from agent.volumes import GrowReport, VolumeManager
from luks.secret import Secret
from tests.daemon_support import FakeKeySource, MemoryBackend, contract, make_bundle, volume


@dataclass
class GrowingBackend(MemoryBackend):
    need_key: bool = True
    refuse: str = ""
    fail: Exception | None = None
    grown: list[str] = field(default_factory=list)

    def grow(self, vol: object, fetch_key: Callable[[], Secret]) -> GrowReport:
        name = getattr(vol, "name", "")
        self.grown.append(name)
        if self.fail is not None:
            raise self.fail
        if self.refuse:
            return GrowReport("refused", self.refuse)
        if self.need_key:
            with fetch_key() as key:
                assert len(key) >= 32
        return GrowReport("grown", "", 1 << 30)


def _manager(tmp_path: Path, backend: MemoryBackend) -> tuple[VolumeManager, FakeKeySource]:
    keys = FakeKeySource()
    c = contract(volume("pg", containers=("postgres",)))
    return VolumeManager(c, backend, keys, rootfs_base=tmp_path / "kata"), keys


async def test_grow_only_an_open_volume_and_fetch_the_key_on_demand(tmp_path: Path) -> None:
    backend = GrowingBackend()
    m, keys = _manager(tmp_path, backend)
    assert await m.grow("pg") is None and backend.grown == []  # not open: the open grows it
    assert await m.grow("nope") is None
    make_bundle(tmp_path / "kata", "c1", "postgres")
    await m.prepare("c1")
    assert [name for name, _device in m.mounted()] == ["pg"]
    report = await m.grow("pg")
    assert report == GrowReport("grown", "", 1 << 30)
    assert keys.requests == ["kbs:///default/pg/luks"] * 2  # the open, then the grow's resize
    assert all(len(s) == 0 for s in keys.given), "every key is wiped after use"
    [status] = await m.list()
    assert status.grow == report
    doc = (await collect(m)).to_json()
    assert report_from_json(doc).volumes[0].grow == "grown"
    await m.release("c1")
    [status] = await m.list()
    assert status.grow is None


async def test_a_refusal_and_a_failure_are_reported_not_raised(tmp_path: Path) -> None:
    backend = GrowingBackend(refuse="integrity volumes are not grown: ...")
    m, keys = _manager(tmp_path, backend)
    make_bundle(tmp_path / "kata", "c1", "postgres")
    await m.prepare("c1")
    assert (await m.grow("pg")) == GrowReport("refused", "integrity volumes are not grown: ...")
    assert keys.requests == ["kbs:///default/pg/luks"]  # no key for a refusal
    doc = (await collect(m)).to_json()
    assert report_from_json(doc).volumes[0].grow == "refused: integrity volumes are not grown: ..."
    backend.refuse, backend.fail = "", RuntimeError("lvm pvresize failed: x")
    report = await m.grow("pg")
    assert report is not None and report.status == "failed" and "pvresize" in report.reason


async def test_a_backend_without_grow_is_left_alone(tmp_path: Path) -> None:
    m, _keys = _manager(tmp_path, MemoryBackend())
    make_bundle(tmp_path / "kata", "c1", "postgres")
    await m.prepare("c1")
    assert await m.grow("pg") is None
