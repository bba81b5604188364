"""bench.vm_kata's pure parts: the 50 s fit and the conversion of the guest's JSON."""

from __future__ import annotations

import math

from bench.vm_kata import convert, fit_within, planned


def test_fit_within_is_the_line_through_the_two_sizes() -> None:
    assert fit_within([(1, 5.0), (8, 12.0)], 50.0) == 46.0  # 4 s fixed + 1 s/GiB
    assert fit_within([(8, 12.0), (1, 5.0)], 50.0) == 46.0
    assert fit_within([(1, 5.0)], 50.0) is None
    assert fit_within([(1, 5.0), (8, 5.0)], 50.0) == math.inf
    assert fit_within([(1, 60.0), (8, 70.0)], 50.0) == 0.0


def test_convert_targets_and_missing_items() -> None:
    doc = {
        "plan": {
            "cases": [
                {"size_gib": s, "integrity": i, "disks": {}} for s in (1, 8) for i in (False, True)
            ]
        },
        "items": {
            "rpc": {
                "direct_ms": 1.0,
                "vsock_ms": 1.6,
                "bridge_ms": 1.4,
                "ttrpc_vsock_ms": 0.5,
                "calls": 1000,
            },
            "1g-plain/cva": {"seconds": 1.0},
            "1g-plain/cdh": {"seconds": 4.0},
            "1g-int/cva": {"seconds": 2.0},
            "1g-int/cdh": {"seconds": 6.0},
            "8g-int/cva": {"seconds": 9.0},
            "8g-int/cdh": {"seconds": 20.0},
            "8g-plain/cva": {"seconds": 1.5},
        },
        "errors": {"8g-plain/cdh": "RuntimeError: boom"},
    }
    rs = {r.name: r for r in convert(doc)}
    splice = rs["gRPC unary over AF_VSOCK via cva's splice vs direct (bridge subtracted)"]
    assert splice.value is not None and math.isclose(splice.value, 1.2)
    assert splice.met is True
    assert rs["SecureMount 1 GiB, integrity off: cva vs CDH"].met is True
    assert "boom" in rs["SecureMount 8 GiB, integrity off: cva vs CDH"].note
    assert rs["SecureMount 8 GiB, integrity on: cva within kata's 50 s"].met is True
    fit = rs["SecureMount cva: largest disk within 50 s, integrity on (computed)"]
    assert fit.value is not None and math.isclose(fit.value, 49.0)
    assert {r.name for r in planned("x")} <= set(rs) | {
        "SecureMount 8 GiB, integrity on: cva within kata's 50 s"
    }
