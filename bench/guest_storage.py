"""Guest side of the storage benchmark (inside the qemu guest, as root, from /mnt/vmsrc).

`python -m bench.guest_storage run PLAN.json OUT.json` measures, on the blank virtio disks the
host attached (serials in the plan), for each size and integrity off/on:

- time to a mounted volume, create path (blank disk -> mounted ext4) and reopen path (closed
  volume -> mounted), for three ways of doing it:
    cva      luks.volume.prepare_volume in a child process (the time inside prepare_volume: the
             daemon is already running when PrepareVolumes arrives)
    cdh      a shell script doing what CDH does with the cryptsetup CLI and its defaults
             (argon2id keyslot; with integrity: --integrity hmac-sha256 and cryptsetup's full wipe)
    profile  the same steps with cva's profile via the CLI (pbkdf2-1000, 4K sectors, 16 MiB
             header, no_read/no_write_workqueue; with integrity: no-wipe + the same pre-writes
             and mkfs options as cva) AND the same safety: `blkid -p` finds nothing, then the
             whole disk is checked for zeros with the fastest standard tool measured in this
             guest (ZERO_TOOLS, the `zero-tools` item)
- zero-scan throughput: cva's scan (luks.blank.scan_zeros) against `dd if=DEV of=/dev/null
  bs=4M iflag=direct`, and each standard zero-check tool, on the first read of fresh 1 GiB
  regions and again with the host's page cache warm (zero_scan_rates says why both);
- peak memory (max RSS over the process and the tools it waited for, from wait4);
- I/O on the 1 GiB disks: sequential (dd, O_DIRECT, 1 MiB) and 4K random (O_DIRECT, Python
  pread/pwrite; no fio in the guest image) read/write on a raw LV, dm-crypt with cva's flags,
  dm-crypt with cryptsetup's defaults, and cva's mapping with integrity.

Every item is recorded as it finishes (OUT.json is rewritten each time), so a timeout still
leaves what was measured; a failing item records its error and the run goes on.
`python -m bench.guest_storage child prepare|release NAME SERIAL INTEGRITY` is the cva child.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

MIB = 1 << 20
PASSPHRASE = "bench-passphrase-0123456789abcdef0123456789abcdef"
SECRET = bytes(range(1, 65))
RUN = Path("/run/cva-bench")
CLI_MNT = RUN / "cli"
CMD_TIMEOUT = 900.0

PROFILE = (
    "--type luks2 --cipher aes-xts-plain64 --key-size 512 --sector-size 4096 --pbkdf pbkdf2 "
    "--pbkdf-force-iterations 1000 --hash sha256 --luks2-metadata-size 16k "
    "--luks2-keyslots-size 16352k"
)
FLAGS = "--perf-no_read_workqueue --perf-no_write_workqueue"


# Standard ways to check a whole device for zeros by hand (exit 0 = all zeros); {dev}, {size}.
ZERO_TOOLS = {
    "cmp": "cmp -s -i {offset}:0 -n {size} {dev} /dev/zero",
    "dd-direct|cmp": (
        "dd if={dev} bs=4M iflag=direct,skip_bytes,count_bytes skip={offset} count={size} "
        "status=none | cmp -s -n {size} - /dev/zero"
    ),
    "dd-direct|tr|wc": (
        'test "$(dd if={dev} bs=4M iflag=direct,skip_bytes,count_bytes skip={offset} '
        "count={size} status=none | tr -d '\\000' | head -c 1 | wc -c)\" = 0"
    ),
}
CHOSEN = {"zero_tool": "dd-direct|cmp"}  # the fastest one the `zero-scan` item measured


def by_id(serial: str) -> str:
    return f"/dev/disk/by-id/virtio-{serial}"


# --- measuring ----------------------------------------------------------------------------
def spawn_wait4(argv: list[str], *, stdin: bytes | None = None) -> tuple[float, float, bytes]:
    """Run argv; (seconds, peak RSS MiB of it and its waited-for descendants, stdout)."""
    with tempfile.TemporaryFile() as err_file:  # a file: a chatty stderr never blocks the pipe
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err_file,
        )
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        err_file.seek(0)
        raise_for(proc.returncode, argv, err_file.read())
    return seconds, usage.ru_maxrss / 1024, out


def raise_for(rc: int, argv: list[str], err: bytes) -> None:
    if rc != 0:
        text = err.decode(errors="replace").strip().replace("\n", " | ")[-300:]
        raise RuntimeError(f"{' '.join(argv[:3])} failed (rc {rc}): {text}")


def sh(script: str) -> tuple[float, float]:
    seconds, rss, _ = spawn_wait4(["bash", "-euo", "pipefail", "-c", script])
    return seconds, rss


def quiet(argv: list[str], *, check: bool = True) -> None:
    subprocess.run(argv, check=check, timeout=CMD_TIMEOUT, capture_output=True)


# --- cva (child process) ------------------------------------------------------------------
def _volume(name: str, serial: str, integrity: bool) -> Any:
    from agent import contract

    return contract.Volume(
        name=name,
        key=contract.KbsResourceUri("default", name, "luks"),
        disk=contract.DiskRef("serial", serial),
        lvm=None,
        filesystem="ext4",
        mount="/data",
        containers=(),
        create=True,
        integrity=integrity,
        read_only=False,
    )


def child(argv: list[str]) -> int:
    """In the child: prepare or release one volume; prints the seconds spent in the call."""
    action, name, serial, integrity = argv[0], argv[1], argv[2], argv[3] == "1"
    from luks import volume
    from luks.secret import Secret

    vol = _volume(name, serial, integrity)
    imports_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.monotonic()
    if action == "prepare":
        volume.prepare_volume(
            vol,
            Secret(bytearray(SECRET)),
            disk=Path(by_id(serial)),
            runtime_dir=RUN / "run",
            mount_base=RUN / "volumes",
        )
    else:
        volume.release_volume(
            vol, disk=Path(by_id(serial)), mount_base=RUN / "volumes", runtime_dir=RUN / "run"
        )
    seconds = time.monotonic() - start
    own_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "imports_rss_mib": imports_rss, "self_rss_mib": own_rss}))
    return 0


def cva_call(action: str, name: str, serial: str, integrity: bool) -> dict[str, float]:
    """seconds inside the call, wall seconds incl. interpreter start, peak RSS (MiB) over the
    child and its tools, the child's own peak after imports and after the call."""
    argv = [sys.executable, "-m", "bench.guest_storage", "child", action, name, serial]
    wall, rss, out = spawn_wait4([*argv, "1" if integrity else "0"])
    doc = json.loads(out.decode().strip().splitlines()[-1])
    return {
        "seconds": float(doc["seconds"]),
        "wall_seconds": wall,
        "rss_mib": rss,
        "imports_rss_mib": float(doc["imports_rss_mib"]),
        "self_rss_mib": float(doc["self_rss_mib"]),
    }


# --- the CLI scripts ----------------------------------------------------------------------
def cli_steps(variant: str, dev: str, integrity: bool) -> tuple[list[str], list[str], str]:
    """(format+open lines, mkfs+mount lines, reopen script) for `cdh` (the CLI's defaults) or
    `profile` (cva's profile via the CLI)."""
    key = f"printf %s '{PASSPHRASE}'"
    if variant == "cdh":
        fmt = "--type luks2" + (" --integrity hmac-sha256" if integrity else "")
        opn, mkfs = "", "mkfs.ext4 -q -F"
    else:
        fmt = PROFILE + (" --integrity hmac-sha256 --integrity-no-wipe" if integrity else "")
        opn = FLAGS
        ext = "nodiscard" + (",lazy_itable_init=0,lazy_journal_init=0" if integrity else "")
        mkfs = f"mkfs.ext4 -q -F -b 4096 -E {ext}"
    mount = f"mkdir -p {CLI_MNT} && mount -o nodev,nosuid /dev/mapper/bench-cli {CLI_MNT}"
    opn_line = f"{key} | cryptsetup open {opn} --key-file=- {dev} bench-cli"
    head = [f"{key} | cryptsetup luksFormat --batch-mode {fmt} --key-file=- {dev}", opn_line]
    return head, [f"{mkfs} /dev/mapper/bench-cli", mount], f"{opn_line}\n{mount}"


def mapping_size(name: str) -> int:
    out = subprocess.run(
        ["blockdev", "--getsize64", f"/dev/mapper/{name}"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return int(out.strip())


def cli_close() -> None:
    quiet(["umount", str(CLI_MNT)], check=False)
    quiet(["cryptsetup", "close", "bench-cli"], check=False)


def safety_lines(dev: str) -> list[str]:
    """(b)'s blankness proof by hand: no signature, then every byte zero (cva's full check)."""
    size = f"$(blockdev --getsize64 {dev})"
    return [
        f"rc=0; blkid -p {dev} >/dev/null || rc=$?; test $rc -eq 2",
        ZERO_TOOLS[CHOSEN["zero_tool"]].format(dev=dev, size=size, offset=0),
    ]


def cli_create(variant: str, dev: str, integrity: bool) -> tuple[float, float]:
    head, tail = cli_steps(variant, dev, integrity)[:2]
    if variant == "profile":
        head = safety_lines(dev) + head
    if not (variant == "profile" and integrity):
        return sh("\n".join(head + tail))
    # cva's integrity steps: no-wipe format, open, zero exactly the blocks mkfs reads (offsets
    # from the live mapping's size, as luks.fs does), mkfs without lazy init
    from luks.fs import prewrite_ranges

    s1, r1 = sh("\n".join(head))
    dd = [
        f"dd if=/dev/zero of=/dev/mapper/bench-cli bs=4096 seek={off // 4096} "
        f"count={length // 4096} oflag=direct conv=notrunc status=none"
        for off, length in prewrite_ranges(mapping_size("bench-cli"))
    ]
    s2, r2 = sh("\n".join(dd + tail))
    return s1 + s2, max(r1, r2)


def luks_params(dev: str) -> dict[str, str]:
    """The keyslot KDF and data segment parameters cryptsetup chose (from luksDump)."""
    text = subprocess.run(
        ["cryptsetup", "luksDump", dev], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    wanted = ("PBKDF", "Memory", "Time cost", "Threads", "Iterations", "sector", "cipher")
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key in wanted and key not in found:
            found[key] = value.strip()
    return found


def cli_reopen(variant: str, dev: str, integrity: bool) -> tuple[float, float]:
    return sh(cli_steps(variant, dev, integrity)[2])


# --- I/O ----------------------------------------------------------------------------------
def dd_rate(target: str, mib: int, *, write: bool) -> float:
    if write:
        argv = ["dd", "if=/dev/zero", f"of={target}", "oflag=direct", "conv=notrunc"]
    else:
        argv = ["dd", f"if={target}", "of=/dev/null", "iflag=direct"]
    start = time.monotonic()
    quiet([*argv, "bs=1M", f"count={mib}", "status=none"])
    return mib / (time.monotonic() - start)


ZERO_REGION = 1 << 30  # each zero check reads 1 GiB
ZERO_COLD_ROUNDS = 3  # first-read rounds of dd and cva (median); the hand tools once


def zero_cold_regions() -> int:
    """How many fresh 1 GiB regions `zero_scan_rates` reads (the plan's cold disk size)."""
    return 2 * ZERO_COLD_ROUNDS + len(ZERO_TOOLS)


def zero_scan_rates(dev: str, cold_dev: str | None) -> dict[str, float]:
    """MiB/s over 1 GiB of blank disk: cva's scan, `dd ... of=/dev/null` (the read floor) and
    each hand tool of ZERO_TOOLS, measured two ways:
    - `cold:` on the first read of a region (a fresh 1 GiB region of `cold_dev` for every
      measurement), as a create sees a new disk: the host reads its image (sparse holes)
      through its page cache. dd and cva alternate over ZERO_COLD_ROUNDS rounds (median); the
      slow hand tools run once;
    - warm, the second round over `dev`: the host's page cache holds the image, so the read
      costs the host a memcpy, and the guest's emulated (TCG) CPU is all that limits a tool
      that looks at the bytes; dd, which never looks, is not limited by it.
    The fastest tool on the first read becomes (b)'s zero check (section 1 creates on fresh
    disks)."""
    from luks import blank

    def measure(key: str, path: str, offset: int) -> float:
        start = time.monotonic()
        if key == "dd_null":
            quiet([
                "dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct,skip_bytes,count_bytes",
                f"skip={offset}", f"count={ZERO_REGION}", "status=none",
            ])  # fmt: skip
        elif key == "cva":
            scan = blank.scan_zeros(Path(path), offset, ZERO_REGION)
            if not scan.zero:
                raise RuntimeError(f"{path} is not blank (byte {scan.first_nonzero})")
        else:
            tool = ZERO_TOOLS[key.removeprefix("tool:")]
            sh(tool.format(dev=path, size=ZERO_REGION, offset=offset))
        return ZERO_REGION / MIB / (time.monotonic() - start)

    tools = [f"tool:{n}" for n in ZERO_TOOLS]
    out: dict[str, float] = {"bytes": float(ZERO_REGION)}
    if cold_dev:
        regions = iter(range(0, zero_cold_regions() * ZERO_REGION, ZERO_REGION))
        rounds: dict[str, list[float]] = {"dd_null": [], "cva": []}
        for n in range(ZERO_COLD_ROUNDS):
            for key in ("dd_null", "cva") if n % 2 == 0 else ("cva", "dd_null"):
                rounds[key].append(measure(key, cold_dev, next(regions)))
        for key, rates in rounds.items():
            out[f"cold:{key}_mib_s"] = statistics.median(rates)
            out[f"cold:{key}_rounds"] = float(len(rates))
        for key in tools:
            out[f"cold:{key}_mib_s"] = measure(key, cold_dev, next(regions))
    for _ in range(2):  # the second round counts (the first warms the host's page cache)
        for key in ("dd_null", "cva", *tools):
            out[f"{key}_mib_s"] = measure(key, dev, 0)
    rates = {n: out.get(f"cold:tool:{n}_mib_s", out[f"tool:{n}_mib_s"]) for n in ZERO_TOOLS}
    CHOSEN["zero_tool"] = max(ZERO_TOOLS, key=lambda n: rates[n])
    out["fastest_tool"] = float(list(ZERO_TOOLS).index(CHOSEN["zero_tool"]))
    return out


def random_iops(target: str, region: int, ops: int, *, write: bool) -> float:
    """4 KiB O_DIRECT reads or writes at random 4 KiB offsets inside the first `region` bytes."""
    fd = os.open(target, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        buf.write(os.urandom(4096))
        rng = random.Random(4096)
        offsets = [rng.randrange(region // 4096) * 4096 for _ in range(ops)]
        start = time.monotonic()
        for off in offsets:
            if write:
                os.pwritev(fd, [buf], off)
            else:
                os.preadv(fd, [buf], off)
        if write:
            os.fsync(fd)
        return ops / (time.monotonic() - start)
    finally:
        os.close(fd)


def io_suite(target: str, mib: int, ops: int) -> dict[str, float]:
    region = mib * MIB
    return {
        "seq_write_mib_s": dd_rate(target, mib, write=True),
        "seq_read_mib_s": dd_rate(target, mib, write=False),
        "rand_write_iops": random_iops(target, region, ops, write=True),
        "rand_read_iops": random_iops(target, region, ops, write=False),
    }


# --- the run ------------------------------------------------------------------------------
class Recorder:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.doc: dict[str, Any] = {"items": {}, "errors": {}, "log": []}

    def log(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self.doc["log"].append(line)

    def save(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2))
        tmp.replace(self.out)

    def item(self, key: str, fn: Any, *args: Any) -> Any:
        start = time.monotonic()
        try:
            value = fn(*args)
        except Exception as exc:  # record and go on: one broken variant must not stop the run
            self.doc["errors"][key] = f"{type(exc).__name__}: {exc}"[:500]
            self.log(f"{key}: FAILED {exc}")
            traceback.print_exc()
            self.save()
            return None
        self.doc["items"][key] = value
        self.log(f"{key}: {value} ({time.monotonic() - start:.1f} s)")
        self.save()
        return value


def run(plan: dict[str, Any], out: Path) -> int:
    rec = Recorder(out)
    rec.doc["plan"] = plan
    (RUN / "run").mkdir(parents=True, exist_ok=True)
    (RUN / "volumes").mkdir(parents=True, exist_ok=True)
    rec.doc["guest"] = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "mem_mib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB,
        "cryptsetup": subprocess.run(
            ["cryptsetup", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }
    rec.save()
    warm = plan.get("warmup_disk")
    if warm:  # still blank: the zero-scan rates first, and (b)'s zero tool with them
        cold = plan.get("zero_cold_disk")
        rates = rec.item("zero-scan", zero_scan_rates, by_id(warm), cold and by_id(cold))
        rec.doc["zero_tool"] = CHOSEN["zero_tool"]
        rec.doc["zero_tools"] = ZERO_TOOLS
        if rates:
            rec.log(f"(b)'s zero check: {CHOSEN['zero_tool']}")
    if warm:
        # not recorded: the first run of python, libcryptsetup, mkfs and mount in a fresh guest
        # pays for cold caches; whoever went first would carry that
        warm_case = {"size_gib": 0, "disks": {"cva": warm, "profile": warm}}
        for variant in ("cva", "profile"):
            rec.item(f"warmup/{variant}", _step(variant, "warmup", warm_case, False), "create")
            _close(variant, 0, False)
    io = plan.get("io")
    smallest = min((c["size_gib"] for c in plan["cases"]), default=0)
    last_small = max(
        (i for i, c in enumerate(plan["cases"]) if c["size_gib"] == smallest), default=-1
    )
    for index, case in enumerate(plan["cases"]):
        size_gib, integ = case["size_gib"], bool(case["integrity"])
        tag = f"{size_gib}g-{'int' if integ else 'plain'}"
        variants = list(case["variants"])
        # create once per variant (a blank disk each), then reopen in interleaved rounds
        for variant in variants:
            step = _step(variant, tag, case, integ)
            rec.item(f"{tag}/{variant}/create", step, "create")
            _close(variant, size_gib, integ)
            if variant != "cva":
                rec.item(f"{tag}/{variant}/header", luks_params, by_id(case["disks"][variant]))
        rounds: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for n in range(int(plan.get("reopen_rounds", 3))):
            for variant in variants:
                step = _step(variant, tag, case, integ)
                got = rec.item(f"{tag}/{variant}/reopen{n}", step, "reopen")
                _close(variant, size_gib, integ)
                if got:
                    rounds[variant].append(got)
        for variant, runs in rounds.items():
            if runs:
                rec.item(f"{tag}/{variant}/reopen", _median_of, runs)
        if io and index == last_small:
            _io(rec, io)  # before the big disks: a run cut short still has the I/O numbers
    rec.log("done")
    rec.save()
    return 0


def _step(variant: str, tag: str, case: dict[str, Any], integ: bool) -> Any:
    """A callable doing `create` or `reopen` for this variant and case; returns its numbers."""
    serial = case["disks"][variant]
    if variant == "cva":
        name = f"b{case['size_gib']}{'i' if integ else 'p'}"
        return lambda _what: _cva_pair("prepare", name, serial, integ)
    fns = {"create": cli_create, "reopen": cli_reopen}
    return lambda what: _cli_pair(fns[what], variant, by_id(serial), integ)


def _close(variant: str, size_gib: int, integ: bool) -> None:
    """Unmount and close (not measured): what ReleaseVolumes / a CLI teardown does."""
    if variant == "cva":
        name = f"b{size_gib}{'i' if integ else 'p'}"
        quiet(["umount", str(RUN / "volumes" / name)], check=False)
        quiet(["cryptsetup", "close", f"cva-{name}"], check=False)
    else:
        cli_close()


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median seconds over the rounds, max RSS, and how many rounds there were."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "rss_mib"}
    out["rss_mib"] = max(r["rss_mib"] for r in runs)
    out["rounds"] = len(runs)
    return out


def _cva_pair(action: str, name: str, serial: str, integrity: bool) -> dict[str, float]:
    return cva_call(action, name, serial, integrity)


def _cli_pair(fn: Any, variant: str, dev: str, integrity: bool) -> dict[str, float]:
    seconds, rss = fn(variant, dev, integrity)
    return {"seconds": seconds, "rss_mib": rss}


def _io(rec: Recorder, io: dict[str, Any]) -> None:
    """Open every layout at once, then measure them in interleaved rounds (median per column)."""
    mib, ops, rounds = int(io["mib"]), int(io["ops"]), int(io.get("rounds", 3))
    targets: dict[str, str] = {}

    def setup_raw() -> str:
        dev = by_id(io["raw_disk"])
        quiet(["pvcreate", "-ff", "-y", dev])
        quiet(["vgcreate", "benchvg", dev])
        quiet(["lvcreate", "-y", "-n", "raw", "-L", f"{mib * 2}M", "benchvg"])
        return "/dev/benchvg/raw"

    def setup_cva(name: str, serial: str, integ: bool) -> str:
        cva_call("prepare", name, serial, integ)
        quiet(["umount", str(RUN / "volumes" / name)])
        return f"/dev/mapper/cva-{name}"

    def setup_cdh() -> str:
        key = f"printf %s '{PASSPHRASE}'"
        sh(f"{key} | cryptsetup open --key-file=- {by_id(io['cdh_disk'])} bench-cli")
        return "/dev/mapper/bench-cli"

    layouts: list[tuple[str, Any, tuple[Any, ...]]] = [("io/raw-lv", setup_raw, ())]
    if io.get("cva_disk"):
        layouts.append(("io/cva", setup_cva, ("b1p", io["cva_disk"], False)))
    if io.get("cdh_disk"):
        layouts.append(("io/cdh", setup_cdh, ()))
    if io.get("cva_integrity_disk"):
        layouts.append(("io/cva-integrity", setup_cva, ("b1i", io["cva_integrity_disk"], True)))
    for key, fn, args in layouts:
        path = rec.item(f"{key}/setup", fn, *args)
        if path:
            targets[key] = path
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in targets}
    for n in range(rounds):
        for key, path in targets.items():
            got = rec.item(f"{key}/round{n}", io_suite, path, mib, ops)
            if got:
                samples[key].append(got)
    for key, runs in samples.items():
        if runs:
            rec.item(
                key, lambda runs=runs: {f: statistics.median(r[f] for r in runs) for f in runs[0]}
            )
    quiet(["vgchange", "-an", "benchvg"], check=False)
    for name in ("cva-b1p", "cva-b1i"):
        quiet(["cryptsetup", "close", name], check=False)
    cli_close()


def main(argv: list[str]) -> int:
    if argv and argv[0] == "child":
        return child(argv[1:])
    if len(argv) != 3 or argv[0] != "run":
        print(__doc__, file=sys.stderr)
        return 2
    plan = json.loads(Path(argv[1]).read_text())
    return run(plan, Path(argv[2]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
