"""What `cva serve` imports before READY=1 (bench/footprint.py, issue 8 #5).

The start path needs the config, the initdata, the contract, the evidence for the binding check
and the gRPC service (and, of the storage stack, only its stdlib-only refusal type and key
buffer: luks.errors, luks.secret). The KBS client (httpx, cryptography), the storage code
(luks.*, pyudev, libcryptsetup), the ttRPC/SecureMount fronts and the TPM attester are imported
where they are first used: at the first key fetch, the first volume step, only when configured,
only for that TEE; the other command groups' parsers not at all. These tests run the real start
path (`cva serve` through `agent.cli.main`) in a fresh interpreter up to READY=1 and list the
modules loaded by then, and check that the first request still reaches the lazily imported KBS
client and storage code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cva
from tests.daemon_support import SAMPLE_IMAGE_CONFIG, make_bundle
from tests.kbs.server import LoopbackKbs

# `cva serve` in this interpreter; at READY=1 print the loaded modules and leave at once.
_PROBE = """
import json, os, sys
import agent.sdnotify

def ready(self, status=None):
    sys.stdout.write(json.dumps(sorted(sys.modules)) + "\\n")
    sys.stdout.flush()
    os._exit(0)

agent.sdnotify.Notifier.ready = ready
import agent.cli
sys.exit(agent.cli.main(["serve", "--config", sys.argv[1]]))
"""

# top-level packages and modules that must stay out of the start path
NOT_BEFORE_READY = (
    "httpx",
    "httpcore",
    "cryptography",
    "joserfc",
    "pyudev",
    "tpm2_pytss",
    "agent.kbs",  # the whole package: client, wire, jwe, errors
    "agent.securemount",  # the whole package: decisions, volumes, records, blockdev
    "agent.rpc.ttrpc",
    "agent.rpc.ttrpc_service",
    "agent._proto.cdh",
    "luks.volume",
    "luks.libcryptsetup",
    "luks.ephemeral",
    "luks.disk",
    "luks.mount",
    "luks.lvm",
    "luks.fs",
    "luks.header",
    "luks.token",
    "evidence.tpm",
    "evidence.tpm_quote",
    "evidence.tdx",
    "evidence.snp",
    # the other command groups' parsers (agent/cli/__init__.py builds only `serve`'s)
    "agent.cli.initdata",
    "agent.cli.kbs",
    "agent.cli.evidence",
    "agent.cli.luks",
)
# what the start path does need (so an empty or broken probe cannot pass)
BEFORE_READY = (
    "agent.cli.daemon",
    "agent.startup",
    "agent.trust",
    "agent.contract",
    "agent.initdata",
    "agent.rpc.grpc_service",
    "agent.luks_backend",
    "agent.binding",
    "evidence.sample",
    "evidence.tsm",  # the image's TEE decision probes configfs-tsm (sample is refused on TDX/SNP)
    "grpc",
)


def _config(
    tmp_path: Path, listen_extra: str = "", *, kbs_url: str | None = None, disk_wait: float = 60
) -> Path:
    text = (
        (REPO / "examples" / "initdata.toml").read_text().replace('tee = "auto"', 'tee = "sample"')
    )
    if kbs_url is not None:
        assert 'url = "https://kbs.example:8080"' in text
        text = text.replace('url = "https://kbs.example:8080"', f'url = "{kbs_url}"')
    (tmp_path / "initdata.toml").write_text(text)
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f"""
[listen]
vsock_port = 0
unix = "{tmp_path}/cva.sock"
{listen_extra}
[initdata]
devices = ["{tmp_path}/no-disk"]
toml = "{tmp_path}/initdata.toml"
[paths]
rootfs_base = "{tmp_path}/kata"
state_dir = "{tmp_path}/state"
mount_base = "{tmp_path}/state/volumes"
[timeouts]
disk_wait = {disk_wait}
[log]
level = "warning"
{SAMPLE_IMAGE_CONFIG}"""
    )
    return cfg


def _modules_at_ready(cfg: Path) -> set[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, str(cfg)],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    lines = r.stdout.decode().strip().splitlines()
    assert lines, r.stderr.decode(errors="replace")[-2000:]
    return set(json.loads(lines[-1]))


def _loaded(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_serve_reaches_ready_without_kbs_storage_or_ttrpc_code(tmp_path: Path) -> None:
    modules = _modules_at_ready(_config(tmp_path))
    missing = [name for name in BEFORE_READY if name not in modules]
    assert not missing, f"the probe did not run the start path: {missing} not loaded"
    loaded = [name for name in NOT_BEFORE_READY if _loaded(modules, name)]
    assert not loaded, f"imported before READY=1 (make them lazy again): {loaded}"


def test_ttrpc_front_is_loaded_when_configured(tmp_path: Path) -> None:
    """The lazily imported ttRPC/SecureMount front still starts when the config asks for it."""
    modules = _modules_at_ready(_config(tmp_path, f'ttrpc = "unix://{tmp_path}/cdh.sock"'))
    for name in ("agent.rpc.ttrpc", "agent.rpc.ttrpc_service", "agent.securemount.volumes"):
        assert name in modules
    lazy = ("httpx", "cryptography", "agent.kbs", "luks.ephemeral", "luks.libcryptsetup")
    loaded = [name for name in lazy if _loaded(modules, name)]
    assert not loaded, f"imported before READY=1 with ttRPC on: {loaded}"


@pytest.mark.parametrize(
    ("tee", "module"),
    [
        ("sample", "evidence.sample"),
        ("tpm", "evidence.tpm"),
        ("tdx", "evidence.tdx"),
        ("snp", "evidence.snp"),
    ],
)
def test_attester_modules_load_for_their_tee_only(tee: str, module: str) -> None:
    """Only the chosen TEE's attester loads, and without `cryptography`: the binding check
    parses reports and quotes; verifying them (cva evidence inspect) imports it."""
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from evidence.detect import attester_for\n"
        "try:\n"
        f"    attester_for({tee!r}, root=Path('/nonexistent'))\n"
        "except Exception:\n"
        "    pass\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('evidence.', 'crypto')))))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    loaded = set(r.stdout.decode().split())
    assert module in loaded
    others = {"evidence.tpm", "evidence.tdx", "evidence.snp"} - {module}
    if tee == "snp":
        others.discard("evidence.tdx")  # the SNP attester shares the TDX ioctl helpers
    assert not loaded & others
    assert not any(m.startswith("cryptography") for m in loaded), sorted(loaded)


def test_first_prepare_reaches_the_kbs_and_the_storage_code(tmp_path: Path) -> None:
    """A real `cva serve`: the first PrepareVolumes attests to the KBS and fetches the key
    (agent.kbs.client, imported then), then looks for the disk (luks.disk, luks.volume, imported
    then); the host has no such disk, so the call ends with the storage layer's refusal."""
    key = "kbs:///default/pgdata/luks"
    with LoopbackKbs({key: bytes(range(32))}) as kbs:
        cfg = _config(tmp_path, kbs_url=kbs.url, disk_wait=0.5)
        make_bundle(tmp_path / "kata", "c1", "postgres")
        notify = str(tmp_path / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
            rx.bind(notify)
            rx.settimeout(30)
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "serve", "--config", str(cfg)],
                cwd=REPO,
                env=dict(os.environ, PYTHONPATH=str(REPO), NOTIFY_SOCKET=notify),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                end = time.monotonic() + 30
                while "READY=1" not in rx.recv(4096).decode().split("\n"):
                    assert time.monotonic() < end
                r = run_cva("prepare", "c1", "--address", f"unix:{tmp_path}/cva.sock")
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        fetched = [rec.path for rec in kbs.requests if rec.path.endswith("/pgdata/luks")]
    assert r.returncode != 0
    assert b"FAILED_PRECONDITION" in r.stderr, r.stderr
    assert b"disk serial:pgdisk did not appear" in r.stderr, r.stderr
    assert fetched, "the KBS was not asked for the key"
