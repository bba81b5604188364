"""cva end to end in the VM (issue 7 item 6), driven from the host like the kata runtime would.

One guest boot runs the scenarios in order (they share the VM, the disk and the KBS), then the
guest reboots on the same disks for the persistence check: two boots in all. The contract
allows PrepareVolumes and ReleaseVolumes only, so ListVolumes is the policy-denied RPC.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm import preflight
from tests.vm.build import ensure_image
from tests.vm.e2e import Guest, Scenario, World, key_forms_in

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(900)]

# lvm.size = "max": the host grows the data disk under the mounted volume (issue 26 #4)
SCENARIO = Scenario(allow=("PrepareVolumes", "ReleaseVolumes"), lvm_size="max")
GROWN_DISK_BYTES = 2 * 1024**3
MARKER = b"cva-e2e-plaintext-" + secrets.token_hex(12).encode()
FILE = "hello.txt"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    missing = preflight.missing_tools()
    if missing:
        message = preflight.missing_message(missing)
        if preflight.in_ci():
            pytest.fail(message)
        pytest.skip(message)
    run_dir = Path(tempfile.mkdtemp(prefix="cva-e2e-"))
    print(f"e2e: run folder {run_dir}")
    w = World(run_dir=run_dir, scenario=SCENARIO, image=ensure_image())
    try:
        yield w
    finally:
        w.kbs_down()


@pytest.fixture(scope="module")
def guest(world: World) -> Iterator[Guest]:
    g = world.boot()
    try:
        g.wait_cva()
        yield g
    finally:
        g.kill()


class Background:
    """Run a blocking call in a thread; `.result()` returns its value or raises its error."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn: Any, *args: Any) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # handed to the test thread
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = 300.0) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the background call did not finish")
        if self._error is not None:
            raise self._error
        return self._value


def _prepare(guest: Guest) -> Any:
    with guest.client() as client:
        return client.prepare(SCENARIO.container_id)  # type: ignore[attr-defined]


def _release(guest: Guest) -> Any:
    with guest.client() as client:
        return client.release(SCENARIO.container_id)  # type: ignore[attr-defined]


def _wait_journal(guest: Guest, text: str, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        journal = guest.journal()
        if text in journal:
            return journal
        time.sleep(1)
    raise AssertionError(f"{text!r} never appeared in cva's journal:\n{guest.journal()[-3000:]}")


def _mounted_at(guest: Guest, path: str) -> str:
    """The source device mounted at `path` in the guest, or "" when nothing is."""
    out = guest.control.run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", path])
    return out.stdout.strip()


# --- boot 1 ---------------------------------------------------------------------------------
def test_cva_runs_as_a_notify_service_and_serves_health(guest: Guest) -> None:
    show = guest.control.run(
        ["systemctl", "show", "-p", "Type", "-p", "ActiveState", "cva.service"]
    ).stdout
    assert "Type=notify" in show
    assert "ActiveState=active" in show
    assert "trust_established" in guest.journal()


def _events(guest: Guest, event: str) -> list[dict[str, Any]]:
    """cva's journal events named `event` (its JSON log lines), oldest first."""
    found = []
    for line in guest.journal().splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and doc.get("event") == event:
                found.append(doc)
    return found


def _vsock_connections(guest: Guest) -> list[dict[str, Any]]:
    """One `vsock_connection` event per AF_VSOCK connection cva's listener accepted."""
    return _events(guest, "vsock_connection")


def test_grpc_reaches_cva_only_over_its_vsock_listener_and_the_peer_cid_is_logged(
    guest: Guest,
) -> None:
    """Production's transport: gRPC on vsock port 1040 (spliced into the private socket), no
    unix/tcp extra listener; the host's calls arrive over AF_VSOCK (vsock_loopback, CID 1)."""
    from agent.config import parse_config

    config = parse_config(guest.control.run(["cat", "/etc/cva/config.toml"]).check().stdout)
    assert config.listen.vsock_port == 1040
    assert (config.listen.unix, config.listen.tcp, config.listen.ttrpc) == (None, None, None)
    ready = _events(guest, "ready")
    # only private unix sockets besides vsock: gRPC, the prestart hook's, `cva status`'s
    assert ready and ready[-1]["addresses"] == [
        "unix:/run/cva/grpc.sock",
        "hook+unix:/run/cva/hook.sock",
        "control+unix:/run/cva/control.sock",
    ]
    assert ready[-1]["vsock_port"] == 1040
    before = len(_vsock_connections(guest))
    guest.wait_cva(timeout=30)  # a Health call on a fresh channel
    events = _vsock_connections(guest)
    assert len(events) > before, "the Health call did not arrive through cva's vsock listener"
    assert {e["peer_cid"] for e in events} == {1}, events[-3:]
    assert all(isinstance(e.get("peer_port"), int) for e in events)


def test_rpc_not_allowed_by_the_contract_gets_permission_denied(guest: Guest) -> None:
    import grpc

    from agent.rpc.client import RpcFailed

    before = len(_vsock_connections(guest))
    with guest.client(timeout=30) as client, pytest.raises(RpcFailed) as caught:
        client.list()  # type: ignore[attr-defined]
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "\n" not in str(caught.value)
    assert len(_vsock_connections(guest)) > before  # ListVolumes came over AF_VSOCK


def test_kbs_denying_the_key_is_a_clean_error_and_formats_nothing(
    world: World, guest: Guest
) -> None:
    import grpc

    from agent.rpc.client import RpcFailed

    world.kbs_up(deny=True)
    with pytest.raises(RpcFailed) as caught:
        _prepare(guest)
    assert caught.value.code in (
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert "\n" not in str(caught.value)
    assert world.disk_is_all_zero(), "the data disk was written after a KBS denial"
    assert _mounted_at(guest, guest.volume_path()) == ""
    assert guest.control.run(["systemctl", "is-active", "cva.service"]).stdout.strip() == "active"


def test_kbs_down_at_first_then_up_retries_and_succeeds(world: World, guest: Guest) -> None:
    world.kbs_down()
    call = Background(_prepare, guest)
    _wait_journal(guest, "kbs transient fault, retrying")
    assert not call.done(), "PrepareVolumes gave up while the KBS was down"
    world.kbs_up()
    answer = call.result()
    assert [v.name for v in answer.volumes] == [SCENARIO.volume]
    vol = answer.volumes[0]
    assert vol.created is True
    assert vol.container_path == SCENARIO.mount
    assert _mounted_at(guest, guest.volume_path()).startswith("/dev/mapper/")


def test_second_prepare_is_idempotent(guest: Guest) -> None:
    answer = _prepare(guest)
    assert [v.name for v in answer.volumes] == [SCENARIO.volume]


def test_data_written_in_the_container_rootfs(guest: Guest) -> None:
    path = f"{guest.volume_path()}/{FILE}"
    guest.control.run(["tee", path], input=MARKER.decode()).check()
    guest.control.run(["sync"]).check()
    assert guest.control.run(["cat", path]).check().stdout == MARKER.decode()


def _fs_size(guest: Guest, path: str) -> int:
    out = guest.control.run(["df", "-B1", "--output=size", path]).check().stdout
    return int(out.split()[-1])


def test_the_host_grows_the_disk_and_the_mounted_volume_grows_online(
    world: World, guest: Guest
) -> None:
    """Issue 26 #4: QMP block_resize of the virtio data disk under the volume cva.service has
    mounted (size = "max"): the kernel's resize uevent makes cva run pvresize, lvextend,
    crypt_resize and resize2fs; the container sees the new size, its data intact, and
    `cva status` shows the grow."""
    path = guest.volume_path()
    before = _fs_size(guest, path)
    assert before > 900 * 1024**2  # "max" on the 1 GiB disk
    guest.machine.resize_disk(SCENARIO.serial, GROWN_DISK_BYTES)
    journal = _wait_journal(guest, "volume grown", timeout=300)
    after = _fs_size(guest, path)
    assert after > before + 900 * 1024**2, (before, after)
    assert guest.control.run(["cat", f"{path}/{FILE}"]).check().stdout == MARKER.decode()
    status = guest.control.run(["/opt/cva/bin/cva", "status", "--json"]).check().stdout
    [vol] = json.loads(status)["volumes"]
    assert vol["grow"] == "grown" and vol["size_bytes"] >= after - 1024**2, vol
    assert "volume not grown" not in journal


def test_release_unbinds_and_closes(guest: Guest) -> None:
    answer = _release(guest)
    assert list(answer.released) == [SCENARIO.volume]
    assert list(answer.closed) == [SCENARIO.volume]
    assert _mounted_at(guest, guest.volume_path()) == ""
    assert _mounted_at(guest, f"/run/cva/volumes/{SCENARIO.volume}") == ""


def test_kill_9_mid_prepare_systemd_restarts_cva_and_the_next_call_completes(
    world: World, guest: Guest
) -> None:
    from agent.rpc.client import RpcFailed

    restarts = guest.restarts()
    pid = guest.main_pid()
    # In the guest: wait for cva to have its key (storage work starts), then SIGKILL it.
    # --since (guest clock, taken now) makes the watcher see the line even if it starts late.
    since = guest.control.run(["date", "+%s"]).check().stdout.strip()
    killer = Background(
        guest.control.sh,
        "grep -m1 -q 'kbs resource fetched' "
        f"< <(timeout 240 journalctl -u cva.service -f --since @{since} -o cat) "
        "&& kill -9 $(systemctl show -p MainPID --value cva.service) && echo killed",
    )
    time.sleep(1.5)  # let the watcher attach, so the kill lands early in the storage work
    first = Background(_prepare, guest)
    assert "killed" in killer.result().stdout
    with pytest.raises(RpcFailed):
        first.result()  # cva died with the call in flight (it was opening the volume)
    deadline = time.monotonic() + 120
    while guest.restarts() == restarts and time.monotonic() < deadline:
        time.sleep(1)
    assert guest.restarts() == restarts + 1
    guest.wait_cva()
    assert guest.main_pid() != pid
    answer = _prepare(guest)
    assert [v.name for v in answer.volumes] == [SCENARIO.volume]
    assert answer.volumes[0].created is False
    path = f"{guest.volume_path()}/{FILE}"
    assert guest.control.run(["cat", path]).check().stdout == MARKER.decode()


def test_every_call_of_this_boot_came_over_vsock(guest: Guest) -> None:
    """PrepareVolumes, ReleaseVolumes, ListVolumes and Health above: cva has no other gRPC
    front than its vsock listener here, and each client channel shows up as one connection."""
    events = _vsock_connections(guest)
    assert len(events) >= 8, f"only {len(events)} vsock connections logged"
    assert {e["peer_cid"] for e in events} == {1}


def test_journal_holds_no_key_bytes(world: World, guest: Guest) -> None:
    journal = guest.journal(unit=None)  # every unit of this boot, cva's restart included
    assert "kbs resource fetched" in journal
    leaked = key_forms_in(journal, world.key)
    assert not leaked, f"the journal holds the volume key ({', '.join(leaked)})"


def test_data_survives_release_reboot_prepare_and_the_disk_is_ciphertext(
    world: World, guest: Guest
) -> None:
    _release(guest)
    result = guest.poweroff()
    assert result.finished, result.failure()
    assert world.marker_count(MARKER) == 0, "the plaintext marker is on the raw disk"
    assert world.marker_count(b"LUKS\xba\xbe") >= 1, "no LUKS2 header on the data disk"
    second = world.boot()
    try:
        second.wait_cva()
        answer = _prepare(second)
        assert answer.volumes[0].created is False
        path = f"{second.volume_path()}/{FILE}"
        assert second.control.run(["cat", path]).check().stdout == MARKER.decode()
        _release(second)
        assert second.poweroff().finished
    finally:
        second.kill()
    assert world.marker_count(MARKER) == 0
