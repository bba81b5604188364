"""`cva luks inspect DEVICE`: JSON verdict, exit 0 ok / 1 refused, on hostile images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cva
from tests.luks_headers import good_metadata, luks2_area, mutated, write_image


def _inspect(path: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    proc = run_cva("luks", "inspect", str(path), *extra)
    out = json.loads(proc.stdout) if proc.stdout else {}
    return proc.returncode, out, proc.stderr.decode()


def test_good_header_ok(tmp_path: Path) -> None:
    img = tmp_path / "good.img"
    write_image(img, luks2_area())
    rc, out, err = _inspect(img)
    assert (rc, out) == (0, {"verdict": "ok", "cva_token": False, "reasons": []}), err


def test_good_header_with_token(tmp_path: Path) -> None:
    token = {"type": "cva", "keyslots": [], "state": "ready", "volume": "pg", "mac": "0" * 64}
    img = tmp_path / "tok.img"
    write_image(img, luks2_area(mutated(lambda m: m["tokens"].update({"0": token}))))
    rc, out, _ = _inspect(img)
    assert rc == 0 and out["cva_token"] is True


@pytest.mark.parametrize(
    ("meta", "rule"),
    [
        (
            mutated(lambda m: m["keyslots"]["0"]["area"].update(encryption="cipher_null-ecb")),
            "keyslot-cipher",
        ),
        (mutated(lambda m: m["segments"]["0"].update(encryption="null")), "segment-cipher"),
        (mutated(lambda m: m["segments"]["0"].update(sector_size=512)), "sector-size"),
        (
            mutated(lambda m: m["config"].update(requirements={"mandatory": ["online-reencrypt"]})),
            "requirements",
        ),
        (
            mutated(lambda m: m["tokens"].update({"0": {"type": "x", "keyslots": ["0"]}})),
            "token-type",
        ),
    ],
)
def test_hostile_header_refused(tmp_path: Path, meta: dict[str, Any], rule: str) -> None:
    img = tmp_path / "bad.img"
    write_image(img, luks2_area(meta))
    rc, out, _ = _inspect(img)
    assert rc == 1 and out["verdict"] == "refused"
    assert any(r.startswith(rule + ":") for r in out["reasons"]), out


def test_disagreeing_copies_refused(tmp_path: Path) -> None:
    other = mutated(lambda m: m["segments"]["0"].update(encryption="cipher_null-ecb"))
    img = tmp_path / "copies.img"
    write_image(img, luks2_area(good_metadata(), secondary_metadata=other))
    rc, out, _ = _inspect(img)
    assert rc == 1 and any(r.startswith("header-copies:") for r in out["reasons"])


def test_not_luks_refused(tmp_path: Path) -> None:
    img = tmp_path / "zero.img"
    write_image(img, b"")
    rc, out, _ = _inspect(img)
    assert rc == 1 and out["reasons"][0].startswith("header:")


def test_integrity_flag(tmp_path: Path) -> None:
    img = tmp_path / "integ.img"
    write_image(img, luks2_area(good_metadata(integrity=True)))
    assert _inspect(img)[0] == 0  # auto: as declared
    rc, out, _ = _inspect(img, "--integrity", "off")
    assert rc == 1 and any(r.startswith("segment-integrity:") for r in out["reasons"])


def test_missing_device_one_line_error(tmp_path: Path) -> None:
    rc, out, err = _inspect(tmp_path / "nope.img")
    assert rc == 1 and out == {}
    assert err.count("\n") == 1 and "cannot open" in err and "Traceback" not in err
