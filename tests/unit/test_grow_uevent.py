"""agent.grow: the kernel uevent parser (hostile input) and the debounced watcher (issue 26 #4)."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from agent.grow import uevent
from agent.grow.watcher import GrowWatcher, volumes_on

RESIZE = (
    b"change@/devices/pci0000:00/0000:00:05.0/virtio3/block/vdb\0ACTION=change\0"
    b"DEVPATH=/devices/pci0000:00/0000:00:05.0/virtio3/block/vdb\0SUBSYSTEM=block\0RESIZE=1\0"
    b"MAJOR=253\0MINOR=16\0DEVNAME=vdb\0DEVTYPE=disk\0DISKSEQ=9\0SEQNUM=2321\0"
)


def test_a_virtio_resize_event_names_its_disk() -> None:
    assert uevent.block_resize(RESIZE) == uevent.BlockResize("253:16", "vdb")
    loop = RESIZE.replace(b"253", b"7").replace(b"MINOR=16", b"MINOR=0")
    assert uevent.block_resize(loop) == uevent.BlockResize("7:0", "vdb")


def test_everything_else_is_ignored() -> None:
    cases = [
        RESIZE.replace(b"RESIZE=1\0", b""),  # a plain change (e.g. media change)
        RESIZE.replace(b"RESIZE=1", b"RESIZE=0"),
        RESIZE.replace(b"change@", b"add@").replace(b"ACTION=change", b"ACTION=add"),
        RESIZE.replace(b"ACTION=change", b"ACTION=remove"),  # header and field disagree
        RESIZE.replace(b"SUBSYSTEM=block", b"SUBSYSTEM=net"),
        RESIZE.replace(b"MAJOR=253", b"MAJOR=-1"),
        RESIZE.replace(b"MINOR=16", b"MINOR=99999999"),
        RESIZE.replace(b"MINOR=16\0", b""),
        RESIZE + b"MAJOR=8\0",  # duplicate key
        RESIZE.replace(b"DEVNAME=vdb", b"DEVNAME=v\xffdb"),
        RESIZE.replace(b"DEVNAME=vdb", b"devname=vdb"),
        RESIZE.replace(b"DEVNAME=vdb", b"DEVNAMEvdb"),
        b"libudev\0" + RESIZE,
        RESIZE.replace(b"change@", b"change"),
        RESIZE + b"X=" + b"a" * 9000 + b"\0",
        RESIZE + b"".join(b"K%d=1\0" % i for i in range(70)),
        b"",
        b"\0\0\0",
    ]
    for data in cases:
        assert uevent.block_resize(data) is None, data[:80]


@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    result = uevent.block_resize(data)
    assert result is None or result.devno.count(":") == 1


@given(
    st.lists(
        st.tuples(
            st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", min_size=0, max_size=40),
            st.text(st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=60),
        ),
        max_size=80,
    )
)
def test_field_lists_never_raise(fields: list[tuple[str, str]]) -> None:
    body = b"".join(f"{k}={v}".encode("utf-8", "surrogatepass") + b"\0" for k, v in fields)
    parsed = uevent.parse_uevent(b"change@/x\0ACTION=change\0" + body)
    if parsed is not None:
        assert all(len(v) <= 1024 and v.isascii() for v in parsed.values())


def test_volumes_on_matches_by_devno_only() -> None:
    mounted = [("a", "/dev/mapper/cva_a"), ("b", "/dev/mapper/cva_b"), ("c", "/dev/mapper/x")]
    devnos = {"/dev/mapper/cva_a": "253:16", "/dev/mapper/cva_b": "253:32"}
    assert volumes_on("253:16", mounted, devnos.get) == ["a"]
    assert volumes_on("8:0", mounted, devnos.get) == []


async def test_watcher_debounces_a_burst_into_one_grow_and_ignores_other_disks() -> None:
    calls: list[str] = []
    release = asyncio.Event()

    async def grow(name: str) -> object:
        calls.append(name)
        await release.wait()
        return None

    w = GrowWatcher(
        lambda: [("data", "/dev/mapper/cva_data")],
        grow,
        {"/dev/mapper/cva_data": "253:16"}.get,
        debounce=0.01,
    )
    for _ in range(20):
        w.feed(RESIZE)
    w.feed(RESIZE.replace(b"MINOR=16", b"MINOR=32"))  # another disk: nothing mounted there
    w.feed(b"garbage")
    for _ in range(50):
        await asyncio.sleep(0.01)
        if calls:
            break
    assert calls == ["data"]
    w.feed(RESIZE)  # while it runs: one follow-up at most
    w.feed(RESIZE)
    release.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(calls) == 2:
            break
    await w.aclose()
    assert calls == ["data", "data"]


async def test_a_failing_grow_does_not_stop_the_watcher() -> None:
    calls: list[str] = []

    async def grow(name: str) -> object:
        calls.append(name)
        raise RuntimeError("boom")

    w = GrowWatcher(lambda: [("d", "/dev/m")], grow, lambda _d: "253:16", debounce=0.0)
    w.feed(RESIZE)
    for _ in range(50):
        await asyncio.sleep(0.01)
        if calls:
            break
    w.feed(RESIZE)
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(calls) == 2:
            break
    await w.aclose()
    assert calls == ["d", "d"]
