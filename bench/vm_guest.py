"""The host side shared by the qemu-guest benchmarks (vm_storage, vm_kata): boot the VM suite's
guest image once with the plan's blank sparse disks, run `python -m bench.<module> run` inside
(as root, the repo at /mnt/vmsrc) and load the JSON it leaves in the job folder.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HARNESS = ("tests.vm.machine", "tests.vm.build", "tests.vm.preflight")


def job_script(module: str, out_name: str) -> str:
    return f"""#!/bin/bash
export CVA_IN_GUEST=1 PYTHONPATH=/mnt/vmsrc PYTHONDONTWRITEBYTECODE=1 HOME=/root
export PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd /mnt/vmsrc
exec /opt/venv/bin/python -m {module} run /mnt/vmjob/plan.json /mnt/vmjob/{out_name}
"""


@dataclass
class Disks:
    """The blank sparse disks a plan names by serial, made in the job folder."""

    job: Path
    all: list[Any] = field(default_factory=list)

    def add(self, serial: str, size: int) -> str:
        from tests.vm.machine import Disk, make_sparse_disk

        self.all.append(Disk(make_sparse_disk(self.job / "disks" / f"{serial}.img", size), serial))
        return serial


@dataclass(frozen=True)
class GuestRun:
    doc: dict[str, Any]
    problem: str | None  # the run's failure, if any, though the guest wrote results


def run_guest_job(
    name: str,
    *,
    module: str,
    out_name: str,
    needs: str,
    plan: Callable[[Path], tuple[dict[str, Any], list[Any]]],
    timeout: float,
    tmp_prefix: str,
    absent: str = "not in this tree",
) -> GuestRun | str:
    """The guest's results, or why there are none (a "not measured" reason)."""
    missing = [m for m in (*HARNESS, needs) if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} {absent}"
    from tests.vm import preflight
    from tests.vm.build import ensure_image
    from tests.vm.machine import Machine, MachineSpec

    tools = preflight.missing_tools()
    if tools:
        return preflight.missing_message(tools)
    image = ensure_image(log=lambda s: print(s, flush=True))
    with tempfile.TemporaryDirectory(prefix=tmp_prefix, dir="/var/tmp") as d:
        job = Path(d)
        plan_doc, disks = plan(job)
        (job / "plan.json").write_text(json.dumps(plan_doc, indent=2))
        (job / "run.sh").write_text(job_script(module, out_name))
        print(f"{name}: job folder {job}; plan {json.dumps(plan_doc)}", flush=True)
        spec = MachineSpec(
            image=image,
            job_dir=job,
            src_dir=REPO,
            disks=tuple(disks),
            timeout=timeout,
            start_timeout=300.0,
        )
        result = Machine(spec).run()
        output = job / "output.log"
        if output.exists():
            print(output.read_text(errors="replace"), flush=True)
        doc_path = job / out_name
        doc = json.loads(doc_path.read_text()) if doc_path.exists() else None
        problem = None if result.finished and result.job_rc == 0 else result.failure()
    if problem:
        print(f"{name}: {problem}", flush=True)
    if doc is None:
        reason = (problem or "the guest wrote no results").splitlines()[0]
        return f"guest run failed: {reason}"
    return GuestRun(doc, problem)
