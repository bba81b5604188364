"""CDH SecureMount over ttRPC in the VM (issue 9 item 4): kata-agent's call, made by containerd's
own Go ttrpc client inside the guest, against cva on the CDH socket.

The topology is kata-agent -> CDH: the client binary (tests/ttrpc_client, built static on the
host) runs in the guest, dials `unix:///run/confidential-containers/cdh.sock`, and sends an
`api.SecureMountRequest` built on the host with cva's own protobuf module. One boot:

- refused (while nothing is open): a key the contract does not name, and an ephemeral request
  for the contract's disk; the status names the rule;
- persistent: the contract's volume (for every container: `containers = []`) on its disk, by
  deviceId, with its kbs:/// key: created, mounted as ext4 at the request's mount point, written
  through; a second identical call answers OK; an ephemeral request for the (now open)
  contract disk is refused;
- refused before any device is touched (issue 13): kata's emptyDir request aimed at every
  mount point outside the allow-list (`/run`, `/run/kata-containers`, `/run/systemd/system`,
  `/var/lib`, `/root`, cva's venv, ...): PERMISSION_DENIED naming the mount-point rule, no dm
  device, no mount, and that disk still all-zero after poweroff;
- ephemeral: kata-agent's two real requests (SPEC e.5), exactly as it sends them, on two more
  blank disks the contract does not name: the block emptyDir at
  `/run/kata-containers/sandbox/storage/<base64url(source)>` (dataIntegrity=false) and the trusted
  image storage at `/run/kata-containers/image/` -- with kata's trailing slash -- (`-E
  lazy_journal_init`, dataIntegrity=true): mounted as ext4, written through, a repeated call
  answers OK, no LUKS header on the disk (it is detached in guest tmpfs), and released by cva
  once the mount point is unmounted;
- after poweroff the host scans every raw image: no plaintext marker anywhere.

The tests share the guest and run in file order. The run folder (printed first) keeps the
console, the KBS log and the guest journal (`journal-boot1.log`); the disk images are dropped
unless CVA_VM_KEEP=1.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent._proto.cdh import api_pb2
from agent.rpc.ttrpc import Code
from agent.securemount.decisions import (
    CDH_SOCKET_PATH,
    EPHEMERAL_MAPPER_PREFIX,
    SECURE_MOUNT_METHOD,
)
from tests.ttrpc_peer import GoCall, GoResult, go_job, parse_go_results
from tests.vm import preflight
from tests.vm.build import ensure_image
from tests.vm.e2e import Guest, Scenario, World, key_forms_in
from tests.vm.machine import BootResult

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(900)]

EPH_PLAIN = "cvaeph1"  # ephemeral, dataIntegrity=false
EPH_INTEGRITY = "cvaeph2"  # ephemeral, dataIntegrity=true
EPH_HOSTILE = "cvaeph3"  # only ever named by requests for hostile mount points: stays all-zero
SCENARIO = Scenario(
    container_id="e2e-sm-0001",
    volume="persist",
    serial="cvapersist",
    key_uri="kbs:///cva/e2e/persist",
    lvm=False,
    disk_bytes=512 * 1024**2,
    allow=("SecureMount", "SecureMountEphemeral"),
    containers=(),  # SecureMount refuses volumes limited to named containers
    ttrpc=f"unix://{CDH_SOCKET_PATH}",
    extra_disks=(EPH_PLAIN, EPH_INTEGRITY, EPH_HOSTILE),
)
CLIENT = "/mnt/vmjob/cva-ttrpc-client"  # the job folder (9p) in the guest
SANDBOX_STORAGE = "/run/kata-containers/sandbox/storage"  # kata's block emptyDir mounts


def kata_storage_path(source: str) -> str:
    """The mount point kata's Go runtime gives a block emptyDir: base64url of its source."""
    return f"{SANDBOX_STORAGE}/{base64.urlsafe_b64encode(source.encode()).decode()}"


PERSIST_MOUNT = kata_storage_path("/dev/disk/by-id/virtio-cvapersist")
IMAGE_STORE_SENT = "/run/kata-containers/image/"  # kata-agent sends its KATA_IMAGE_WORK_DIR so
EPH_MOUNTS = {  # where the volume is mounted (the request's path, normalised)
    EPH_PLAIN: kata_storage_path("/dev/disk/by-id/virtio-cvaeph1"),
    EPH_INTEGRITY: "/run/kata-containers/image",
}
EPH_SENT = {EPH_PLAIN: EPH_MOUNTS[EPH_PLAIN], EPH_INTEGRITY: IMAGE_STORE_SENT}
REFUSED_MOUNTS = (kata_storage_path("refused-1"), kata_storage_path("refused-2"))
# issue 13: every one of these was accepted on main (a fresh, container-writable filesystem
# there hides cva's state, plants bundles or shadows the Python packages cva imports)
HOSTILE_MOUNTS = (
    "/run",
    "/run/kata-containers",
    "/run/kata-containers/",
    "/run/confidential-containers",
    "/run/systemd/system",
    "/var/lib",
    "/root",
    "/opt/venv/lib",
    "/opt/venv/lib/python3.11/site-packages",
    "/run/cva",
    "/run/kata-containers/sandbox/storage",
    "/run/kata-containers/image//",
    "/run/kata-containers/sandbox/storage/../../image",
)
STATE_DIR = "/run/cva"  # cva's state_dir (tmpfs); detached headers are <mapper>.header in it
MARKER = b"cva-sm-plaintext-" + secrets.token_hex(12).encode()
LUKS_MAGICS = (b"LUKS\xba\xbe", b"SKUL\xba\xbe")  # primary and secondary LUKS2 header
# kata-agent's options for an encrypted block emptyDir (SPEC e.5), minus deviceId / integrity
KATA_EMPTYDIR = {
    "sourceType": "empty",
    "targetType": "fileSystem",
    "filesystemType": "ext4",
    "mkfsOpts": "-O ^has_journal -m 0 -i 163840 -I 128",
    "encryptionType": "luks2",
}
# ... and for its trusted image storage (SPEC e.5), minus deviceId / integrity
KATA_IMAGE_STORE = {**KATA_EMPTYDIR, "mkfsOpts": "-E lazy_journal_init"}
KATA_OPTIONS = {EPH_PLAIN: KATA_EMPTYDIR, EPH_INTEGRITY: KATA_IMAGE_STORE}
RELEASE_WAIT = 60.0  # cva releases an ephemeral volume this soon after its mount point is gone
WRITTEN: set[str] = set()  # disks a test wrote MARKER to through a SecureMount
REPEATED: dict[str, GoResult] = {}  # serial -> the answer to a repeated ephemeral SecureMount


@pytest.fixture(scope="module")
def world(go_ttrpc_client: Path) -> Iterator[World]:
    missing = preflight.missing_tools()
    if missing:
        message = preflight.missing_message(missing)
        if preflight.in_ci():
            pytest.fail(message)
        pytest.skip(message)
    run_dir = Path(tempfile.mkdtemp(prefix="cva-e2e-sm-"))
    print(f"e2e: run folder {run_dir}")
    w = World(run_dir=run_dir, scenario=SCENARIO, image=ensure_image())
    job = run_dir / "job"
    job.mkdir(parents=True, exist_ok=True)
    shutil.copy(go_ttrpc_client, job / "cva-ttrpc-client")
    (job / "cva-ttrpc-client").chmod(0o755)
    try:
        yield w
    finally:
        w.kbs_down()
        if os.environ.get("CVA_VM_KEEP") != "1":
            shutil.rmtree(run_dir / "disks", ignore_errors=True)  # logs stay


@pytest.fixture(scope="module")
def guest(world: World) -> Iterator[Guest]:
    g = world.boot()
    try:
        g.wait_cva()
        world.kbs_up()
        yield g
    finally:
        if g.result is None:  # still up (the poweroff test saves it itself)
            save_journal(world, g)
        g.kill()


def save_journal(world: World, guest: Guest) -> None:
    """The whole guest journal of this boot into the run folder (for a failure's post-mortem)."""
    path = world.run_dir / f"journal-boot{guest.number}.log"
    try:
        path.write_text(guest.journal(unit=None))
    except (OSError, ValueError) as exc:
        print(f"e2e: could not save the guest journal: {exc}")
    else:
        print(f"e2e: guest journal in {path}")


# --- helpers ----------------------------------------------------------------------------------
def secure_mount(
    guest: Guest, *requests: tuple[dict[str, str], str], deadline: float = 280.0
) -> list[GoResult]:
    """kata-agent's SecureMount calls (options, mount_point), all on one connection of the Go
    ttrpc client that runs in the guest."""
    service, method = SECURE_MOUNT_METHOD.split("/")
    calls = [
        GoCall(
            service,
            method,
            api_pb2.SecureMountRequest(
                volume_type="block-device", options=options, mount_point=mount_point
            ).SerializeToString(),
        )
        for options, mount_point in requests
    ]
    job = go_job(CDH_SOCKET_PATH, calls, deadline_ms=int(deadline * 1000))
    done = guest.control.run([CLIENT], input=job, timeout=deadline + 30).check()
    return parse_go_results(done.stdout)


def ok(guest: Guest, result: GoResult, mount_point: str) -> None:
    if (result.code, result.message, result.transport_error) != (0, "", ""):
        tail = "\n".join(guest.journal().splitlines()[-15:])
        raise AssertionError(f"SecureMount failed: {result}\n--- cva's journal (tail):\n{tail}")
    assert api_pb2.SecureMountResponse.FromString(result.payload).mount_path == mount_point


def device_id(guest: Guest, serial: str) -> str:
    """MAJ:MIN (decimal, as kata-agent sends it) of the guest's virtio disk with this serial."""
    out = guest.control.run(["stat", "-L", "-c", "%t:%T", f"/dev/disk/by-id/virtio-{serial}"])
    major, minor = (int(part, 16) for part in out.check().stdout.strip().split(":"))  # hex
    return f"{major}:{minor}"


def mounted(guest: Guest, path: str) -> tuple[str, str]:
    """(fstype, source) of what is mounted at `path`, ("", "") when nothing is."""
    out = guest.control.run(["findmnt", "-n", "-J", "-o", "FSTYPE,SOURCE", "--mountpoint", path])
    if out.rc != 0:
        return "", ""
    (fs,) = json.loads(out.stdout)["filesystems"]
    return fs["fstype"], fs["source"]


def write_marker(guest: Guest, mount_point: str) -> None:
    path = f"{mount_point}/marker.txt"
    guest.control.run(["tee", path], input=MARKER.decode()).check()
    guest.control.run(["sync", "-f", path]).check()
    assert guest.control.run(["cat", path]).check().stdout == MARKER.decode()


def dm_names(guest: Guest) -> list[str]:
    out = guest.control.run(["dmsetup", "ls"]).check().stdout
    return [
        line.split()[0] for line in out.splitlines() if line.strip() and "No devices" not in line
    ]


def find_headers(guest: Guest, mapper: str) -> list[str]:
    out = guest.control.run(["find", STATE_DIR, "-xdev", "-name", f"{mapper}.header"]).check()
    return out.stdout.split()


def disk_head(guest: Guest, serial: str, size: int = 4096) -> bytes:
    out = guest.control.sh(
        f"head -c {size} /dev/disk/by-id/virtio-{serial} | od -An -v -tx1", timeout=30
    )
    return bytes.fromhex("".join(out.check().stdout.split()))


def persistent_options(guest: Guest) -> dict[str, str]:
    """What kata-agent would send for the contract volume's disk (SPEC e.2)."""
    return {
        "deviceId": device_id(guest, SCENARIO.serial),
        "sourceType": "empty",
        "encryptionType": "luks2",
        "key": SCENARIO.key_uri,
        "targetType": "fileSystem",
        "filesystemType": "ext4",
    }


# --- boot 1 -----------------------------------------------------------------------------------
def test_cva_listens_on_the_cdh_socket(guest: Guest) -> None:
    mode = guest.control.run(["stat", "-c", "%F %a", CDH_SOCKET_PATH]).check().stdout.strip()
    assert mode == "socket 600"
    assert f"ttrpc+unix:{CDH_SOCKET_PATH}" in guest.journal()


def test_refused_secure_mounts_name_the_rule(guest: Guest) -> None:
    """Before anything is open: a key the contract does not name, and an ephemeral volume on the
    contract's disk (it would format it)."""
    not_in_contract = {
        "deviceId": device_id(guest, EPH_PLAIN),
        "sourceType": "empty",
        "key": "kbs:///cva/e2e/not-in-contract",
    }
    ephemeral_on_contract_disk = {
        **KATA_EMPTYDIR,
        "deviceId": device_id(guest, SCENARIO.serial),
        "dataIntegrity": "false",
    }
    results = secure_mount(
        guest,
        (not_in_contract, REFUSED_MOUNTS[0]),
        (ephemeral_on_contract_disk, REFUSED_MOUNTS[1]),
    )
    assert [(r.code, r.message.split(":")[0]) for r in results] == [
        (Code.PERMISSION_DENIED, "SecureMount refused (key-not-in-contract)"),
        (Code.PERMISSION_DENIED, "SecureMount refused (contract-disk)"),
    ], results
    for mount_point in REFUSED_MOUNTS:
        assert mounted(guest, mount_point) == ("", "")
    assert dm_names(guest) == []


def test_hostile_mount_points_are_refused_before_any_device_is_touched(guest: Guest) -> None:
    """issue 13: kata's exact emptyDir request, aimed outside the allow-list, all on one
    connection: each refused naming the mount-point rule; no dm device, no new mount, and the
    disk stays all-zero (checked here and on the raw image after poweroff)."""
    options = {**KATA_EMPTYDIR, "deviceId": device_id(guest, EPH_HOSTILE), "dataIntegrity": "true"}
    mounts_before = guest.control.run(["findmnt", "-rn", "-o", "TARGET,SOURCE"]).check().stdout
    results = secure_mount(guest, *((options, where) for where in HOSTILE_MOUNTS))
    got = [(r.code, r.message.split(":")[0]) for r in results]
    assert got == [
        (
            Code.INVALID_ARGUMENT if "//" in where or ".." in where else Code.PERMISSION_DENIED,
            "SecureMount refused (mount-point)",
        )
        for where in HOSTILE_MOUNTS
    ], results
    assert dm_names(guest) == []
    mounts_after = guest.control.run(["findmnt", "-rn", "-o", "TARGET,SOURCE"]).check().stdout
    assert mounts_after == mounts_before
    assert disk_head(guest, EPH_HOSTILE, 65536) == bytes(65536)
    assert "securemount_ephemeral" not in guest.journal()


def test_persistent_secure_mount_creates_the_contract_volume_and_mounts_ext4(guest: Guest) -> None:
    options = persistent_options(guest)
    started = time.monotonic()
    [result] = secure_mount(guest, (options, PERSIST_MOUNT))
    print(f"e2e: persistent SecureMount took {time.monotonic() - started:.1f} s")
    ok(guest, result, PERSIST_MOUNT)
    fstype, source = mounted(guest, PERSIST_MOUNT)
    assert fstype == "ext4"
    assert source.startswith("/dev/mapper/")
    write_marker(guest, PERSIST_MOUNT)
    WRITTEN.add(SCENARIO.serial)


def test_a_second_identical_persistent_secure_mount_is_idempotent(guest: Guest) -> None:
    """kata-agent retries; a restarted pod asks again: OK, and nothing changes."""
    if SCENARIO.serial not in WRITTEN:
        pytest.skip("the persistent SecureMount failed (see its test)")
    before = mounted(guest, PERSIST_MOUNT)
    [again] = secure_mount(guest, (persistent_options(guest), PERSIST_MOUNT))
    ok(guest, again, PERSIST_MOUNT)
    assert mounted(guest, PERSIST_MOUNT) == before


def test_an_ephemeral_request_for_the_open_contract_disk_is_refused(guest: Guest) -> None:
    if SCENARIO.serial not in WRITTEN:
        pytest.skip("the persistent SecureMount failed (see its test)")
    options = {**KATA_EMPTYDIR, "deviceId": device_id(guest, SCENARIO.serial)}
    [result] = secure_mount(guest, (options, REFUSED_MOUNTS[1]))
    assert result.code in (Code.PERMISSION_DENIED, Code.FAILED_PRECONDITION), result
    assert mounted(guest, REFUSED_MOUNTS[1]) == ("", "")
    path = f"{PERSIST_MOUNT}/marker.txt"
    assert guest.control.run(["cat", path]).check().stdout == MARKER.decode()
    listing = guest.control.run(["findmnt", "-n", "--mountpoint", PERSIST_MOUNT]).check()
    assert len(listing.stdout.splitlines()) == 1, f"mounted twice:\n{listing.stdout}"
    path = f"{PERSIST_MOUNT}/marker.txt"
    assert guest.control.run(["cat", path]).check().stdout == MARKER.decode()


@pytest.mark.parametrize(
    ("serial", "integrity"),
    [(EPH_PLAIN, "false"), (EPH_INTEGRITY, "true")],
    ids=["emptydir-plain", "image-store-dif"],
)
def test_ephemeral_secure_mount_then_umount_releases_it(
    guest: Guest, serial: str, integrity: str
) -> None:
    mount_point, sent = EPH_MOUNTS[serial], EPH_SENT[serial]
    options = {
        **KATA_OPTIONS[serial],
        "deviceId": device_id(guest, serial),
        "dataIntegrity": integrity,
    }
    before = set(dm_names(guest))
    aead_before = aead_lines(guest)
    started = time.monotonic()
    [result] = secure_mount(guest, (options, sent))
    print(f"e2e: ephemeral SecureMount (dataIntegrity={integrity}) took "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip
    ok(guest, result, mount_point)
    fstype, source = mounted(guest, mount_point)
    assert fstype == "ext4"
    mapper = source.removeprefix("/dev/mapper/")
    assert mapper.startswith(EPHEMERAL_MAPPER_PREFIX), source
    new = set(dm_names(guest)) - before
    assert mapper in new
    write_marker(guest, mount_point)
    WRITTEN.add(serial)
    # kata-agent may ask again: judged in its own test below; either way nothing may change.
    [REPEATED[serial]] = secure_mount(guest, (options, sent))
    assert mounted(guest, mount_point) == (fstype, source)
    assert set(dm_names(guest)) - before == new
    # The LUKS2 header is detached, in guest tmpfs: the disk itself carries none.
    head = disk_head(guest, serial)
    assert not head.startswith(LUKS_MAGICS[0]), "a LUKS header is on the ephemeral disk"
    headers = find_headers(guest, mapper)
    assert len(headers) == 1, f"no single detached header {mapper}.header in {STATE_DIR}"
    fs_of_header = guest.control.run(["stat", "-f", "-c", "%T", headers[0]]).check()
    assert fs_of_header.stdout.strip() == "tmpfs"
    if integrity == "true":
        table = guest.control.run(["dmsetup", "table", mapper]).check().stdout
        assert "integrity" in table or any("integrity" in n or "_dif" in n for n in new), table

    # kata-agent unmounts the emptyDir when the pod goes; cva notices and closes the volume.
    guest.control.run(["umount", sent]).check()
    deadline = time.monotonic() + RELEASE_WAIT
    left = leftovers(guest, mapper, new)
    while left and time.monotonic() < deadline:
        time.sleep(2)
        left = leftovers(guest, mapper, new)
    assert not left, (
        f"cva did not release the ephemeral volume within {RELEASE_WAIT:.0f} s of the umount: "
        f"{left}\n{guest.journal()[-3000:]}"
    )
    assert mounted(guest, mount_point) == ("", "")
    # issue 21 item 5: nothing read a block nothing wrote (kata's default dataIntegrity=true)
    new_aead = aead_lines(guest)[len(aead_before) :]
    assert not new_aead, f"{len(new_aead)} INTEGRITY AEAD ERROR lines: {new_aead[:4]}"


def aead_lines(guest: Guest) -> list[str]:
    """The guest kernel log's "INTEGRITY AEAD ERROR" lines so far (after udev settled)."""
    guest.control.run(["udevadm", "settle", "--timeout=30"])
    dmesg = guest.control.run(["dmesg"]).check().stdout
    return [line for line in dmesg.splitlines() if "AEAD ERROR" in line]


def leftovers(guest: Guest, mapper: str, dm: set[str]) -> list[str]:
    """What remains of an ephemeral volume: its dm devices, mounts and detached header."""
    left = [f"dm {name}" for name in sorted(dm & set(dm_names(guest)))]
    mounts = guest.control.run(["findmnt", "-n", "-o", "TARGET", "-S", f"/dev/mapper/{mapper}"])
    left += [f"mount {target}" for target in mounts.stdout.split()]
    left += [f"header {path}" for path in find_headers(guest, mapper)]
    return left


@pytest.mark.parametrize(
    "serial", [EPH_PLAIN, EPH_INTEGRITY], ids=["emptydir-plain", "image-store-dif"]
)
def test_a_repeated_ephemeral_secure_mount_answers_ok(guest: Guest, serial: str) -> None:
    """README: repeating a SecureMount already in place answers OK (asked while it was)."""
    if serial not in REPEATED:
        pytest.skip(f"the ephemeral SecureMount on {serial} failed (see its test)")
    ok(guest, REPEATED[serial], EPH_MOUNTS[serial])


def test_journal_holds_no_key_bytes(world: World, guest: Guest) -> None:
    journal = guest.journal(unit=None)
    assert "kbs resource fetched" in journal
    leaked = key_forms_in(journal, world.key)
    assert not leaked, f"the journal holds the volume key ({', '.join(leaked)})"


# --- after poweroff: the raw disk images --------------------------------------------------------
@pytest.fixture(scope="module")
def powered_off(world: World, guest: Guest) -> BootResult:
    save_journal(world, guest)
    result = guest.poweroff()
    assert result.finished, result.failure()
    return result


def test_the_persistent_disk_holds_ciphertext_only(world: World, powered_off: BootResult) -> None:
    if SCENARIO.serial not in WRITTEN:
        pytest.skip("the persistent SecureMount failed (see its test)")
    assert world.marker_count(MARKER) == 0, "the plaintext marker is on the raw disk"
    assert world.marker_count(LUKS_MAGICS[0]) >= 1, "no LUKS2 header on the contract disk"


@pytest.mark.parametrize(
    "serial", [EPH_PLAIN, EPH_INTEGRITY], ids=["emptydir-plain", "image-store-dif"]
)
def test_an_ephemeral_disk_holds_neither_plaintext_nor_a_luks_header(
    world: World, powered_off: BootResult, serial: str
) -> None:
    if serial not in WRITTEN:
        pytest.skip(f"the ephemeral SecureMount on {serial} failed (see its test)")
    disk = world.extra_disks[serial]
    with disk.path.open("rb") as handle:
        assert not handle.read(len(LUKS_MAGICS[0])).startswith(LUKS_MAGICS[0])
    assert world.marker_count(MARKER, disk) == 0, "the plaintext marker is on the raw disk"
    for magic in LUKS_MAGICS:
        assert world.marker_count(magic, disk) == 0, f"a LUKS2 header ({magic!r}) is on the disk"
    assert not world.disk_is_all_zero(disk), "nothing was written to the ephemeral disk"


def test_the_disk_of_the_hostile_requests_is_untouched(
    world: World, powered_off: BootResult
) -> None:
    assert world.disk_is_all_zero(world.extra_disks[EPH_HOSTILE]), "a refused request wrote"
