"""`cva status` (agent.control): the report the daemon builds from what it holds (contract and
SecureMount volumes, KBS session, sink, last events), its JSON and table forms, the request
parser of the control socket (hostile bytes), the socket itself (root only, one answer), and the
sysfs walk from a mapping to its disk."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import MeasureConfig
from agent.control import collect as collect_mod
from agent.control.client import ControlError, request
from agent.control.collect import collect, disk_of_devno
from agent.control.report import ReportError, render_table, report_from_json
from agent.control.server import ControlServer, parse_request
from agent.keysource import LazyKbsKeySource
from agent.measure import Measurer
from agent.securemount.records import MountRecord
from agent.volumes import VolumeManager
from tests.daemon_support import (
    KEY_MARKER,
    FakeKeySource,
    MemoryBackend,
    contract,
    make_bundle,
    volume,
)


class _Register:
    def __init__(self) -> None:
        self.value = bytes(32)

    def read(self) -> bytes:
        return self.value

    def extend(self, digest: bytes) -> None:
        self.value = hashlib.sha256(self.value + digest).digest()


def _measurer(tmp_path: Path) -> Measurer:
    reg = _Register()
    return Measurer(
        MeasureConfig(sink="tpm"),
        log_path=tmp_path / "eventlog",
        state_path=tmp_path / "measured.json",
        register_factory=lambda _tcti, _pcr: reg,
        tee="tpm",  # the tpm sink only on a tpm TEE (issue 21 #2)
    )


EPHEMERAL = MountRecord(
    mount_point="/run/kata-containers/sandbox/storage/eph",
    kind="ephemeral",
    name="eph-1234",
    devno="254:32",
    target="filesystem",
    source="/run/cva/securemount/mnt/eph-1234",
    header="/run/cva/securemount/headers/eph-1234",
    state="mounted",
)


async def test_report_covers_contract_and_securemount_volumes(tmp_path: Path) -> None:
    backend = MemoryBackend(scan_report=("disk", 10, 40))
    measurer = _measurer(tmp_path)
    manager = VolumeManager(
        contract(
            volume("pg", containers=("postgres",)),
            volume("logs", containers=("web",)),
            volume("idle", containers=("web",)),
        ),
        backend,
        FakeKeySource(),
        rootfs_base=tmp_path / "kata",
        measurer=measurer,
    )
    make_bundle(tmp_path / "kata", "c1", "postgres")
    await manager.prepare("c1")
    await manager.open_volume("logs", holder="securemount:/run/kata-containers/x/logs")
    persistent = MountRecord(
        mount_point="/run/kata-containers/x/logs",
        kind="persistent",
        name="logs",
        devno="254:16",
        target="filesystem",
        source="/run/cva/volumes/logs",
        header="",
        state="mounted",
    )
    report = await collect(manager, lambda: (persistent, EPHEMERAL))
    by_name = {v.name: v for v in report.volumes}
    assert list(by_name) == ["pg", "logs", "idle", "eph-1234"]
    pg = by_name["pg"]
    assert (pg.kind, pg.state, pg.holders) == ("contract", "bound", ("c1",))
    assert pg.mapper == "cva-pg" and pg.filesystem == "ext4"
    assert pg.luks_uuid is not None and len(pg.luks_uuid) == 36
    assert pg.last_event is not None
    assert (pg.last_event.operation, pg.last_event.sink) == ("volume-create", "tpm")
    logs = by_name["logs"]
    assert logs.state == "bound" and logs.holders == ("securemount:/run/kata-containers/x/logs",)
    assert by_name["idle"].state == "absent" and by_name["idle"].last_event is None
    eph = by_name["eph-1234"]
    assert (eph.kind, eph.state, eph.mapper, eph.filesystem) == (
        "ephemeral",
        "mounted",
        "eph-1234",
        "ext4",
    )
    assert eph.holders == ("securemount:" + EPHEMERAL.mount_point,)
    assert report.measure.sink == "tpm" and report.measure.required
    assert report.kbs.state == "unknown"  # the fake key source has no session
    doc = report.to_json()
    text = json.dumps(doc)
    assert KEY_MARKER.decode() not in text
    assert report_from_json(json.loads(text)) == report
    table = render_table(report, now=0.0)
    assert "pg" in table and "volume-create" in table and "eph-1234" in table


async def test_blank_proof_progress_is_shown_while_it_runs(tmp_path: Path) -> None:
    import threading

    gate = threading.Event()
    backend = MemoryBackend(scan_report=("disk", 10, 40), open_gate=gate)
    manager = VolumeManager(
        contract(volume("pg", containers=("postgres",))),
        backend,
        FakeKeySource(),
        rootfs_base=tmp_path / "kata",
    )
    make_bundle(tmp_path / "kata", "c1", "postgres")
    task = asyncio.create_task(manager.prepare("c1"))
    try:
        for _ in range(200):
            report = await collect(manager)
            if report.volumes[0].blank_proof is not None:
                break
            await asyncio.sleep(0.01)
        [pg] = report.volumes
        assert pg.state == "proving-blank"
        assert pg.blank_proof is not None and pg.blank_proof.percent == 25
        assert report.to_json()["volumes"][0]["blank_proof"]["percent"] == 25  # type: ignore[index]
        assert "proving-blank 25%" in render_table(report)
    finally:
        gate.set()
        await task


def test_kbs_session_before_the_first_key() -> None:
    keys = LazyKbsKeySource(lambda: pytest.fail("no client before the first key"))
    assert keys.session_state() == ("not-started", None)


def test_sysfs_walk_from_mapping_to_disk(tmp_path: Path) -> None:
    sys_root = tmp_path / "sys"
    blocks = sys_root / "devices" / "virtual" / "block"
    disk = sys_root / "devices" / "pci0000:00" / "virtio3" / "block" / "vdb"
    for node in (blocks / "dm-0", blocks / "dm-1", disk):
        (node / "slaves").mkdir(parents=True)
    (blocks / "dm-1" / "slaves" / "dm-0").symlink_to(blocks / "dm-0")  # crypt over the LV
    (blocks / "dm-0" / "slaves" / "vdb").symlink_to(disk)  # the LV over the disk
    devs = sys_root / "dev" / "block"
    devs.mkdir(parents=True)
    (devs / "253:1").symlink_to(blocks / "dm-1")
    (devs / "254:16").symlink_to(disk)
    assert disk_of_devno("253:1", sys_root) == "/dev/vdb"
    assert disk_of_devno("254:16", sys_root) == "/dev/vdb"
    assert disk_of_devno("9:9", sys_root) is None
    # a loop in a hostile or broken tree ends, it does not spin
    (blocks / "dm-0" / "slaves" / "vdb").unlink()
    (blocks / "dm-0" / "slaves" / "dm-1").symlink_to(blocks / "dm-1")
    assert disk_of_devno("253:1", sys_root) is None
    assert collect_mod.backing_disk(str(tmp_path / "not-a-device")) is None


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b"", "not one JSON object"),
        (b"status", "not one JSON object"),
        (b"[]", "must be"),
        (b'{"v": 1}', "must be"),
        (b'{"v": 2, "request": "status"}', "version"),
        (b'{"v": true, "request": "status"}', "version"),
        (b'{"v": 1, "request": "prepare"}', "unknown request"),
        (b'{"v": 1, "request": "status", "x": 1}', "must be"),
        (b"x" * 5000, "longer than"),
        (b"[" * 4000, "not one JSON object"),
    ],
)
def test_request_parser_refuses(line: bytes, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_request(line)


@given(st.binary(max_size=300))
def test_request_parser_only_ever_raises_valueerror(line: bytes) -> None:
    with contextlib.suppress(ValueError):
        assert parse_request(line) == "status"


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"v": 2},
        {"v": 1, "kbs": [], "measure": {}, "volumes": []},
        {"v": 1, "kbs": {}, "measure": {}, "volumes": {}},
        {"v": 1, "kbs": {}, "measure": {}, "volumes": [{"kind": "other"}]},
        {"v": 1, "kbs": {}, "measure": {}, "volumes": [{"kind": "contract", "seq": "1"}]},
        {"v": 1, "kbs": {}, "measure": {}, "volumes": [{"kind": "contract", "seq": True}]},
        {"v": 1, "kbs": {}, "measure": {}, "volumes": [{"kind": "contract", "holders": [1]}]},
        {"v": 1, "kbs": {"token_expires": "x"}, "measure": {}, "volumes": []},
    ],
)
def test_report_parser_refuses_what_is_not_a_report(doc: dict[str, object]) -> None:
    with pytest.raises(ReportError):
        report_from_json(doc)


async def _serve(path: Path, uids: frozenset[int] | None = None) -> ControlServer:
    async def status() -> dict[str, object]:
        return {"v": 1, "version": "x", "kbs": {"state": "none"}, "measure": {}, "volumes": []}

    server = ControlServer(path, status)
    if uids is not None:
        server._allowed_uids = uids
    await server.start()
    return server


async def test_socket_answers_status_and_refuses_other_users(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    server = await _serve(path)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        answer = await asyncio.to_thread(request, path, "status")
        assert answer["kbs"] == {"state": "none"}

        def raw(data: bytes) -> dict[str, object]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                doc = json.loads(s.makefile("rb").read())
                assert isinstance(doc, dict)
                return doc

        bad = await asyncio.to_thread(raw, b'{"v": 1, "request": "prepare"}\n')
        assert bad == {"ok": False, "error": 'unknown request (known: "status")'}
        huge = await asyncio.to_thread(raw, b"x" * 100_000 + b"\n")
        assert huge["ok"] is False
    finally:
        await server.close()
    assert not path.exists()
    strict = await _serve(path, frozenset({os.geteuid() + 1}))
    try:
        with pytest.raises(ControlError, match="root only"):
            await asyncio.to_thread(request, path, "status")
    finally:
        await strict.close()


def test_client_names_a_missing_daemon(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is cva serve running"):
        request(tmp_path / "none.sock", "status")
