"""`make demo`: cva's main job end to end in a qemu guest, on embedded defaults.

    python -m tests.vm.demo [--keep]

1. builds (or reuses) the guest image; 2. starts a loopback Trustee KBS holding a random volume
key (TLS, the contract pins its CA); 3. writes the contract into an initdata disk; 4. boots the
guest, where cva runs as the systemd service `cva.service`; 5. asks cva over gRPC, like the kata
runtime would, to prepare the volumes of a demo container (the disk is blank: cva attests,
fetches the key, creates LUKS2 + ext4 and binds it into the container's rootfs); 6. writes a
file there; 7. releases the volume, powers the VM off and shows from the host that the raw disk
holds only ciphertext; 8. boots again on the same disks and shows the file is back.
Everything stays on this machine (127.0.0.1 and qemu's private user network).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.vm import preflight
from tests.vm.e2e import Guest, GuestFailed, Scenario, World

SCENARIO = Scenario(
    container_id="demo-ctr-0001",
    container_name="demo",
    volume="demo-data",
    mount="/data",
    serial="demodisk",
    key_uri="kbs:///default/demo/luks",
    lvm=False,
    disk_bytes=512 * 1024**2,
)
FILE = "greeting.txt"


class DemoFailed(Exception):
    pass


@dataclass
class Timings:
    steps: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        print(f"\n==> {title}", flush=True)
        started = time.monotonic()
        yield
        seconds = time.monotonic() - started
        self.steps.append((title, seconds))
        print(f"    ({seconds:.1f} s)", flush=True)


def say(text: str) -> None:
    print(f"    {text}", flush=True)


def _volumes(answer: Any) -> str:
    return ", ".join(
        f"{v.name} -> {v.container_path} ({'created' if v.created else 'opened'}, {v.device})"
        for v in answer.volumes
    )


def _check(ok: bool, why: str) -> None:
    if not ok:
        raise DemoFailed(why)


def _prepare(guest: Guest) -> Any:
    with guest.client() as client:
        return client.prepare(SCENARIO.container_id)  # type: ignore[attr-defined]


def _release(guest: Guest) -> Any:
    with guest.client() as client:
        return client.release(SCENARIO.container_id)  # type: ignore[attr-defined]


def _list(guest: Guest) -> str:
    with guest.client(timeout=30) as client:
        answer = client.list()  # type: ignore[attr-defined]
    return ", ".join(f"{v.name}: {_state(v.state)}" for v in answer.volumes)


def _state(value: int) -> str:
    from agent._proto.cva.v1 import agent_pb2

    name = agent_pb2.VolumeState.Name(value)  # type: ignore[arg-type]
    return str(name).removeprefix("VOLUME_STATE_").lower()


def _sample_hex(path: Path, offset: int, length: int = 32) -> str:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(length).hex(" ")


def run_demo(run_dir: Path, log: Callable[[str], None] = say) -> Timings:
    from tests.vm.build import ensure_image

    t = Timings()
    with t.step("guest image (built once, then cached)"):
        image = ensure_image(log=log)
        say(f"kernel {image.kernel.name}, root {image.root}")

    with t.step("loopback KBS with a random volume key; contract in an initdata disk"):
        world = World(run_dir=run_dir, scenario=SCENARIO, image=image)
        world.kbs_up()
        say(
            f"KBS: https://127.0.0.1:{world.kbs_port} (the guest sees it as https://10.0.2.100:8443)"
        )
        say(f"resource {SCENARIO.key_uri}: {len(world.key)} random bytes")
        say(
            f"initdata digest (sha256): {world.initdata.digest().hex()} - on TDX/SNP/vTPM "
            "hardware this is what MRCONFIGID / HOST_DATA / PCR8 measure"
        )
        say(f"data disk: {world.data_disk.path} (blank, virtio serial {SCENARIO.serial})")

    marker = f"hello from the demo container, written at {time.strftime('%H:%M:%S')}"
    path_in_container = f"{SCENARIO.mount}/{FILE}"
    try:
        with t.step("boot 1: the guest starts cva.service"):
            guest = world.boot(log=log)
            guest.wait_cva()
            say("cva.service is active (Type=notify, READY after the initdata check)")
            say(f"ListVolumes: {_list(guest)}")

        with t.step(f"PrepareVolumes({SCENARIO.container_id}): attest, fetch key, create, bind"):
            answer = _prepare(guest)
            say(_volumes(answer))
            _check(answer.volumes and answer.volumes[0].created, "the volume was not created")

        with t.step(f"the container writes {path_in_container}"):
            target = f"{guest.volume_path()}/{FILE}"
            guest.control.run(["tee", target], input=marker).check()
            guest.control.run(["sync"]).check()
            say(f'wrote "{marker}"')
            say(f"ListVolumes: {_list(guest)}")

        with t.step("ReleaseVolumes, power off; look at the raw disk from the host"):
            released = _release(guest)
            say(f"released {list(released.released)}, closed {list(released.closed)}")
            result = guest.poweroff()
            _check(result.finished, f"the guest did not power off cleanly: {result.problem}")
            hits = world.marker_count(marker.encode())
            luks = world.marker_count(b"LUKS\xba\xbe")
            say(f"the file's text occurs {hits} times in the raw disk image")
            say(f"LUKS2 header magic at the start of the disk: {luks >= 1}")
            sb = 16 * 1024**2 + 1024  # data segment at 16 MiB; ext4's superblock 1 KiB into it
            cipher = _sample_hex(world.data_disk.path, sb)
            say(f"bytes where ext4's superblock sits (encrypted): {cipher}")
            _check(hits == 0, "the plaintext is on the raw disk")
            _check(luks >= 1, "no LUKS2 header on the data disk")

        with t.step("boot 2 on the same disks: PrepareVolumes opens the volume again"):
            guest = world.boot(log=log)
            guest.wait_cva()
            answer = _prepare(guest)
            say(_volumes(answer))
            content = guest.control.run(["cat", f"{guest.volume_path()}/{FILE}"]).check().stdout
            say(f'{path_in_container} in the container: "{content}"')
            _check(content == marker, "the file did not come back")
            _release(guest)
            _check(guest.poweroff().finished, "the guest did not power off cleanly")
    finally:
        world.kbs_down()
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the run folder's disk images")
    args = parser.parse_args(argv)
    missing = preflight.missing_tools()
    if missing:
        print(f"make demo: {preflight.missing_message(missing)}", file=sys.stderr)
        return 1
    run_dir = Path(tempfile.mkdtemp(prefix="cva-demo-"))
    print(f"cva demo - run folder {run_dir} (consoles, logs)")
    started = time.monotonic()
    try:
        timings = run_demo(run_dir)
    except (DemoFailed, GuestFailed, RuntimeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"\nmake demo: FAILED: {first}", file=sys.stderr)
        print(f"make demo: consoles and logs are in {run_dir}/job", file=sys.stderr)
        return 1
    except Exception as exc:  # a gRPC error from cva: one line, not a traceback
        from agent.errors import CvaError

        if not isinstance(exc, CvaError):
            raise
        print(f"\nmake demo: FAILED: {exc}", file=sys.stderr)
        print(f"make demo: consoles and logs are in {run_dir}/job", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            for image in run_dir.glob("disks/*.img"):
                image.unlink(missing_ok=True)
    total = time.monotonic() - started
    print("\n---- summary " + "-" * 60)
    for title, seconds in timings.steps:
        print(f"  {seconds:7.1f} s  {title}")
    print(f"  {total:7.1f} s  total")
    print(
        "  The volume was created on a blank disk after attestation, survived a reboot, and the\n"
        "  host only ever saw ciphertext. cva ran as a systemd service inside the guest."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
