"""A kata-shaped container launcher for the guest tests (test-only; root; stdlib only).

Does what kata-agent's rustjail does around the guest prestart hooks (SPEC §e.7), for one
guest-side OCI bundle `<bundle>/{config.json,rootfs/}`:

- the child (the container's init) unshares a new mount namespace, makes `/` MS_REC|MS_SLAVE,
  makes the rootfs's parent mount private, bind-mounts the rootfs onto itself (MS_BIND|MS_REC),
  mounts proc and a tmpfs /dev in it and makes the device nodes of the spec's `linux.devices`
  (with the spec's major/minor), then tells the parent and waits;
- the parent runs every regular executable file of `<hooks>/prestart/` (symlinks and
  non-executables skipped, as `find_hooks` does) with an empty environment, argv
  `[<file name>, "prestart"]`, the OCI state JSON on stdin, cwd the bundle, SIGKILLed after
  `--hook-timeout` (kata: 10 s); its exit status is only reported, as kata only logs it;
- then the child pivot_roots into the rootfs and, at "start" (`--start-delay` later: kata's
  StartContainer is a separate request after CreateContainer answered), runs the container process:
  it reports its mount table, stats the `--check` paths, writes/reads files, lists /dev.

Prints one JSON object: the hooks' results, what is mounted under the rootfs in the launcher's
(the agent's) namespace after the hooks ran, whether the container started, and what the
container saw. If the init was killed (by the hook or by cva), `started` is false.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE, MS_SLAVE = 4096, 16384, 1 << 18, 1 << 19
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}[os.uname().machine]

libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        libc.mount(
            src.encode() if src else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def mountinfo() -> list[dict[str, str]]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        sep = f.index("-")
        out.append(
            {
                "id": f[0],
                "dev": f[2],
                "root": f[3],
                "mountpoint": f[4],
                "fstype": f[sep + 1],
                "source": f[sep + 2],
            }
        )
    return out


def parent_mountpoint(path: str) -> str:
    best = "/"
    for m in mountinfo():
        mp = m["mountpoint"]
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
            best = mp
    return best


def _send(fd: int, msg: dict[str, Any]) -> None:
    os.write(fd, json.dumps(msg).encode() + b"\n")


def _recv(fd: int, timeout: float) -> dict[str, Any] | None:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return None
        data += chunk
    doc: dict[str, Any] = json.loads(data)
    return doc


# --- the child: the container's init ---------------------------------------------------------


def init_rootfs(rootfs: str, devices: list[dict[str, Any]]) -> None:
    _check(libc.unshare(CLONE_NEWNS), "unshare")
    mount(None, "/", None, MS_REC | MS_SLAVE)
    mount(None, parent_mountpoint(os.path.dirname(rootfs)), None, MS_PRIVATE)
    mount(rootfs, rootfs, None, MS_BIND | MS_REC)
    os.makedirs(f"{rootfs}/proc", exist_ok=True)
    mount("proc", f"{rootfs}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(f"{rootfs}/dev", exist_ok=True)
    mount("tmpfs", f"{rootfs}/dev", "tmpfs", MS_NOSUID, "mode=755")
    for dev in devices:
        path = f"{rootfs}{dev['path']}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        kind = stat.S_IFBLK if dev.get("type", "b") == "b" else stat.S_IFCHR
        os.mknod(path, kind | 0o660, os.makedev(int(dev["major"]), int(dev["minor"])))


def pivot(rootfs: str) -> None:
    os.chdir(rootfs)
    _check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def container_process(args: argparse.Namespace, devices: list[dict[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {"mounts": [m for m in mountinfo() if m["mountpoint"] != "/"]}
    root_dev = os.stat("/").st_dev
    seen["paths"] = {}
    for path in args.check:
        try:
            st = os.stat(path)
            seen["paths"][path] = {
                "dev": f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}",
                "own_fs": st.st_dev != root_dev,
                "mode": oct(st.st_mode & 0o7777),
            }
        except OSError as exc:
            seen["paths"][path] = {"error": exc.strerror}
    seen["wrote"] = {}
    for spec in args.write:
        path, _, text = spec.partition("=")
        try:
            with open(path, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            seen["wrote"][path] = True
        except OSError as exc:
            seen["wrote"][path] = exc.strerror
    seen["read"] = {}
    for path in args.read:
        try:
            seen["read"][path] = Path(path).read_text()
        except OSError as exc:
            seen["read"][path] = {"error": exc.strerror}
    seen["devices"] = {d["path"]: os.path.lexists(d["path"]) for d in devices}
    os.sync()
    return seen


def child(
    args: argparse.Namespace, rootfs: str, devices: list[dict[str, Any]], r: int, w: int
) -> None:
    try:
        init_rootfs(rootfs, devices)
        _send(w, {"step": "ready"})
        if (_recv(r, 120) or {}).get("step") != "go":
            os._exit(3)
        pivot(rootfs)
        _send(w, {"step": "pivoted"})
        if (_recv(r, 120) or {}).get("step") != "start":
            os._exit(3)
        _send(w, {"step": "result", "seen": container_process(args, devices)})
        os._exit(0)
    except BaseException as exc:
        try:
            _send(w, {"step": "error", "error": f"{type(exc).__name__}: {exc}"})
        finally:
            os._exit(2)


# --- the parent: kata-agent ------------------------------------------------------------------


def find_hooks(hooks: Path) -> list[Path]:
    found = []
    folder = hooks / "prestart"
    if folder.is_dir():
        for entry in os.scandir(folder):
            mode = entry.stat(follow_symlinks=False).st_mode
            if entry.is_file(follow_symlinks=False) and mode & 0o111:  # kata: any execute bit
                found.append(Path(entry.path))
    return found


def run_hook(
    path: Path, state: bytes, bundle: str, timeout: float, pid_file: str | None = None
) -> dict[str, Any]:
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            [path.name, "prestart"],
            executable=str(path),
            env={},
            cwd=bundle,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:  # kata logs it and goes on with the next hook
        return {
            "name": path.name,
            "rc": None,
            "killed_at_timeout": False,
            "seconds": 0.0,
            "stdout": "",
            "stderr": f"spawn failed: {exc.strerror}",
        }
    if pid_file:
        Path(pid_file).write_text(f"{proc.pid}\n")
    killed = False
    try:
        out, err = proc.communicate(state, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # kata: SIGKILL at DEFAULT_HOOK_TIMEOUT_SEC
        out, err = proc.communicate()
        killed = True
    return {
        "name": path.name,
        "rc": proc.returncode,
        "killed_at_timeout": killed,
        "seconds": round(time.monotonic() - started, 3),
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", required=True)
    p.add_argument("--hooks", required=True, type=Path)
    p.add_argument("--hook-timeout", type=float, default=10.0)
    # kata: the hooks run in CreateContainer; the process starts at StartContainer, a separate
    # request from the host that comes after CreateContainer has answered
    p.add_argument("--start-delay", type=float, default=1.0)
    p.add_argument("--hook-pid-file", default=None)  # tests kill the hook from outside
    p.add_argument("--check", action="append", default=[])
    p.add_argument("--write", action="append", default=[])
    p.add_argument("--read", action="append", default=[])
    args = p.parse_args()
    bundle = args.bundle
    spec = json.loads(Path(bundle, "config.json").read_text())
    rootfs = os.path.join(bundle, spec.get("root", {}).get("path", "rootfs"))
    devices = spec.get("linux", {}).get("devices", [])
    c_r, p_w = os.pipe()
    p_r, c_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(p_w)
        os.close(p_r)
        child(args, rootfs, devices, c_r, c_w)
    os.close(c_r)
    os.close(c_w)
    report: dict[str, Any] = {"init_pid": pid, "hooks": [], "started": False}
    msg = _recv(p_r, 60)
    if not msg or msg.get("step") != "ready":
        report["error"] = f"the init did not set up its rootfs: {msg}"
    else:
        state = json.dumps(
            {
                "ociVersion": spec.get("ociVersion", "1.1.0"),
                "id": os.path.basename(bundle),
                "status": "created",
                "pid": pid,
                "bundle": bundle,
                "annotations": spec.get("annotations", {}),
            }
        ).encode()
        for hook in find_hooks(args.hooks):
            report["hooks"].append(
                run_hook(hook, state, bundle, args.hook_timeout, args.hook_pid_file)
            )
        report["agent_ns_mounts_under_rootfs"] = [
            m for m in mountinfo() if m["mountpoint"].startswith(rootfs + "/")
        ]
        try:
            _send(p_w, {"step": "go"})
            msg = _recv(p_r, 60)
            if msg and msg.get("step") == "pivoted":
                time.sleep(args.start_delay)
                _send(p_w, {"step": "start"})
                msg = _recv(p_r, 120)
                if msg and msg.get("step") == "result":
                    report["started"] = True
                    report["container"] = msg["seen"]
            if msg and msg.get("step") == "error":
                report["error"] = msg["error"]
        except OSError as exc:
            report["error"] = f"the init is gone: {exc.strerror}"
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    if alive and not report["started"]:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    report["init_status"] = (
        f"signal {os.WTERMSIG(status)}"
        if os.WIFSIGNALED(status)
        else f"exit {os.WEXITSTATUS(status)}"
    )
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
