"""`cva initdata check`'s warning when the agent policy does not pin the hook path (pure)."""

from __future__ import annotations

from pathlib import Path

from agent.hook.policy import IMAGE_HOOK_PATH, hook_policy_warnings, pinned_hook_paths
from tests.daemon_support import contract, volume

REPO = Path(__file__).resolve().parents[2]
GENPOLICY_DEFAULT = """
package agent_policy
CreateSandboxRequest {
    count(input.guest_hook_path) == 0
}
"""
PINNED = GENPOLICY_DEFAULT.replace(
    "count(input.guest_hook_path) == 0", f'input.guest_hook_path == "{IMAGE_HOOK_PATH}"'
)
WITH_VOLUMES = contract(volume("pg", containers=("postgres",)))


def test_no_volumes_no_warning() -> None:
    assert hook_policy_warnings({}, contract()) == []
    assert hook_policy_warnings({}, None) == []


def test_no_policy_warns() -> None:
    (w,) = hook_policy_warnings({"cva.toml": "..."}, WITH_VOLUMES)
    assert 'no data."policy.rego"' in w and IMAGE_HOOK_PATH in w


def test_default_genpolicy_rule_warns() -> None:
    (w,) = hook_policy_warnings({"policy.rego": GENPOLICY_DEFAULT}, WITH_VOLUMES)
    assert "does not pin guest_hook_path" in w and "default rule" in w


def test_pinned_policy_is_quiet() -> None:
    assert hook_policy_warnings({"policy.rego": PINNED}, WITH_VOLUMES) == []


def test_commented_out_pin_does_not_count() -> None:
    commented = GENPOLICY_DEFAULT + f'# input.guest_hook_path == "{IMAGE_HOOK_PATH}"\n'
    assert pinned_hook_paths(commented) == ()
    assert hook_policy_warnings({"policy.rego": commented}, WITH_VOLUMES)


def test_another_path_warns() -> None:
    other = PINNED.replace(IMAGE_HOOK_PATH, "/tmp/hooks")
    (w,) = hook_policy_warnings({"policy.rego": other}, WITH_VOLUMES)
    assert "/tmp/hooks" in w


def test_the_shipped_example_pins_the_image_path() -> None:
    text = (REPO / "examples" / "policy-hook.rego").read_text()
    assert pinned_hook_paths(text) == (IMAGE_HOOK_PATH,)


def test_the_image_hook_file_execs_cva() -> None:
    hook = REPO / "image" / "hooks" / "prestart" / "cva"
    text = hook.read_text()
    assert text.startswith("#!/bin/sh\n") and hook.stat().st_mode & 0o111
    assert text.rstrip().endswith("exec /opt/cva/bin/cva hook prestart")
