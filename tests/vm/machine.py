"""Boot the test guest once under qemu and collect what its job left behind (stdlib only).

The guest (image from tests/vm/build.py) mounts two 9p shares: the job folder read-write at
/mnt/vmjob, where it runs `run.sh` and leaves `output.log` and `rc`, and the repository
read-only at /mnt/vmsrc. Extra raw disks get virtio serials (/dev/disk/by-id/virtio-SERIAL),
swtpm provides a TPM 2.0 (its state folder survives between boots), the network is qemu's
user-mode stack with restrict=on plus explicit forwards on 127.0.0.1 only, and a QMP socket
allows hot-plug. The serial console goes to a file; a hung or panicked guest ends in a
`BootResult` whose `failure()` quotes the console's tail. Only the processes started here
(swtpm and qemu, each in its own process group) are ever killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.vm.build import GuestImage
from tests.vm.qmp import Qmp, QmpError

BEGIN_MARK = "CVA-VM-JOB-BEGIN"
END_RE = re.compile(r"CVA-VM-JOB-END rc=(\d+)")
# Console lines after which the guest will never run the job.
FATAL_RES = (
    re.compile(r"Kernel panic - not syncing.*"),
    re.compile(r"You are in emergency mode.*"),
    re.compile(r"Gave up waiting for root file system device.*"),
    re.compile(r"ALERT! .* does not exist.*"),
)
HOTPLUG_DIR = "hotplug"


@dataclass(frozen=True)
class Disk:
    """A raw image attached as a virtio disk with this serial."""

    path: Path
    serial: str


@dataclass(frozen=True)
class GuestForward:
    """Guest connections to guest_addr:guest_port go to 127.0.0.1:host_port on the host."""

    guest_addr: str
    guest_port: int
    host_port: int


@dataclass(frozen=True)
class HostForward:
    """Host connections to 127.0.0.1:host_port go to the guest's guest_port."""

    host_port: int
    guest_port: int


@dataclass(frozen=True)
class MachineSpec:
    image: GuestImage
    job_dir: Path
    src_dir: Path | None = None
    disks: tuple[Disk, ...] = ()
    tpm_state: Path | None = None
    guest_forwards: tuple[GuestForward, ...] = ()
    host_forwards: tuple[HostForward, ...] = ()
    timeout: float = 900.0
    # The job must have started by then (kernel + systemd up), or the boot counts as hung.
    start_timeout: float = 300.0
    memory_mb: int = 2048
    cpus: int = 2
    keep: bool = False  # the guest stays up after its job (cva_vm.keep=1)
    interactive: bool = False  # serial console on this terminal instead of a file
    extra_append: str = ""
    console_name: str = "console.log"
    # The image starts cva.service at boot (kata-containers.target wants it, as in production).
    # Only boots that stage its config first (tests/vm/e2e.py: the job folder's stage.sh, run by
    # cva-vm-stage.service before cva) want that; everything else masks it on the kernel command
    # line and starts its own cva when a test needs one.
    cva_at_boot: bool = False


@dataclass(frozen=True)
class BootResult:
    job_rc: int | None
    qemu_rc: int | None
    seconds: float
    console: Path
    output: Path
    problem: str | None = None  # why the guest did not finish its job (None: it did)

    @property
    def finished(self) -> bool:
        return self.problem is None and self.job_rc is not None

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except FileNotFoundError:
            return "(no serial console output)"
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    def failure(self) -> str:
        return f"{self.problem}\n--- last lines of the serial console ({self.console}):\n" + (
            self.console_tail()
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_sparse_disk(path: Path, size_bytes: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.truncate(size_bytes)
    return path


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process this module started (in its own session) and whatever it spawned."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    # socat children of guestfwd share qemu's process group; reap the group leftovers too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


class Machine:
    """One boot of the guest. `run()` = start, wait for the job or the timeout, clean up."""

    def __init__(self, spec: MachineSpec) -> None:
        self.spec = spec
        self.console = spec.job_dir / spec.console_name
        self.qmp_path = spec.job_dir / "qmp.sock"
        self._qemu: subprocess.Popen[bytes] | None = None
        self._swtpm: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self._hotplugged: dict[str, Disk] = {}
        self._stderr = spec.job_dir / "qemu.stderr"

    # --- command line -------------------------------------------------------------------
    def _netdev(self) -> str:
        parts = ["user", "id=net0", "restrict=on"]
        for hf in self.spec.host_forwards:
            parts.append(f"hostfwd=tcp:127.0.0.1:{hf.host_port}-:{hf.guest_port}")
        for gf in self.spec.guest_forwards:
            # cmd: form = one socat per guest connection (the tcp: chardev form serves one);
            # -lf /dev/null: socat's stderr is the guest connection too, so its error text would
            # reach the guest as if the service had sent it.
            parts.append(
                f"guestfwd=tcp:{gf.guest_addr}:{gf.guest_port}"
                f"-cmd:socat -lf /dev/null - TCP:127.0.0.1:{gf.host_port}"
            )
        return ",".join(parts)

    def qemu_argv(self, tpm_socket: Path | None) -> list[str]:
        spec = self.spec
        append = f"root=LABEL=cvavmroot rw console=ttyS0 panic=-1 {spec.extra_append}".strip()
        if not spec.cva_at_boot:
            append += " systemd.mask=cva.service"
        if spec.keep:
            append += " cva_vm.keep=1"
        argv = [
            "qemu-system-x86_64",
            "-accel", "tcg",
            "-cpu", "max",
            "-smp", str(spec.cpus),
            "-m", str(spec.memory_mb),
            "-nodefaults", "-no-reboot", "-display", "none",
            "-serial", "mon:stdio" if spec.interactive else f"file:{self.console}",
            "-kernel", str(spec.image.kernel),
            "-initrd", str(spec.image.initrd),
            "-append", append,
            # The root disk is a throwaway overlay: root.img in the cache stays pristine.
            "-drive", f"file={spec.image.root},if=none,id=root,format=raw,snapshot=on",
            "-device", "virtio-blk-pci,drive=root,serial=cvavmroot",
            "-device", "virtio-rng-pci",
            "-virtfs", f"local,path={spec.job_dir},mount_tag=vmjob,security_model=none,id=vmjob",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-netdev", self._netdev(),
            "-device", "virtio-net-pci,netdev=net0",
        ]  # fmt: skip
        if spec.src_dir is not None:
            argv += [
                "-virtfs",
                f"local,path={spec.src_dir},mount_tag=vmsrc,security_model=none,"
                "readonly=on,id=vmsrc",
            ]
        for i, disk in enumerate(spec.disks):
            # serial= belongs on the device (qemu >= 7.2 refuses it on -drive).
            argv += [
                "-drive", f"file={disk.path},if=none,id=disk{i},format=raw,cache=writeback",
                "-device", f"virtio-blk-pci,drive=disk{i},serial={disk.serial}",
            ]  # fmt: skip
        if tpm_socket is not None:
            argv += [
                "-chardev", f"socket,id=chrtpm,path={tpm_socket}",
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                "-device", "tpm-tis,tpmdev=tpm0",
            ]  # fmt: skip
        return argv

    # --- processes ----------------------------------------------------------------------
    def _start_swtpm(self) -> Path:
        state = self.spec.tpm_state
        assert state is not None
        state.mkdir(parents=True, exist_ok=True)
        sock = state / "swtpm.sock"
        sock.unlink(missing_ok=True)
        self._swtpm = subprocess.Popen(
            [
                "swtpm", "socket", "--tpm2",
                "--tpmstate", f"dir={state}",
                "--ctrl", f"type=unixio,path={sock}",
                "--log", f"file={state / 'swtpm.log'},level=1",
                "--terminate",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self._swtpm.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"swtpm did not start; see {state / 'swtpm.log'}")
            time.sleep(0.05)
        return sock

    def start(self) -> None:
        self.spec.job_dir.mkdir(parents=True, exist_ok=True)
        for name in ("rc", "output.log", self.spec.console_name):
            (self.spec.job_dir / name).unlink(missing_ok=True)
        (self.spec.job_dir / HOTPLUG_DIR).mkdir(exist_ok=True)
        self.qmp_path.unlink(missing_ok=True)
        tpm_socket = self._start_swtpm() if self.spec.tpm_state is not None else None
        argv = self.qemu_argv(tpm_socket)
        (self.spec.job_dir / "qemu.argv").write_text("\n".join(argv) + "\n")
        with self._stderr.open("wb") as err:
            self._qemu = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def interact(self) -> int:
        """Run with the serial console on this terminal (spec.interactive); qemu's exit code."""
        tpm_socket = self._start_swtpm() if self.spec.tpm_state is not None else None
        self.spec.job_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._qemu = subprocess.Popen(self.qemu_argv(tpm_socket))
            return self._qemu.wait()
        finally:
            self.stop()

    def qmp(self) -> Qmp:
        if self._qmp is None:
            self._qmp = Qmp(self.qmp_path)
        return self._qmp

    def hotplug_disk(self, serial: str, size_bytes: int) -> Disk:
        """Create a sparse raw image and plug it into the running guest as virtio-SERIAL."""
        disk = Disk(
            make_sparse_disk(self.spec.job_dir / "disks" / f"{serial}.img", size_bytes), serial
        )
        self.qmp().add_disk(f"hp-{serial}", disk.path, serial)
        self._hotplugged[serial] = disk
        return disk

    def resize_disk(self, serial: str, size_bytes: int) -> None:
        """QMP block_resize of a boot-time disk (drive `disk<i>`, i its index in spec.disks)."""
        index = next((i for i, d in enumerate(self.spec.disks) if d.serial == serial), None)
        if index is None:
            raise ValueError(f"no boot-time disk with serial {serial!r}")
        self.qmp().block_resize(f"disk{index}", size_bytes)

    def unplug_disk(self, serial: str) -> None:
        self.qmp().remove_disk(f"hp-{serial}")

    @property
    def hotplugged(self) -> tuple[Disk, ...]:
        return tuple(self._hotplugged.values())

    def _serve_hotplug_requests(self) -> None:
        """The guest asks for a disk by writing hotplug/SERIAL.request (size in bytes)."""
        folder = self.spec.job_dir / HOTPLUG_DIR
        for request in sorted(folder.glob("*.request")):
            serial = request.stem
            reply = folder / f"{serial}.reply"
            if reply.exists():
                continue
            try:
                size = int(request.read_text().strip())
                if not re.fullmatch(r"[A-Za-z0-9_-]{1,20}", serial) or serial in self._hotplugged:
                    raise ValueError(f"bad or duplicate serial {serial!r}")
                self.hotplug_disk(serial, size)
                answer = "ok\n"
            except (ValueError, QmpError, OSError) as exc:
                answer = f"error {exc}\n"
            tmp = folder / f"{serial}.reply.tmp"
            tmp.write_text(answer)
            tmp.rename(reply)

    def wait(self) -> BootResult:
        assert self._qemu is not None
        started = time.monotonic()
        deadline = started + self.spec.timeout
        start_deadline = started + self.spec.start_timeout
        problem: str | None = None
        offset = 0
        seen_begin = False
        job_rc: int | None = None
        text = ""
        while True:
            qemu_rc = self._qemu.poll()
            if self.console.exists():
                with self.console.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
                offset += len(chunk)
                text = (text + chunk.decode(errors="replace"))[-8192:]
                seen_begin = seen_begin or BEGIN_MARK in text
                end = END_RE.search(text)
                if end:
                    job_rc = int(end.group(1))
                for fatal in FATAL_RES:
                    hit = fatal.search(text)
                    if hit and problem is None and job_rc is None:
                        problem = f"the guest failed to boot: {hit.group(0).strip()}"
            if qemu_rc is not None:
                break
            if problem is not None:
                break
            now = time.monotonic()
            if not seen_begin and now > start_deadline:
                problem = (
                    f"the guest did not start its job within {self.spec.start_timeout:.0f} s "
                    "(hung boot)"
                )
                break
            if now > deadline and not self.spec.keep:
                problem = f"the guest did not finish within {self.spec.timeout:.0f} s (timeout)"
                break
            if seen_begin and job_rc is None:
                self._serve_hotplug_requests()
            time.sleep(0.25)
        self.stop()
        seconds = time.monotonic() - started
        rc_file = self.spec.job_dir / "rc"
        if problem is None and rc_file.exists():
            job_rc = int(rc_file.read_text().strip() or "255")
        if problem is None and job_rc is None:
            stderr = self._stderr.read_text(errors="replace").strip()[-500:]
            problem = f"qemu exited (rc {self._qemu.returncode}) before the guest finished its job"
            if stderr:
                problem += f"; qemu said: {stderr}"
        return BootResult(
            job_rc=job_rc,
            qemu_rc=self._qemu.returncode,
            seconds=seconds,
            console=self.console,
            output=self.spec.job_dir / "output.log",
            problem=problem,
        )

    def stop(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        for proc in (self._qemu, self._swtpm):
            if proc is not None:
                _kill_group(proc)

    def run(self) -> BootResult:
        try:
            self.start()
            return self.wait()
        finally:
            self.stop()


def boot(spec: MachineSpec, *, attempts: int = 2) -> BootResult:
    """Boot, run the job, power off.

    A guest that fails before its job begins is booted once more (up to `attempts`): under TCG
    the 6.12 kernel now and then dies in early init (a "Fatal exception in interrupt" panic at
    ~2 s, seen in the suite). Nothing of the job has run then, so the retry changes nothing; the
    failed boot's console is kept beside the new one as `<console>.attempt<N>`.
    """
    result = Machine(spec).run()
    for attempt in range(1, attempts):
        if result.finished or job_began(result.console):
            break
        keep_failed_console(result.console, attempt)
        result = Machine(spec).run()
    return result


def job_began(console: Path) -> bool:
    """True once the guest's job runner printed BEGIN_MARK on this serial console: from then on
    the job may have changed disks or TPM state, so the boot must never be repeated."""
    try:
        return BEGIN_MARK in console.read_text(errors="replace")
    except FileNotFoundError:
        return False


def keep_failed_console(console: Path, attempt: int) -> Path | None:
    """Move a failed boot's console aside as `<console>.attempt<N>` (the next boot writes the
    same name); returns the new path, or None when the boot left no console."""
    if not console.exists():
        return None
    kept = console.with_name(f"{console.name}.attempt{attempt}")
    console.replace(kept)
    return kept
