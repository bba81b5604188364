"""Guest side of the Kata-path benchmark (issue 16): inside the qemu guest, as root, /mnt/vmsrc.

`python -m bench.guest_kata run PLAN.json OUT.json` measures

- rpc: unary latency (one call in flight, median) of
    direct       grpc Health/Check on the private unix socket (grpc.aio, as `cva serve`)
    vsock        the same call over AF_VSOCK (vsock_loopback, CID 1) through cva's vsock
                 listener and splice (`agent.rpc.vsock`). grpcio cannot dial vsock, so the client
                 reaches AF_VSOCK through a unix->vsock bridge (`tests.tools.tcp_forward`);
    bridge       the same bridge straight into the private socket (no vsock, no splice): the
                 bridge's own cost, subtracted from `vsock` for the splice's estimate;
    ttrpc_vsock  a ttRPC call over AF_VSOCK to cva's ttRPC server (`agent.rpc.ttrpc`, native vsock
                 client, no bridge), a 64-byte payload echoed back.
- securemount: kata-agent's exact emptyDir request (SPEC e.5: deviceId MAJ:MIN, sourceType
  empty, targetType fileSystem, filesystemType ext4, mkfsOpts `-O ^has_journal -m 0 -i 163840
  -I 128`, encryptionType luks2, dataIntegrity "true"/"false", flags [], no key; mount point
  /run/kata-containers/sandbox/storage/<base64url>) sent over ttRPC to cva's SecureMount service
  (`agent.securemount.decisions` + `agent.securemount.volumes`, the daemon's backend), time from
  request to answer; vs `cdh`: CDH's own command sequence (SPEC e.3) as a shell script on a twin
  disk.

Each item is saved as it finishes (OUT.json rewritten), so a timeout keeps what was measured.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

RUN = Path("/run/cva-bench-kata")
KATA_MKFS = "-O ^has_journal -m 0 -i 163840 -I 128"
VMADDR_CID_LOCAL = 1
GRPC_PORT = 1040
TTRPC_PORT = 1041


def by_id(serial: str) -> str:
    return f"/dev/disk/by-id/virtio-{serial}"


def devno(path: str) -> str:
    st = os.stat(os.path.realpath(path))
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def storage_mount_point(dev: str) -> str:
    """Where kata-agent mounts a block emptyDir: sandbox storage dir + base64url(source)."""
    tag = base64.urlsafe_b64encode(dev.encode()).decode().rstrip("=")
    return f"/run/kata-containers/sandbox/storage/{tag}"


def sh(script: str, timeout: float = 600.0) -> float:
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"script failed (rc {proc.returncode}): {proc.stderr.strip()[-400:]}")
    return seconds


# --- rpc latency ------------------------------------------------------------------------------
async def _grpc_median(address: str, calls: int) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        req = health_pb2.HealthCheckRequest()
        for _ in range(50):
            await stub.Check(req)
        out = []
        for _ in range(calls):
            t = time.perf_counter()
            await stub.Check(req)
            out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


async def _ttrpc_median(calls: int) -> float:
    from agent._proto.ttrpc import ttrpc_pb2
    from agent.rpc.ttrpc import MessageType, encode_frame, parse_header
    from tests.tools.tcp_forward import open_vsock

    reader, writer = await open_vsock(VMADDR_CID_LOCAL, TTRPC_PORT)
    out = []
    sid = 1
    try:
        for n in range(calls + 50):
            req = ttrpc_pb2.Request(service="bench.Echo", method="Echo", payload=b"x" * 64)
            t = time.perf_counter()
            writer.write(encode_frame(sid, MessageType.REQUEST, req.SerializeToString()))
            header = parse_header(await reader.readexactly(10))
            await reader.readexactly(header.length)
            if n >= 50:
                out.append(time.perf_counter() - t)
            sid += 2
    finally:
        writer.close()
    return statistics.median(out) * 1e3


async def rpc(calls: int) -> dict[str, float]:
    import grpc
    from grpc_health.v1 import health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    from agent.rpc.ttrpc import CallContext, TtrpcServer
    from agent.rpc.vsock import SpliceListener, vsock_listen_socket
    from tests.tools.tcp_forward import make_handler, open_vsock

    subprocess.run(["modprobe", "vsock_loopback"], check=True, timeout=30)

    async def echo(payload: bytes, ctx: CallContext) -> bytes:
        return payload

    with tempfile.TemporaryDirectory() as tmp:
        private, vbridge, ubridge = (Path(tmp) / n for n in ("grpc.sock", "v.sock", "u.sock"))
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
        server.add_insecure_port(f"unix:{private}")
        await server.start()
        splice = SpliceListener(vsock_listen_socket(GRPC_PORT), private)
        await splice.start()
        ttrpc = TtrpcServer()
        ttrpc.register("bench.Echo/Echo", echo)
        await ttrpc.listen_socket(vsock_listen_socket(TTRPC_PORT))
        quiet = lambda _s: None  # noqa: E731
        b1 = await asyncio.start_unix_server(
            make_handler(lambda: open_vsock(VMADDR_CID_LOCAL, GRPC_PORT), quiet), str(vbridge)
        )
        b2 = await asyncio.start_unix_server(
            make_handler(lambda: asyncio.open_unix_connection(str(private)), quiet), str(ubridge)
        )
        got: dict[str, list[float]] = {"direct": [], "vsock": [], "bridge": [], "ttrpc_vsock": []}
        try:
            for _ in range(3):  # interleaved rounds, median of medians
                got["direct"].append(await _grpc_median(f"unix:{private}", calls))
                got["vsock"].append(await _grpc_median(f"unix:{vbridge}", calls))
                got["bridge"].append(await _grpc_median(f"unix:{ubridge}", calls))
                got["ttrpc_vsock"].append(await _ttrpc_median(calls))
        finally:
            b1.close()
            b2.close()
            await ttrpc.close(0)
            await splice.close()
            await server.stop(0)
    out = {f"{k}_ms": statistics.median(v) for k, v in got.items()}
    out["calls"] = float(calls)
    return out


# --- SecureMount: cva ---------------------------------------------------------------------
class CvaSecureMount:
    """cva's SecureMount service (the daemon's backend) on a ttRPC unix socket, in this process."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.sock = state / "cdh.sock"

    async def start(self) -> None:
        from agent.rpc.ttrpc import TtrpcServer
        from agent.securemount.decisions import SecureMountService, policy_from_allow
        from agent.securemount.volumes import ManagerSecureMountBackend

        self.state.mkdir(parents=True, exist_ok=True)
        # the ephemeral path never touches the VolumeManager (contract volumes only)
        self.backend = ManagerSecureMountBackend(None, self.state)  # type: ignore[arg-type]
        service = SecureMountService(
            self.backend,
            (),
            policy=policy_from_allow(frozenset({"SecureMountEphemeral"})),
            header_dir=self.state / "securemount" / "headers",
        )
        self.server = TtrpcServer()
        service.register(self.server)
        await self.server.listen_unix(self.sock)

    async def call(self, dev: str, integrity: bool) -> float:
        """kata-agent's exact block-emptyDir request; seconds from request to answer."""
        from agent._proto.cdh import api_pb2
        from agent._proto.ttrpc import ttrpc_pb2
        from agent.rpc.ttrpc import MessageType, encode_frame, parse_header

        mount_point = storage_mount_point(dev)
        Path(mount_point).mkdir(parents=True, exist_ok=True)  # kata-agent does create_dir_all
        req = api_pb2.SecureMountRequest(
            volume_type="block-device",
            options={
                "deviceId": devno(dev),
                "sourceType": "empty",
                "targetType": "fileSystem",
                "filesystemType": "ext4",
                "mkfsOpts": KATA_MKFS,
                "encryptionType": "luks2",
                "dataIntegrity": "true" if integrity else "false",
            },
            flags=[],
            mount_point=mount_point,
        )
        frame = ttrpc_pb2.Request(
            service="api.SecureMountService",
            method="SecureMount",
            payload=req.SerializeToString(),
            timeout_nano=50 * 10**9,  # kata-agent's agent.cdh_api_timeout default
        )
        reader, writer = await asyncio.open_unix_connection(str(self.sock))
        try:
            start = time.monotonic()
            writer.write(encode_frame(1, MessageType.REQUEST, frame.SerializeToString()))
            header = parse_header(await reader.readexactly(10))
            body = await reader.readexactly(header.length)
            seconds = time.monotonic() - start
        finally:
            writer.close()
        resp = ttrpc_pb2.Response.FromString(body)
        if resp.status.code != 0:
            raise RuntimeError(f"SecureMount failed: {resp.status.code} {resp.status.message}")
        return seconds

    async def release(self, dev: str) -> None:
        """What happens when the pod goes: kata-agent unmounts, cva's sweep closes the rest."""
        subprocess.run(["umount", storage_mount_point(dev)], check=False, timeout=60)
        await self.backend.sweep()

    async def close(self) -> None:
        await self.server.close(0)


# --- SecureMount: CDH's own sequence (SPEC e.3) -------------------------------------------
def cdh_script(dev: str, integrity: bool, name: str) -> str:
    """CDH >= v0.20.0 for an `empty` block device: 16 MiB detached header in tmpfs, luksFormat
    with cryptsetup's defaults (argon2id keyslot) + CDH's options, luksOpen, then (integrity) the
    mkfs dry run and a 4 KiB direct zero-write at block 0 and every backup superblock, mkfs.ext4
    with kata's mkfsOpts (+ lazy_itable_init=0 with integrity), mount. Key: 4096 random bytes on
    stdin, as CDH's ephemeral key."""
    hdr_dir = "/run/confidential-containers/cdh/luks-headers"
    tag = base64.urlsafe_b64encode(dev.encode()).decode().rstrip("=")
    hdr = f"{hdr_dir}/{tag}.header"
    mp = storage_mount_point(dev)
    integ = (
        " --integrity hmac-sha256 --integrity-no-wipe --integrity-no-journal" if integrity else ""
    )
    mapped = f"/dev/mapper/{name}"
    prewrite = ""
    extra = ""
    if integrity:
        prewrite = f"""
blocks=$(mkfs.ext4 -F -n {mapped} 2>/dev/null | sed -n '/Superblock backups/,/^$/p' \\
         | tail -n +2 | tr -d ' \\t' | tr ',' '\\n' | grep -E '^[0-9]+$' || true)
for n in 0 $blocks; do
  dd if=/dev/zero of={mapped} bs=4k count=1 oflag=direct seek=$n status=none
done"""
        extra = " -E lazy_itable_init=0"
    return f"""
mkdir -p {hdr_dir} {mp}
key=$(mktemp -p /run) ; head -c 4096 /dev/urandom > "$key"
truncate -s 16M {hdr}
cryptsetup --batch-mode luksFormat --type luks2 --cipher aes-xts-plain64 --sector-size 4096 \\
  --header {hdr}{integ} {dev} - < "$key"
cryptsetup luksOpen --header {hdr} -d - {dev} {name} < "$key"
rm -f "$key"{prewrite}
mkfs.ext4 {mapped} -F {KATA_MKFS}{extra} > /dev/null 2>&1
mount -t ext4 -o noatime {mapped} {mp}
"""


def cdh_release(dev: str, name: str) -> None:
    subprocess.run(["umount", storage_mount_point(dev)], check=False, timeout=60)
    subprocess.run(["cryptsetup", "luksClose", name], check=False, timeout=60)


# --- the run ------------------------------------------------------------------------------
class Recorder:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.doc: dict[str, Any] = {"items": {}, "errors": {}}

    def save(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2))
        tmp.replace(self.out)

    def put(self, key: str, value: Any) -> None:
        self.doc["items"][key] = value
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {value}", flush=True)
        self.save()

    def fail(self, key: str, exc: BaseException) -> None:
        self.doc["errors"][key] = f"{type(exc).__name__}: {exc}"[:500]
        print(f"{key}: FAILED {exc}", flush=True)
        traceback.print_exc()
        self.save()


async def run(plan: dict[str, Any], out: Path) -> int:
    rec = Recorder(out)
    rec.doc["plan"] = plan
    rec.doc["guest"] = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "mem_mib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20),
    }
    rec.save()
    try:
        rec.put("rpc", await rpc(int(plan.get("calls", 1000))))
    except Exception as exc:  # record and go on
        rec.fail("rpc", exc)
    cva = CvaSecureMount(RUN / "cva")
    await cva.start()
    warm = plan.get("warmup_disk")
    if warm:  # not recorded: first imports (luks.ephemeral, libcryptsetup) and cold caches
        try:
            await cva.call(by_id(warm), True)
            await cva.release(by_id(warm))
            cdh_release(by_id(warm), "x")
        except Exception as exc:
            rec.fail("warmup", exc)
    for case in plan["cases"]:
        tag = f"{case['size_gib']}g-{'int' if case['integrity'] else 'plain'}"
        for variant in ("cva", "cdh"):
            dev = by_id(case["disks"][variant])
            key = f"{tag}/{variant}"
            try:
                if variant == "cva":
                    seconds = await cva.call(dev, bool(case["integrity"]))
                    await cva.release(dev)
                else:
                    name = f"cdh-{tag}"
                    try:
                        seconds = sh(cdh_script(dev, bool(case["integrity"]), name))
                    finally:
                        cdh_release(dev, name)
                rec.put(key, {"seconds": seconds})
            except Exception as exc:
                rec.fail(key, exc)
    await cva.close()
    rec.put("done", True)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "run":
        print(__doc__, file=sys.stderr)
        return 2
    plan = json.loads(Path(argv[1]).read_text())
    return asyncio.run(run(plan, Path(argv[2])))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
