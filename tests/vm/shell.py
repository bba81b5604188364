"""Boot the test guest with its serial console on this terminal, for debugging.

    python -m tests.vm.shell [--disk SIZE_GIB]... [--job DIR]

Log in as root (no password). The repo is at /mnt/vmsrc (read-only) and DIR at /mnt/vmjob;
the guest runs DIR/run.sh if there is one and then stays up (cva_vm.keep=1). Leave qemu
with Ctrl-a x, or `poweroff` in the guest.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.vm.build import REPO, ensure_image
from tests.vm.machine import Disk, Machine, MachineSpec, make_sparse_disk


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.shell", description=__doc__)
    parser.add_argument("--disk", type=int, action="append", default=[], metavar="GIB")
    parser.add_argument("--job", type=Path, help="job folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    job = args.job or Path(tempfile.mkdtemp(prefix="cva-vm-shell-"))
    job.mkdir(parents=True, exist_ok=True)
    if not (job / "run.sh").exists():
        (job / "run.sh").write_text("echo 'cva-vm shell: no job'\n")
    disks = tuple(
        Disk(make_sparse_disk(job / "disks" / f"cvatest{i}.img", size * 1024**3), f"cvatest{i}")
        for i, size in enumerate(args.disk)
    )
    spec = MachineSpec(
        image=ensure_image(log=lambda line: print(line, file=sys.stderr)),
        job_dir=job,
        src_dir=REPO,
        disks=disks,
        tpm_state=job / "tpm",
        keep=True,
        interactive=True,
    )
    print(f"cva-vm shell: job folder {job}", file=sys.stderr)
    return Machine(spec).interact()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
