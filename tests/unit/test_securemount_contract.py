"""SecureMount planning with the real agent.contract types (skipped until that module lands)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.securemount.decisions import (
    DeviceIdentity,
    EphemeralMount,
    PersistentMount,
    SecureMountPolicy,
    SecureMountRefused,
    parse_secure_mount,
    plan_secure_mount,
)

contract = pytest.importorskip("agent.contract")
if not hasattr(contract, "parse_contract"):  # another test's stand-in module, not the real one
    pytest.skip("agent.contract is a test stand-in here", allow_module_level=True)

CONTRACT = """
version = 1
[kbs]
url = "https://kbs.example:8080"
tee = "sample"
[[volumes]]
name = "pgdata"
key = "kbs:///default/pgdata/luks"
disk = "serial:pgdisk"
filesystem = "ext4"
mount = "/var/lib/postgresql/data"
containers = []
create = true
integrity = false
read_only = false
"""

PG = DeviceIdentity("/dev/vdb", 252, 16, "pgdisk", "/sys/devices/pci0000:00/0000:00:05.0/b/vdb")
OTHER = DeviceIdentity("/dev/vdc", 252, 32, "scratch", "/sys/devices/pci0000:00/0000:00:06.0/b/vdc")
POLICY = SecureMountPolicy(persistent=True, ephemeral=True)
MOUNT = "/run/kata-containers/sandbox/storage/x"


def test_real_contract_volumes_plug_in() -> None:
    volumes = contract.parse_contract(CONTRACT).volumes
    persistent = parse_secure_mount(
        "block-device",
        {"deviceId": "252:16", "sourceType": "empty", "key": "kbs:///default/pgdata/luks"},
        [],
        MOUNT,
    )
    p = plan_secure_mount(persistent, PG, volumes, policy=POLICY, header_dir=Path("/run/x"))
    assert isinstance(p, PersistentMount)
    assert p.volume.name == "pgdata"
    assert p.allow_create

    ephemeral = parse_secure_mount(
        "block-device", {"deviceId": "252:32", "sourceType": "empty"}, [], MOUNT
    )
    assert isinstance(
        plan_secure_mount(ephemeral, OTHER, volumes, policy=POLICY, header_dir=Path("/run/x")),
        EphemeralMount,
    )
    with pytest.raises(SecureMountRefused, match="contract-disk"):
        plan_secure_mount(ephemeral, PG, volumes, policy=POLICY, header_dir=Path("/run/x"))


def test_contract_allow_list_switches_securemount_on() -> None:
    from agent.securemount.decisions import policy_from_allow

    default = contract.parse_contract(CONTRACT)
    assert "SecureMount" not in default.api.allow
    assert policy_from_allow(default.api.allow) == SecureMountPolicy(False, False)
    text = CONTRACT.replace(
        "[[volumes]]", '[api]\nallow = ["SecureMount", "SecureMountEphemeral"]\n[[volumes]]', 1
    )
    allowed = contract.parse_contract(text)
    assert policy_from_allow(allowed.api.allow) == SecureMountPolicy(True, True)
    with pytest.raises(contract.ContractError, match=r"api\.allow"):
        contract.parse_contract(text.replace("SecureMountEphemeral", "Mount"))
