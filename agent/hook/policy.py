"""Does the initdata's agent policy pin the image's guest hook path? (pure; `cva initdata check`)

kata-agent runs the guest prestart hooks only from the `guest_hook_path` the host sends in
CreateSandboxRequest, and genpolicy's default rules refuse any (`count(input.guest_hook_path)
== 0`, SPEC §e.7). With a policy that leaves the path open the host may drop the hooks (the
containers then run without their volumes: an empty directory at the mount path) or point them
at another folder; only an equality `input.guest_hook_path == "<path>"` in the initdata's
`policy.rego` (which kata-agent enforces from its start) closes both. This module only looks
for that rule; it is a warning, because the policy is kata's to enforce, not cva's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from agent.contract import Contract

POLICY_KEY = "policy.rego"
IMAGE_HOOK_PATH = "/usr/share/oci/hooks"  # where the image recipe installs image/hooks/
_PIN = re.compile(r'input\.guest_hook_path\s*==\s*"([^"\\]*)"')
_DEFAULT_RULE = re.compile(r"count\(\s*input\.guest_hook_path\s*\)\s*==\s*0")


def pinned_hook_paths(policy: str) -> tuple[str, ...]:
    """Every path an `input.guest_hook_path == "..."` rule in `policy` names."""
    lines = (line.split("#", 1)[0] for line in policy.splitlines())
    return tuple(m.group(1) for line in lines for m in _PIN.finditer(line))


def hook_policy_warnings(data: Mapping[str, str], contract: Contract | None) -> list[str]:
    """Warnings for initdata whose contract gives volumes to containers (which reach them only
    through the prestart hook) but whose agent policy does not pin the hook path."""
    if contract is None or not contract.volumes:
        return []
    policy = data.get(POLICY_KEY)
    fix = (
        f"replace genpolicy's `count(input.guest_hook_path) == 0` with `input.guest_hook_path"
        f' == "{IMAGE_HOOK_PATH}"` (examples/policy-hook.rego)'
    )
    if policy is None:
        return [
            f'initdata has no data."{POLICY_KEY}": nothing stops the host from running the pod'
            f" without cva's prestart hook (its containers would start without their volumes);"
            f" add the agent policy and {fix}"
        ]
    pinned = pinned_hook_paths(policy)
    if not pinned:
        still = " (it still has the default rule that refuses every hook path)"
        return [
            f'data."{POLICY_KEY}" does not pin guest_hook_path'
            f"{still if _DEFAULT_RULE.search(policy) else ''}: the host can drop or redirect"
            f" cva's prestart hook; {fix}"
        ]
    if set(pinned) != {IMAGE_HOOK_PATH}:
        return [
            f'data."{POLICY_KEY}" pins guest_hook_path to {", ".join(sorted(set(pinned)))}, not'
            f" {IMAGE_HOOK_PATH} where cva's image installs its hook; check the image"
        ]
    return []
