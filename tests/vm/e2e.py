"""cva end to end in the qemu guest, driven from the host (the VM E2E tests and `make demo`).

The host plays both untrusted parties of a real deployment: the kata runtime (it calls cva's
gRPC API over a forwarded port) and the infrastructure (it attaches the disks, starts the VM,
reboots it, and looks at the raw disk images). It also runs the trusted KBS (the loopback
Trustee KBS of tests/kbs/server.py, over TLS with a throwaway CA that the contract pins).

What the guest gets, per boot (the root disk is a throwaway overlay of the suite's image, in
which image/install.sh installed cva as the README tells users: /opt/cva, cva.service wanted by
kata-containers.target, the image's default unit):
- disks: an initdata disk (kata's block format, `agent.initdata.encode_block_image`) holding a
  contract, and a blank data disk whose virtio serial the contract names;
- before cva starts (the job folder's stage.sh, run by the image's cva-vm-stage.service, ordered
  before cva.service): the scenario's `/etc/cva/config.toml` (what an image build would have
  baked in), a fake container bundle `/run/kata-containers/<cid>/{config.json, rootfs/}`;
- cva.service then starts at boot as in a Kata guest, before the stand-in kata-agent.service;
- the test-only TCP front `tests.tools.tcp_forward` (guest NIC port -> AF_VSOCK to CID 1, port
  1040 over the guest's `vsock_loopback`) and `tests.vm.guest_control` (a command channel for
  the host: journal, files, kill -9, poweroff).
The host reaches both through qemu `hostfwd` on 127.0.0.1; the guest reaches the KBS through a
`guestfwd` at 10.0.2.100. No /dev/vhost-vsock exists here, so the host cannot open a vsock to
the guest; the forwarder makes the last hop a real AF_VSOCK connection instead. cva itself is
configured as in production: gRPC on its default vsock listener (port 1040, which splices into
the private unix socket and logs the peer CID) and no unix/tcp extra listener, so every gRPC
call of the E2E (PrepareVolumes, ReleaseVolumes, ListVolumes, Health) goes through cva's real
vsock listener and splice.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from tests.tls import KbsTls, make_test_tls
from tests.vm.build import GuestImage
from tests.vm.machine import (
    FATAL_RES,
    BootResult,
    Disk,
    GuestForward,
    HostForward,
    Machine,
    MachineSpec,
    free_port,
    job_began,
    keep_failed_console,
    make_sparse_disk,
)

REPO = Path(__file__).resolve().parents[2]
KBS_GUEST_ADDR = "10.0.2.100"  # exists only inside qemu's user network (guestfwd)
KBS_GUEST_PORT = 8443
GUEST_GRPC_PORT = 50051  # tests.tools.tcp_forward in the guest
VSOCK_PORT = 1040  # cva's default gRPC vsock port (agent.config.DEFAULT_VSOCK_PORT)
VMADDR_CID_LOCAL = 1  # the guest's vsock_loopback transport
GRPC_TARGET = f"vsock:{VMADDR_CID_LOCAL}:{VSOCK_PORT}"  # where tcp_forward dials
GUEST_CONTROL_PORT = 7000  # tests.vm.guest_control in the guest
INITDATA_SERIAL = "cvainitdata"
JOB_SHARE_RACE = "the vmjob share could not be mounted"  # tests/vm/recipe/cva-vm-job
BOOT_ATTEMPTS = 2  # a guest that fails before its job begins is booted once more

Log = Callable[[str], None]


# --- what the host hands the guest ---------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """One contract, one volume, one container."""

    # The scenario's TEE: the image config's [evidence] tee (sample: with allow_sample = true;
    # the guest has a swtpm but no TDX/SNP device) and the contract's kbs.tee requirement.
    tee: str = "sample"
    container_id: str = "e2e-ctr-0001"
    container_name: str = "app"
    volume: str = "data"
    mount: str = "/data"
    serial: str = "cvadata"
    key_uri: str = "kbs:///cva/e2e/data"
    lvm: bool = True
    # DESIGN's example layout: LVM names the LV's dm device "cva-data"; the crypt mapping
    # ("cva_data") must not collide with it.
    vg: str = "cva"
    lvm_size: str = "512M"  # the contract's lvm.size ("max": the LV takes the VG's free space)
    allow: tuple[str, ...] = ("PrepareVolumes", "ReleaseVolumes", "ListVolumes")
    disk_bytes: int = 1024**3
    kbs_deadline: float = 120.0  # [timeouts] kbs in the daemon config
    # The volume's `containers`: None = [container_name]; () = every container (`containers = []`,
    # what CDH SecureMount needs: it cannot tell which container gets the mount).
    containers: tuple[str, ...] | None = None
    ttrpc: str | None = None  # the daemon config's [listen] ttrpc (None: no ttRPC listener)
    extra_disks: tuple[str, ...] = ()  # serials of more blank disks, not in the contract
    extra_disk_bytes: int = 256 * 1024**2
    extra_volumes: str = ""  # more [[volumes]] tables, appended to the contract as written


def make_kbs_tls(folder: Path, address: str = KBS_GUEST_ADDR) -> KbsTls:
    """A throwaway CA and a server certificate for the KBS at `address` (IP SAN)."""
    return make_test_tls(folder, address, name="kbs")


def contract_text(s: Scenario, ca_pem: str) -> str:
    """The container contract (DESIGN §2) the scenario measures into the initdata."""
    lvm = f'lvm = {{ vg = "{s.vg}", lv = "{s.volume}", size = "{s.lvm_size}" }}\n' if s.lvm else ""
    allow = ", ".join(f'"{name}"' for name in s.allow)
    names = (s.container_name,) if s.containers is None else s.containers
    containers = ", ".join(f'"{name}"' for name in names)
    return (
        "version = 1\n\n[kbs]\n"
        f'url = "https://{KBS_GUEST_ADDR}:{KBS_GUEST_PORT}"\n'
        f'cert = """{ca_pem.strip()}"""\n'
        f'tee = "{s.tee}"\n\n'
        f"[api]\nallow = [{allow}]\n\n"
        "[[volumes]]\n"
        f'name = "{s.volume}"\n'
        f'key = "{s.key_uri}"\n'
        f'disk = "serial:{s.serial}"\n'
        f"{lvm}"
        'filesystem = "ext4"\n'
        f'mount = "{s.mount}"\n'
        f"containers = [{containers}]\n"
        "create = true\n"
        f"{s.extra_volumes}"
    )


def initdata_document(contract: str) -> bytes:
    """A kata initdata document carrying the contract as data."cva.toml"."""
    if "'''" in contract:
        raise ValueError("the contract must not contain ''' (it is embedded as a literal string)")
    return (
        'version = "0.1.0"\nalgorithm = "sha256"\n\n[data]\n'
        f"\"cva.toml\" = '''\n{contract}'''\n"
    ).encode()


DAEMON_CONFIG = """\
[listen]
vsock_port = 1040  # the default, as in production: no unix/tcp extra listener

[timeouts]
kbs = {kbs_deadline}
disk_wait = 60.0

[log]
level = "info"
"""


def evidence_config(tee: str) -> str:
    """The image config's [evidence] section: the image, never the contract, picks the TEE;
    only a test image allows sample, and says so with both keys. A sample image measures no
    volume (`[measure] sink = "none"`): no register of it is attested, and the guest's TPM is
    not the sample TEE's (agent.measure refuses the tpm sink off tee = "tpm")."""
    if tee == "sample":
        return '[evidence]\ntee = "sample"\nallow_sample = true\n\n[measure]\nsink = "none"\n'
    return f"[evidence]\ntee = {json.dumps(tee)}\n"


def daemon_config(s: Scenario) -> str:
    """cva's /etc/cva/config.toml for the scenario (DAEMON_CONFIG, its TEE, its ttRPC listener)."""
    text = DAEMON_CONFIG.format(kbs_deadline=s.kbs_deadline) + "\n" + evidence_config(s.tee)
    if s.ttrpc is not None:
        text = text.replace("[listen]\n", f"[listen]\nttrpc = {json.dumps(s.ttrpc)}\n", 1)
    return text


def oci_config(container_name: str) -> str:
    """The guest-side OCI bundle's config.json (only what cva reads, plus the basics)."""
    doc = {
        "ociVersion": "1.1.0",
        "root": {"path": "rootfs"},
        "annotations": {
            "io.kubernetes.cri.container-name": container_name,
            "io.kubernetes.cri.container-type": "container",
        },
    }
    return json.dumps(doc, indent=2) + "\n"


def stage_script(s: Scenario, boot_number: int, pre_start: str = "") -> str:
    """The guest's stage.sh, run at boot before cva.service starts: the image config, the bundle.

    `pre_start`: shell run last, still before cva starts (e.g. to tamper with PCR8).
    """
    bundle = f"/run/kata-containers/{s.container_id}"
    q = shlex.quote
    return f"""#!/bin/bash
# written by tests/vm/e2e.py (boot {boot_number}); cva-vm-stage.service runs it before cva
set -u
export TPM2TOOLS_TCTI=device:/dev/tpmrm0 HOME=/root
echo "e2e: boot {boot_number}: staging /etc/cva/config.toml and the bundle"
install -D -m 0644 /mnt/vmjob/config.toml /etc/cva/config.toml
mkdir -p {q(bundle)}/rootfs
install -m 0644 /mnt/vmjob/config.json {q(bundle)}/config.json
# no virtio-vsock device (the host has no vhost-vsock): the loopback transport carries the
# E2E's vsock connections (CID 1); cva's listener is the same AF_VSOCK socket either way
modprobe vsock_loopback || echo "e2e: no vsock_loopback module"
{pre_start}
"""


def job_script(s: Scenario, boot_number: int) -> str:
    """The guest's run.sh: cva already started at boot; serve the host's commands."""
    return f"""#!/bin/bash
# written by tests/vm/e2e.py (boot {boot_number})
set -u
export PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONPATH=/mnt/vmsrc PYTHONDONTWRITEBYTECODE=1 HOME=/root
/lib/systemd/systemd-networkd-wait-online --timeout=60 || echo "e2e: no network yet"
systemctl --no-pager status cva.service | head -5
cd /mnt/vmsrc
python -m tests.tools.tcp_forward {GUEST_GRPC_PORT} {GRPC_TARGET} \\
    > /run/tcp_forward.log 2>&1 &
python -m tests.vm.guest_control --port {GUEST_CONTROL_PORT}
rc=$?
systemctl stop cva.service
exit $rc
"""


def key_forms_in(text: str, key: bytes) -> list[str]:
    """Which encodings of `key` (hex, HEX, base64, base64url, latin-1) appear in `text`."""
    forms = {
        "hex": key.hex(),
        "HEX": key.hex().upper(),
        "base64": base64.b64encode(key).decode(),
        "base64url": base64.urlsafe_b64encode(key).decode().rstrip("="),
        "latin-1": key.decode("latin-1"),
    }
    return [name for name, form in forms.items() if form in text]


# --- the host's side of a running guest ---------------------------------------------------
@dataclass(frozen=True)
class Completed:
    rc: int
    stdout: str
    stderr: str

    def check(self) -> Completed:
        if self.rc != 0:
            raise GuestCommandError(f"guest command failed (rc {self.rc}): {self.stderr[-800:]}")
        return self


class GuestCommandError(RuntimeError):
    pass


class GuestControl:
    """Client of tests.vm.guest_control through the hostfwd on 127.0.0.1:port."""

    def __init__(self, port: int) -> None:
        self.port = port

    def _exchange(self, request: dict[str, object], timeout: float) -> dict[str, object]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.settimeout(timeout + 30)
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        if not data:
            raise ConnectionError("the guest control channel closed without an answer")
        answer: dict[str, object] = json.loads(data)
        return answer

    def run(self, argv: list[str], *, timeout: float = 60.0, input: str | None = None) -> Completed:
        doc = self._exchange({"argv": argv, "timeout": timeout, "input": input}, timeout)
        return Completed(int(doc["rc"]), str(doc["stdout"]), str(doc["stderr"]))  # type: ignore[call-overload]

    def sh(self, script: str, *, timeout: float = 60.0) -> Completed:
        return self.run(["bash", "-c", script], timeout=timeout)

    def ping(self) -> bool:
        try:
            return self.run(["true"], timeout=5).rc == 0
        except (OSError, ValueError):
            return False

    def exit(self) -> None:
        self._exchange({"op": "exit"}, 10)


@dataclass
class World:
    """Everything that outlives one boot: disks, TPM state, the KBS, the key, the contract."""

    run_dir: Path
    scenario: Scenario
    image: GuestImage
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    kbs_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        from agent.initdata import encode_block_image, parse_initdata

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tls = make_kbs_tls(self.run_dir / "kbs")
        self.contract = contract_text(self.scenario, self.tls.ca_pem)
        self.initdata_raw = initdata_document(self.contract)
        self.initdata = parse_initdata(self.initdata_raw)
        disks = self.run_dir / "disks"
        initdata_img = make_sparse_disk(disks / f"{INITDATA_SERIAL}.img", 1024**2)
        with initdata_img.open("r+b") as handle:
            handle.write(encode_block_image(self.initdata_raw))
        self.initdata_disk = Disk(initdata_img, INITDATA_SERIAL)
        data_img = make_sparse_disk(disks / f"{self.scenario.serial}.img", self.scenario.disk_bytes)
        self.data_disk = Disk(data_img, self.scenario.serial)
        self.extra_disks = {
            serial: Disk(
                make_sparse_disk(disks / f"{serial}.img", self.scenario.extra_disk_bytes), serial
            )
            for serial in self.scenario.extra_disks
        }
        self.key_file = self.run_dir / "kbs" / "resource.bin"
        self.key_file.write_bytes(self.key)
        self.key_file.chmod(0o600)
        self.kbs: subprocess.Popen[bytes] | None = None
        self.kbs_denying = False
        self.kbs_starts = 0
        self.boots = 0

    # --- the KBS (a process: stopping it must drop every connection) ----------------------
    def kbs_up(self, *, deny: bool = False) -> None:
        """Start the loopback KBS (TLS, the contract's resource; `deny`: policy refuses it)."""
        if self.kbs is not None:
            if self.kbs_denying == deny:
                return
            self.kbs_down()
        self.kbs_starts += 1
        argv = [
            sys.executable, "-m", "tests.vm.e2e_kbs",
            "--port", str(self.kbs_port),
            "--cert", str(self.tls.cert), "--key", str(self.tls.key),
            "--uri", self.scenario.key_uri, "--resource-file", str(self.key_file),
            "--initdata-digest", self.initdata.digest().hex(),
        ]  # fmt: skip
        if deny:
            argv.append("--deny")
        log = self.run_dir / f"kbs-{self.kbs_starts}.log"
        with log.open("wb") as out:
            self.kbs = subprocess.Popen(
                argv,
                cwd=REPO,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.kbs_denying = deny
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.kbs_port), timeout=0.5):
                    return
            except OSError:
                if self.kbs.poll() is not None or time.monotonic() > deadline:
                    self.kbs_down()
                    raise RuntimeError(f"the loopback KBS did not start; see {log}") from None
                time.sleep(0.1)

    def kbs_down(self) -> None:
        if self.kbs is None:
            return
        if self.kbs.poll() is None:
            self.kbs.terminate()
            try:
                self.kbs.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kbs.kill()
                self.kbs.wait(timeout=5)
        self.kbs = None

    # --- boots -----------------------------------------------------------------------------
    def boot(self, *, log: Log = print, timeout: float = 900.0, pre_start: str = "") -> Guest:
        self.boots += 1
        job = self.run_dir / "job"
        job.mkdir(parents=True, exist_ok=True)
        s = self.scenario
        (job / "stage.sh").write_text(stage_script(s, self.boots, pre_start))
        (job / "run.sh").write_text(job_script(s, self.boots))
        (job / "config.toml").write_text(daemon_config(s))
        (job / "config.json").write_text(oci_config(s.container_name))
        grpc_port, control_port = free_port(), free_port()
        spec = MachineSpec(
            image=self.image,
            job_dir=job,
            src_dir=REPO,
            disks=(self.initdata_disk, self.data_disk, *self.extra_disks.values()),
            tpm_state=self.run_dir / "tpm",
            guest_forwards=(GuestForward(KBS_GUEST_ADDR, KBS_GUEST_PORT, self.kbs_port),),
            host_forwards=(
                HostForward(grpc_port, GUEST_GRPC_PORT),
                HostForward(control_port, GUEST_CONTROL_PORT),
            ),
            timeout=timeout,
            console_name=f"console-boot{self.boots}.log",
            cva_at_boot=True,
        )
        log(f"e2e: boot {self.boots} (console: {job / spec.console_name})")
        earlier: GuestFailed | None = None
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            guest = Guest(
                self, QuietForwardMachine(spec), grpc_port, GuestControl(control_port), self.boots
            )
            try:
                guest.start()
                return guest
            except GuestFailed as exc:
                # Before BEGIN_MARK nothing of the job has run (under TCG the kernel now and then
                # panics in early init; the job runner's 9p share can be missing), so booting
                # again is safe -- as tests.vm.machine.boot does. After it, never.
                console = guest.machine.console
                if attempt == BOOT_ATTEMPTS or job_began(console):
                    raise exc from earlier
                earlier = exc
                kept = keep_failed_console(console, attempt)
                why = (
                    "the job share was not there yet"
                    if JOB_SHARE_RACE in str(exc)
                    else "the guest failed before its job began"
                )
                log(f"e2e: boot {self.boots}: {why} (console kept: {kept}); booting again")
        raise AssertionError("unreachable")  # the loop returns or raises

    def disk_is_all_zero(self, disk: Disk | None = None) -> bool:
        """The raw image of `disk` (default: the data disk) holds not one non-zero byte."""
        with (disk or self.data_disk).path.open("rb") as handle:
            while chunk := handle.read(4 * 1024 * 1024):
                if chunk.count(0) != len(chunk):
                    return False
        return True

    def marker_count(self, marker: bytes, disk: Disk | None = None) -> int:
        """How often `marker` is in the raw image of `disk` (default: the data disk)."""
        from tests.vm.rawscan import count_markers

        return count_markers((disk or self.data_disk).path, [marker])[marker]


class GuestFailed(RuntimeError):
    pass


# The harness's Machine now runs every guestfwd socat with `-lf /dev/null` (qemu hands socat the
# guest connection as stderr too, so its error text reached the guest as if the service had sent
# it); the name stays for the E2E code and tests that use it.
QuietForwardMachine = Machine


@dataclass
class Guest:
    world: World
    machine: Machine
    grpc_port: int
    control: GuestControl
    number: int
    result: BootResult | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def container_rootfs(self) -> str:
        return f"/run/kata-containers/{self.world.scenario.container_id}/rootfs"

    def volume_path(self) -> str:
        return self.container_rootfs + self.world.scenario.mount

    def _console_problem(self) -> str | None:
        try:
            text = self.machine.console.read_text(errors="replace")
        except FileNotFoundError:
            return None
        for fatal in FATAL_RES:
            hit = fatal.search(text)
            if hit:
                return hit.group(0).strip()
        return None

    def _qemu_gone(self) -> bool:
        qemu = self.machine._qemu  # the harness has no liveness probe
        return qemu is None or qemu.poll() is not None

    def fail(self, why: str) -> GuestFailed:
        tail = "\n".join(
            self.machine.console.read_text(errors="replace").replace("\r", "").splitlines()[-40:]
        )
        return GuestFailed(f"{why}\n--- serial console tail ({self.machine.console}):\n{tail}")

    def start(self, timeout: float = 300.0) -> None:
        self.machine.start()
        deadline = time.monotonic() + timeout
        while not self.control.ping():
            problem = self._console_problem()
            if problem or self._qemu_gone():
                self.machine.stop()
                raise self.fail(f"the guest did not come up: {problem or 'qemu exited'}")
            if time.monotonic() > deadline:
                self.machine.stop()
                raise self.fail(f"the guest's control channel did not answer within {timeout} s")
            time.sleep(0.5)

    def cva_state(self) -> str:
        return self.control.run(["systemctl", "is-active", "cva.service"]).stdout.strip()

    def wait_cva(self, timeout: float = 120.0) -> None:
        """Until cva.service is active and its gRPC health answers SERVING."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            state = self.control.run(["systemctl", "is-active", "cva.service"]).stdout.strip()
            if state == "active":
                with grpc.insecure_channel(self.address) as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    try:
                        answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                        if answer.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                        last = f"health {answer.status}"
                    except grpc.RpcError as exc:
                        last = f"health check: {exc.code().name}"
            else:
                last = f"cva.service is {state}"
            time.sleep(1)
        raise GuestFailed(f"cva did not become ready: {last}\n{self.journal()[-3000:]}")

    @contextmanager
    def client(self, timeout: float = 300.0) -> Iterator[object]:
        from agent.rpc.client import AgentClient

        with AgentClient(self.address, timeout=timeout) as client:
            yield client

    def journal(self, unit: str | None = "cva.service") -> str:
        argv = ["journalctl", "--no-pager", "-o", "cat", "-b"]
        if unit:
            argv += ["-u", unit]
        return self.control.run(argv, timeout=60).stdout

    def main_pid(self) -> int:
        out = self.control.run(["systemctl", "show", "-p", "MainPID", "--value", "cva.service"])
        return int(out.stdout.strip() or "0")

    def restarts(self) -> int:
        out = self.control.run(["systemctl", "show", "-p", "NRestarts", "--value", "cva.service"])
        return int(out.stdout.strip() or "0")

    def poweroff(self, timeout: float = 180.0) -> BootResult:
        """Stop the command channel: the job ends, cva stops, the guest syncs and powers off."""
        with suppress(OSError):
            self.control.exit()
        self.machine = _with_timeout(self.machine, timeout)
        self.result = self.machine.wait()
        return self.result

    def kill(self) -> None:
        self.machine.stop()


def _with_timeout(machine: Machine, timeout: float) -> Machine:
    """Machine.wait() counts its timeout from the call; give the shutdown its own budget."""
    machine.spec = replace(machine.spec, timeout=timeout)
    return machine
