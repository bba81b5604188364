"""Evaluate a KBS resource policy as Trustee does, in a real Rego engine (rego-cpp via `regopy`,
the dev extra): `data` = the request's `{"plugin", "resource-path", "query"}`, `input` = the
token's claims, query `data.policy.allow` (SPEC.md §e.8).

regopy notes: a query whose value is `false` prints as "undefined", so the value is bound to a
variable and read from the bindings; a fresh interpreter per evaluation (the C++ side aborts
the process on some misuse of a reused `Output`).
"""

from __future__ import annotations

import json
from typing import Any

from regopy import Interpreter


def allow(
    policy: str,
    claims: dict[str, Any],
    path: list[str],
    plugin: str = "resource",
    query: dict[str, str] | None = None,
) -> bool:
    """`data.policy.allow` for this request; an undefined or non-boolean result fails the test
    (Trustee treats both as deny, but a generated policy must always define it)."""
    rego = Interpreter()
    rego.add_module("policy", policy)
    rego.add_data({"plugin": plugin, "resource-path": path, "query": query or {}})
    rego.set_input(claims)
    out = rego.query("x := data.policy.allow")
    text = str(out).strip()
    assert out.ok(), text
    assert text != "undefined", f"data.policy.allow is undefined:\n{policy}"
    value = json.loads(text)["bindings"]["x"]
    assert isinstance(value, bool), text
    return value


def token(
    tee: str | None,
    init_data: str | None,
    *,
    status: str = "affirming",
    tee_claims: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Token claims shaped as Trustee's EAR token (`broker.rs` `transform_claims`)."""
    evidence: dict[str, Any] = {"report_data": "00" * 64, "runtime_data_claims": None}
    if tee is not None:
        evidence[tee] = tee_claims if tee_claims is not None else {"svn": "1"}
    if init_data is not None:
        evidence["init_data"] = init_data
        evidence["init_data_claims"] = {}
    evidence.update(extra or {})
    return {
        "eat_profile": "tag:github.com,2024:confidential-containers/Trustee",
        "submods": {
            "cpu0": {
                "ear.status": status,
                "ear.veraison.annotated-evidence": evidence,
            }
        },
    }
