"""Storage benchmark (runs inside the qemu guest as root): cva vs a cryptsetup shell baseline.

Measures, on a 1 GiB volume (a sparse image on a loop device, or --disk):
- time to a mounted volume, create path and reopen path, for
    cva           luks.volume.prepare_volume in a child process (cva's profile, validation,
                  dm table check)
    cli-default   the same steps with the cryptsetup CLI and its defaults (argon2id, as CDH)
    cli-profile   the same steps with the cryptsetup CLI and cva's profile (pbkdf2-1000, 4K)
- peak memory (max RSS over the child and its tools, from wait4) of each;
- sequential write/read (dd, O_DIRECT, 1 MiB blocks) through cva's mapping
  (no_read/no_write_workqueue), through a cryptsetup-default mapping, and on the raw device.

Prints one JSON document with the numbers and the ratios against cva. Timing lives here, never
in tests. Usage: python bench/storage_bench.py [--disk DEV] [--size-mib 1024] [--io-mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MIB = 1 << 20
KEY = b"bench-passphrase-0123456789abcdef0123456789"
SECRET_HEX = bytes(range(1, 65)).hex()


def measured(argv: list[str], *, stdin: bytes | None = None, env: dict[str, str] | None = None):
    """Run argv; return (seconds, peak RSS in MiB over the process tree, stdout)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed ({proc.returncode}): {err.decode()[-400:]}")
    return seconds, usage.ru_maxrss / 1024, out


def sh(script: str, stdin: bytes | None = None):
    return measured(["bash", "-euo", "pipefail", "-c", script], stdin=stdin)


@contextmanager
def loop_disk(size: int) -> Iterator[str]:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        img = Path(d) / "bench.img"
        with img.open("wb") as f:
            f.truncate(size)
        dev = subprocess.check_output(["losetup", "--find", "--show", str(img)], text=True).strip()
        try:
            yield dev
        finally:
            subprocess.run(["losetup", "-d", dev], check=False)


def wipe(dev: str) -> None:
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={dev}", "bs=1M", "count=20", "oflag=direct", "status=none"],
        check=True,
    )


CVA_CHILD = """
import os, sys
from pathlib import Path
from luks.secret import Secret
from luks import volume
from tests.guest.storage_support import make_volume
import time
vol = make_volume("bench", create=True)
t0 = time.monotonic()
p = volume.prepare_volume(vol, Secret(bytearray.fromhex(sys.stdin.read().strip())),
    disk=Path(os.environ["BENCH_DISK"]), runtime_dir=Path("/run/cva-bench/run"),
    mount_base=Path("/run/cva-bench/volumes"))
print(time.monotonic() - t0)
"""

CVA_RELEASE = """
import os
from pathlib import Path
from luks import volume
from tests.guest.storage_support import make_volume
volume.release_volume(make_volume("bench"), disk=Path(os.environ["BENCH_DISK"]),
    mount_base=Path("/run/cva-bench/volumes"), runtime_dir=Path("/run/cva-bench/run"))
"""


def cva_open(dev: str) -> tuple[float, float, float]:
    """(wall seconds incl. interpreter start and imports, seconds in prepare_volume, RSS)."""
    env = dict(os.environ, BENCH_DISK=dev)
    s, rss, out = measured([sys.executable, "-c", CVA_CHILD], stdin=SECRET_HEX.encode(), env=env)
    return s, float(out.decode().strip().splitlines()[-1]), rss


def cva_release(dev: str) -> None:
    measured([sys.executable, "-c", CVA_RELEASE], env=dict(os.environ, BENCH_DISK=dev))


PROFILE = (
    "--type luks2 --cipher aes-xts-plain64 --key-size 512 --sector-size 4096 --pbkdf pbkdf2 "
    "--pbkdf-force-iterations 1000 --hash sha256 --luks2-metadata-size 16k "
    "--luks2-keyslots-size 16352k"
)
FLAGS = "--perf-no_read_workqueue --perf-no_write_workqueue"


def cli_create_and_mount(dev: str, fmt_opts: str, open_opts: str) -> tuple[float, float]:
    script = (
        f"printf %s '{KEY.decode()}' | cryptsetup luksFormat --batch-mode {fmt_opts} "
        f"--key-file=- {dev}\n"
        f"printf %s '{KEY.decode()}' | cryptsetup open {open_opts} --key-file=- {dev} bench-cli\n"
        "mkfs.ext4 -q -b 4096 /dev/mapper/bench-cli\n"
        "mkdir -p /run/cva-bench/cli && mount -o nodev,nosuid /dev/mapper/bench-cli "
        "/run/cva-bench/cli\n"
    )
    s, rss, _ = sh(script)
    return s, rss


def cli_reopen(dev: str, open_opts: str) -> tuple[float, float]:
    script = (
        f"printf %s '{KEY.decode()}' | cryptsetup open {open_opts} --key-file=- {dev} bench-cli\n"
        "mount -o nodev,nosuid /dev/mapper/bench-cli /run/cva-bench/cli\n"
    )
    s, rss, _ = sh(script)
    return s, rss


def cli_close() -> None:
    sh("umount /run/cva-bench/cli; cryptsetup close bench-cli")


def dd_rate(target: str, io_mib: int, *, write: bool) -> float:
    """MiB/s of a sequential O_DIRECT pass over the first io_mib MiB of `target`."""
    if write:
        argv = ["dd", "if=/dev/zero", f"of={target}", "oflag=direct"]
    else:
        argv = ["dd", f"if={target}", "of=/dev/null", "iflag=direct"]
    argv += ["bs=1M", f"count={io_mib}", "status=none"]
    start = time.monotonic()
    subprocess.run(argv, check=True)
    return io_mib / (time.monotonic() - start)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--disk", help="a scratch disk (DESTROYED); default a loop image")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--io-mib", type=int, default=256)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("storage_bench: run as root inside the guest", file=sys.stderr)
        return 2
    Path("/run/cva-bench").mkdir(exist_ok=True)
    results: dict[str, dict[str, float]] = {}

    @contextmanager
    def disk() -> Iterator[str]:
        """One disk for every variant, zero-filled once (the blank check is then honest and
        no variant pays for first-touch allocation of a sparse image)."""
        if args.disk:
            yield args.disk
        else:
            with loop_disk((args.size_mib + 16) * MIB) as d:
                yield d

    with disk() as dev:
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={dev}", "bs=4M", "oflag=direct", "status=none"],
            check=False,  # dd stops with ENOSPC at the end of the device
        )
        c_s, c_in, c_rss = cva_open(dev)
        cva_release(dev)
        r_s, r_in, r_rss = cva_open(dev)
        # throughput on the mapping itself (unmounted: dd overwrites the filesystem)
        subprocess.run(["umount", "/run/cva-bench/volumes/bench"], check=True)
        mapper = "/dev/mapper/cva-bench"
        cva_w = dd_rate(mapper, args.io_mib, write=True)
        cva_r = dd_rate(mapper, args.io_mib, write=False)
        cva_release(dev)
        results["cva"] = {
            "create_s": c_s,
            "create_in_prepare_s": c_in,
            "create_rss_mib": c_rss,
            "reopen_s": r_s,
            "reopen_in_prepare_s": r_in,
            "reopen_rss_mib": r_rss,
            "write_mib_s": cva_w,
            "read_mib_s": cva_r,
        }
        for name, fmt, opn in (
            ("cli-default", "--type luks2", ""),
            ("cli-profile", PROFILE, FLAGS),
        ):
            wipe(dev)
            c_s, c_rss = cli_create_and_mount(dev, fmt, opn)
            cli_close()
            r_s, r_rss = cli_reopen(dev, opn)
            subprocess.run(["umount", "/run/cva-bench/cli"], check=True)
            w = dd_rate("/dev/mapper/bench-cli", args.io_mib, write=True)
            r = dd_rate("/dev/mapper/bench-cli", args.io_mib, write=False)
            sh("cryptsetup close bench-cli")
            results[name] = {
                "create_s": c_s,
                "create_rss_mib": c_rss,
                "reopen_s": r_s,
                "reopen_rss_mib": r_rss,
                "write_mib_s": w,
                "read_mib_s": r,
            }
        wipe(dev)
        results["raw"] = {
            "write_mib_s": dd_rate(dev, args.io_mib, write=True),
            "read_mib_s": dd_rate(dev, args.io_mib, write=False),
        }

    base = results["cva"]
    ratios = {
        name: {k: round(v / base[k], 3) for k, v in row.items() if base.get(k)}
        for name, row in results.items()
        if name != "cva"
    }
    report = {
        "volume_mib": args.size_mib,
        "io_mib": args.io_mib,
        "results": {n: {k: round(v, 3) for k, v in row.items()} for n, row in results.items()},
        "ratio_vs_cva": ratios,
        "self_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
