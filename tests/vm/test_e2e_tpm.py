"""cva end to end with the swtpm TPM and the PCR8 initdata binding (tee = "tpm").

Boot 1: cva extends PCR8 with the initdata digest on its first start, attests to the loopback
KBS with a TPM quote (the KBS checks PCR8 against the init-data it is sent) and creates the
volume. Boot 2 (same disks, same TPM): PCR8 is extended with a different digest before cva
starts, as if the host had booted the VM with other initdata: cva refuses to start, naming both
values, and serves nothing.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import preflight
from tests.vm.build import ensure_image
from tests.vm.e2e import Scenario, World

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(900)]

SCENARIO = Scenario(tee="tpm", container_id="e2e-tpm-0001", lvm=False, disk_bytes=512 * 1024**2)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    missing = preflight.missing_tools()
    if missing:
        message = preflight.missing_message(missing)
        if preflight.in_ci():
            pytest.fail(message)
        pytest.skip(message)
    run_dir = Path(tempfile.mkdtemp(prefix="cva-e2e-tpm-"))
    print(f"e2e: run folder {run_dir}")
    w = World(run_dir=run_dir, scenario=SCENARIO, image=ensure_image())
    w.kbs_up()
    try:
        yield w
    finally:
        w.kbs_down()


def _pcr8(text: str) -> str:
    """The PCR8 value from `tpm2_pcrread sha256:8` output."""
    for line in text.splitlines():
        name, _, value = line.strip().partition(":")
        if name.strip() == "8":
            return value.strip().lower().removeprefix("0x")
    raise AssertionError(f"no PCR8 in {text!r}")


def test_tpm_attestation_binds_pcr8_and_prepares_the_volume(world: World) -> None:
    from agent.initdata import reference_value

    guest = world.boot()
    try:
        guest.wait_cva()
        pcr = _pcr8(guest.control.run(["tpm2_pcrread", "sha256:8"]).check().stdout)
        assert pcr == reference_value(world.initdata, "tpm").hex()
        with guest.client() as client:
            answer = client.prepare(SCENARIO.container_id)  # type: ignore[attr-defined]
        assert answer.volumes[0].created is True
        journal = guest.journal()
        assert '"tee": "tpm"' in journal
        assert "kbs attested" in journal
        # the call came over AF_VSOCK (vsock_loopback) through cva's listener and splice
        cids = {
            json.loads(line).get("peer_cid")
            for line in journal.splitlines()
            if line.startswith("{") and '"vsock_connection"' in line
        }
        assert cids == {1}, cids
        with guest.client() as client:
            client.release(SCENARIO.container_id)  # type: ignore[attr-defined]
            again = client.prepare(SCENARIO.container_id)  # type: ignore[attr-defined]
            assert again.volumes[0].created is False
            client.release(SCENARIO.container_id)  # type: ignore[attr-defined]
        _check_measured_volume(
            world,
            guest,
            ["volume-create", "volume-close", "volume-open", "volume-close"],
            sequences=[1, 1, 2, 2],  # the token's seq: 1 at create, 2 after the reopen
        )
        assert guest.poweroff().finished
    finally:
        guest.kill()


def _check_measured_volume(
    world: World, guest: object, operations: list[str], *, sequences: list[int] | None = None
) -> None:
    """cva's own event log (tpm sink, PCR 23) replays to the guest's PCR 23, `cva evidence
    events` verifies it, each event carries the volume's seq, and neither the log nor the
    journal holds the volume key."""
    import base64

    from evidence.eventlog import parse_log, replay
    from evidence.volume_event import VolumeOperation, parse_volume_content

    run = guest.control.run  # type: ignore[attr-defined]
    log = base64.b64decode(run(["base64", "-w0", "/run/cva/eventlog"]).check().stdout.strip())
    events = parse_log(log)
    assert [(e.register, e.domain, e.operation) for e in events] == [
        (23, "cva", op) for op in operations
    ]
    if sequences is not None:
        seqs = [parse_volume_content(VolumeOperation(e.operation), e.content).sequence
                for e in events]  # fmt: skip
        assert seqs == sequences, seqs
    pcr = replay(events)[23]
    out = run(["tpm2_pcrread", "sha256:23"]).check().stdout
    assert pcr.hex() in out.lower().replace("0x", ""), out
    verdict = run(
        ["/opt/cva/bin/cva", "evidence", "events", "/run/cva/eventlog",
         "--register", f"23={pcr.hex()}"]
    )  # fmt: skip
    assert verdict.rc == 0 and json.loads(verdict.stdout)["verified"] is True
    journal = guest.journal()  # type: ignore[attr-defined]
    for blob in (log, journal.encode()):
        assert world.key not in blob and world.key.hex().encode() not in blob
        assert base64.b64encode(world.key) not in blob


def test_pcr8_for_other_initdata_makes_cva_refuse_to_start(world: World) -> None:
    other = secrets.token_hex(32)
    guest = world.boot(pre_start=f"tpm2_pcrextend 8:sha256={other}")
    try:
        deadline = time.monotonic() + 120
        journal = ""
        while time.monotonic() < deadline:
            journal = guest.journal()
            if "startup_refused" in journal:
                break
            time.sleep(1)
        assert "startup_refused" in journal
        assert "initdata does not match the measured PCR8" in journal
        assert guest.cva_state() != "active"
        guest.poweroff()
    finally:
        guest.kill()
