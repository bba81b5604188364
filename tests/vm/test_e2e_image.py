"""The image users build is the image the VM suite boots (issue 23).

tests/vm/build.py installs cva into the guest tree with `make dist` + `image/install.sh` (README
"Building cva into a guest image"), and the guest boots kata's layout: kata-containers.target as
the default unit, which requires basic.target, tmp.mount and a stand-in kata-agent.service, and
never reaches multi-user.target. One boot proves: install as documented -> cva starts by the
target's own wants -> it is READY (Type=notify: active) before kata-agent starts -> it serves
over its vsock gRPC listener; the product runs from /opt/cva, not from the repo share; the
image's LVM and module settings are in effect; and with /etc/cva/config.toml gone, cva starts
again on its defaults.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent
from tests.vm import preflight
from tests.vm.build import REPO, ensure_image
from tests.vm.e2e import Guest, Scenario, World

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(900)]

SCENARIO = Scenario(tee="tpm", container_id="e2e-image-0001", lvm=False, disk_bytes=256 * 1024**2)


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    missing = preflight.missing_tools()
    if missing:
        message = preflight.missing_message(missing)
        if preflight.in_ci():
            pytest.fail(message)
        pytest.skip(message)
    run_dir = Path(tempfile.mkdtemp(prefix="cva-e2e-image-"))
    print(f"e2e: run folder {run_dir}")
    world = World(run_dir=run_dir, scenario=SCENARIO, image=ensure_image())
    world.kbs_up()
    g = world.boot()
    try:
        g.wait_cva()
        yield g
        g.poweroff()
    finally:
        g.kill()
        world.kbs_down()


def _sh(guest: Guest, script: str) -> str:
    return guest.control.sh(script).check().stdout.strip()


def _show(guest: Guest, unit: str, *props: str) -> dict[str, str]:
    argv = ["systemctl", "show", unit] + [f"-p{p}" for p in props]
    out = guest.control.run(argv).check().stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_the_guest_boots_kata_containers_target_and_cva_is_wanted_by_it(guest: Guest) -> None:
    assert _sh(guest, "systemctl get-default") == "kata-containers.target"
    # the target waits for what it wants, the suite's job runner included (a oneshot that runs
    # until poweroff): it is active or its start job is still queued
    state = _sh(guest, "systemctl is-active kata-containers.target || true")
    jobs = _sh(guest, "systemctl list-jobs --no-legend || true")
    assert state == "active" or "kata-containers.target" in jobs, (state, jobs)
    # multi-user.target is never pulled in: cva came up through kata's target alone
    assert _sh(guest, "systemctl is-active multi-user.target || true") == "inactive"
    assert "multi-user.target" not in jobs
    wanted_by = _show(guest, "cva.service", "WantedBy")["WantedBy"].split()
    assert "kata-containers.target" in wanted_by
    assert _sh(guest, "readlink /etc/systemd/system/kata-containers.target.wants/cva.service") == (
        "/usr/lib/systemd/system/cva.service"
    )


def test_cva_is_ready_before_kata_agent_starts(guest: Guest) -> None:
    # what the stand-in kata-agent saw when it started: cva already active (= READY=1 sent)
    seen = dict(
        line.split("=", 1)
        for line in _sh(guest, "cat /run/kata-agent-standin").splitlines()
        if "=" in line
    )
    assert seen["ActiveState"] == "active", seen
    cva = _show(guest, "cva.service", "ActiveEnterTimestampMonotonic", "NRestarts")
    agent_unit = _show(guest, "kata-agent.service", "ExecMainStartTimestampMonotonic")
    assert cva["NRestarts"] == "0"
    assert (
        0
        < int(cva["ActiveEnterTimestampMonotonic"])
        <= int(agent_unit["ExecMainStartTimestampMonotonic"])
    ), (cva, agent_unit)
    assert seen["ActiveEnterTimestampMonotonic"] == cva["ActiveEnterTimestampMonotonic"]


def test_cva_runs_from_the_image_venv_and_logs_its_version(guest: Guest) -> None:
    pid = int(_show(guest, "cva.service", "MainPID")["MainPID"])
    argv = _sh(guest, f"tr '\\0' ' ' < /proc/{pid}/cmdline").split()
    assert argv[:3] == ["/opt/cva/bin/python3", "/opt/cva/bin/cva", "serve"] or argv[1:3] == [
        "/opt/cva/bin/cva",
        "serve",
    ], argv
    assert "PYTHONPATH=" not in _sh(guest, f"tr '\\0' '\\n' < /proc/{pid}/environ")
    assert _sh(guest, "/opt/cva/bin/cva --version") == f"cva {agent.__version__}"
    assert f'"version": "{agent.__version__}"' in guest.journal()
    # the test venv sees the product through a .pth; the share's copy of it is hidden
    where = _sh(
        guest, "cd /mnt/vmsrc && /opt/venv/bin/python -c 'import agent; print(agent.__file__)'"
    )
    assert where.startswith("/opt/cva/lib/"), where
    assert _sh(guest, "ls -A /mnt/vmsrc/agent | wc -l") == "0"
    assert _sh(guest, "test -e /opt/cva/bin/pip && echo pip || echo none") == "none"


def test_cva_serves_its_api(guest: Guest) -> None:
    with guest.client() as client:
        answer = client.list()  # type: ignore[attr-defined]
    assert [v.name for v in answer.volumes] == [SCENARIO.volume]


def test_the_image_settings_of_install_sh_are_in_effect(guest: Guest) -> None:
    assert _sh(guest, "lvmconfig global/event_activation") == "event_activation=0"
    assert _sh(guest, "systemctl is-failed systemd-modules-load.service || true") != "failed"
    modules = _sh(guest, "cat /proc/modules | cut -d' ' -f1").split()
    assert {"dm_crypt", "dm_integrity"} <= set(modules), modules
    for hook in sorted((REPO / "image" / "hooks").glob("*/*")):
        if hook.name.startswith(".") or not hook.is_file():
            continue
        path = f"/usr/share/oci/hooks/{hook.parent.name}/{hook.name}"
        assert _sh(guest, f"test -f {path} && test ! -L {path} && stat -c %a {path}") == "755"


def test_cva_starts_on_its_defaults_without_a_config(guest: Guest) -> None:
    """The unit names no --config: without /etc/cva/config.toml cva runs on its defaults (tee
    auto: this guest's TPM; vsock port 1040) instead of refusing to start."""
    _sh(guest, "rm /etc/cva/config.toml && systemctl restart cva.service")
    guest.wait_cva()
    assert _sh(guest, "test -e /etc/cva/config.toml && echo present || echo absent") == "absent"
    with guest.client() as client:
        assert [v.name for v in client.list().volumes] == [SCENARIO.volume]  # type: ignore[attr-defined]
