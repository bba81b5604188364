"""Host-only checks of the E2E/demo scaffolding (no VM): what it hands the guest is valid."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from agent.contract import parse_contract
from agent.initdata import load_contract, parse_block_image, parse_initdata
from tests.vm import guest_control
from tests.vm.demo import SCENARIO as DEMO
from tests.vm.e2e import (
    DAEMON_CONFIG,
    KBS_GUEST_ADDR,
    Guest,
    GuestControl,
    GuestFailed,
    QuietForwardMachine,
    Scenario,
    World,
    contract_text,
    daemon_config,
    evidence_config,
    initdata_document,
    job_script,
    make_kbs_tls,
    oci_config,
    stage_script,
)
from tests.vm.machine import BEGIN_MARK, GuestForward, MachineSpec

CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_kbs_tls(tmp_path_factory.mktemp("tls")).ca_pem


@pytest.mark.parametrize("scenario", [Scenario(), Scenario(tee="tpm", lvm=False), DEMO])
def test_contract_is_valid_and_says_what_the_scenario_says(scenario: Scenario, tls: str) -> None:
    contract = parse_contract(contract_text(scenario, tls))
    assert contract.kbs.tee == scenario.tee
    assert contract.kbs.url == f"https://{KBS_GUEST_ADDR}:8443"
    assert contract.kbs.cert is not None and "BEGIN CERTIFICATE" in contract.kbs.cert
    assert contract.api.allow == frozenset(scenario.allow)
    (vol,) = contract.volumes
    assert (vol.name, vol.mount, vol.containers) == (
        scenario.volume,
        scenario.mount,
        (scenario.container_name,),
    )
    assert str(vol.disk.value) == scenario.serial
    assert vol.create is True
    assert (vol.lvm is not None) == scenario.lvm


def test_contract_volume_for_every_container_and_the_securemount_methods(tls: str) -> None:
    scenario = Scenario(containers=(), allow=("SecureMount", "SecureMountEphemeral"), lvm=False)
    contract = parse_contract(contract_text(scenario, tls))
    (vol,) = contract.volumes
    assert vol.containers == ()
    assert vol.applies_to("any-container")
    assert contract.api.allow == frozenset({"SecureMount", "SecureMountEphemeral"})
    two = parse_contract(contract_text(Scenario(containers=("a", "b")), tls)).volumes[0]
    assert two.containers == ("a", "b")


def test_initdata_document_carries_the_contract(tls: str) -> None:
    from agent.initdata import encode_block_image

    raw = initdata_document(contract_text(Scenario(), tls))
    initdata = parse_initdata(raw)
    assert load_contract(initdata).volumes[0].name == "data"
    assert parse_block_image(encode_block_image(raw)) == raw


def test_initdata_document_refuses_a_contract_that_would_break_its_quoting() -> None:
    with pytest.raises(ValueError, match="'''"):
        initdata_document("x = '''")


def test_daemon_config_and_bundle() -> None:
    config_module = pytest.importorskip("agent.config")  # the daemon stream's
    parse_config, EvidenceConfig = config_module.parse_config, config_module.EvidenceConfig

    config = parse_config(DAEMON_CONFIG.format(kbs_deadline=120.0) + evidence_config("sample"))
    assert parse_config(daemon_config(Scenario())) == config
    assert config.evidence == EvidenceConfig("sample", allow_sample=True)
    assert config.measure.sink == "none"  # the guest's swtpm is not the sample TEE's register
    tpm = parse_config(daemon_config(Scenario(tee="tpm"))).evidence
    assert tpm == EvidenceConfig("tpm")  # the TPM scenarios never allow sample
    assert parse_config(daemon_config(DEMO)).evidence == config.evidence
    assert config.listen.ttrpc is None
    # production's transport only: the default vsock listener, no unix/tcp extra listener
    assert config.listen.vsock_port == 1040
    assert (config.listen.tcp, config.listen.unix) == (None, None)
    assert config.private_socket == Path("/run/cva/grpc.sock")
    sock = "unix:///run/confidential-containers/cdh.sock"
    with_ttrpc = parse_config(daemon_config(Scenario(ttrpc=sock, kbs_deadline=30.0)))
    assert with_ttrpc.listen.ttrpc == Path("/run/confidential-containers/cdh.sock")
    assert with_ttrpc.listen.tcp is None
    assert with_ttrpc.listen.vsock_port == 1040
    assert with_ttrpc.timeouts.kbs == 30.0
    doc = json.loads(oci_config("app"))
    assert doc["annotations"]["io.kubernetes.cri.container-name"] == "app"


def test_stage_script_prepares_the_image_before_cva_and_the_job_serves_the_host() -> None:
    stage = stage_script(Scenario(), 2, pre_start="echo tamper")
    # the image config and the bundle are staged (cva-vm-stage.service runs before cva)
    assert "/mnt/vmjob/config.toml /etc/cva/config.toml" in stage
    assert "/run/kata-containers/e2e-ctr-0001/config.json" in stage
    assert stage.index("modprobe vsock_loopback") < stage.index("echo tamper")
    # cva is the image's: nothing installs a unit or starts cva from the share
    script = job_script(Scenario(), 2)
    for text in (stage, script):
        assert "systemd/cva.service" not in text and "systemctl start cva" not in text
        assert "python -m agent" not in text
    assert "tests.tools.tcp_forward 50051 vsock:1:1040" in script
    assert "tests.vm.guest_control --port 7000" in script


def test_guestfwd_socat_is_silent(tmp_path: Path) -> None:
    from tests.vm.build import GuestImage

    spec = MachineSpec(
        image=GuestImage(tmp_path, "k"),
        job_dir=tmp_path,
        guest_forwards=(GuestForward(KBS_GUEST_ADDR, 8443, 1234),),
    )
    netdev = QuietForwardMachine(spec)._netdev()
    assert "cmd:socat -lf /dev/null - TCP:127.0.0.1:1234" in netdev


def test_guest_control_runs_commands_and_exits() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = threading.Thread(
        target=guest_control.main, args=(["--port", str(port), "--host", "127.0.0.1"],)
    )
    server.start()
    control = GuestControl(port)
    try:
        for _ in range(100):
            if control.ping():
                break
            threading.Event().wait(0.05)
        done = control.run(["cat"], input="hello")
        assert (done.rc, done.stdout) == (0, "hello")
        assert control.run(["sh", "-c", "exit 3"]).rc == 3
        assert control.run(["sleep", "5"], timeout=0.2).rc == -9
        assert control.run(["/nonexistent/tool"]).rc == -1
    finally:
        control.exit()
        server.join(10)
    assert not server.is_alive()


PANIC = "[    2.689604] Kernel panic - not syncing: Fatal exception in interrupt\n"


def _boot_with_consoles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, consoles: list[str]
) -> tuple[World, list[str], Guest | BaseException]:
    """World.boot with Guest.start faked: boot N writes consoles[N] and comes up only when that
    console holds no panic. Returns the world, the log lines and the guest (or the error)."""
    from tests.vm.build import GuestImage

    def fake_start(self: Guest, timeout: float = 300.0) -> None:
        console = self.machine.console
        assert not console.exists(), "a failed boot's console was not moved aside"
        console.write_text(consoles.pop(0))
        if "Kernel panic" in console.read_text():
            raise self.fail("the guest did not come up: Kernel panic")

    monkeypatch.setattr(Guest, "start", fake_start)
    world = World(run_dir=tmp_path / "run", scenario=Scenario(), image=GuestImage(tmp_path, "k"))
    lines: list[str] = []
    try:
        return world, lines, world.boot(log=lines.append)
    except GuestFailed as exc:
        return world, lines, exc


def test_world_boots_again_when_the_guest_panics_before_its_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world, lines, guest = _boot_with_consoles(
        tmp_path, monkeypatch, [PANIC, f"{BEGIN_MARK} uptime=20.1\n"]
    )
    assert isinstance(guest, Guest)
    job = world.run_dir / "job"
    assert (job / "console-boot1.log.attempt1").read_text() == PANIC
    assert BEGIN_MARK in (job / "console-boot1.log").read_text()
    assert "failed before its job began" in lines[-1]
    assert world.boots == 1


def test_world_never_boots_again_once_the_job_began(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    consoles = [f"{BEGIN_MARK} uptime=20.1\n{PANIC}", "not reached"]
    _, _, failed = _boot_with_consoles(tmp_path, monkeypatch, consoles)
    assert isinstance(failed, GuestFailed)
    assert consoles == ["not reached"]


def test_world_boots_at_most_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    consoles = [PANIC, PANIC, "not reached"]
    world, _, failed = _boot_with_consoles(tmp_path, monkeypatch, consoles)
    assert isinstance(failed, GuestFailed)
    assert isinstance(failed.__cause__, GuestFailed)  # the first attempt's failure
    assert consoles == ["not reached"]
    assert (world.run_dir / "job" / "console-boot1.log.attempt1").exists()


def test_key_forms_in_finds_every_encoding_and_nothing_else() -> None:
    import base64

    from tests.vm.e2e import key_forms_in

    key = bytes(range(200, 232))
    assert key_forms_in("nothing here", key) == []
    assert key_forms_in(f"x {key.hex()} y", key) == ["hex"]
    assert key_forms_in(key.hex().upper(), key) == ["HEX"]
    assert "base64" in key_forms_in(base64.b64encode(key).decode(), key)
    assert "base64url" in key_forms_in(base64.urlsafe_b64encode(key).decode(), key)
    assert key_forms_in("a" + key.decode("latin-1"), key) == ["latin-1"]
