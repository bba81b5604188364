"""`cva serve|prepare|release|list` refusals: one line on stderr, non-zero exit, no traceback."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cva


def test_serve_with_missing_config(tmp_path: Path) -> None:
    r = run_cva("serve", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode != 0
    assert r.stderr.decode() == (
        f"cva: config: {tmp_path / 'nope.toml'} does not exist; pass an existing --config file\n"
    )


def test_serve_with_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[listen]\ntcp = "0.0.0.0:80"\n')
    r = run_cva("serve", "--config", str(cfg))
    assert r.returncode != 0
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "loopback" in err and "Traceback" not in err


def test_client_without_server(tmp_path: Path) -> None:
    for args in (["list"], ["prepare", "c1"], ["release", "c1"]):
        r = run_cva(*args, "--address", f"unix:{tmp_path}/none.sock", "--timeout", "2")
        assert r.returncode != 0
        err = r.stderr.decode()
        assert err.count("\n") == 1 and "UNAVAILABLE" in err, err


def test_help_lists_the_commands() -> None:
    r = run_cva("--help")
    assert r.returncode == 0
    for cmd in (b"serve", b"prepare", b"release", b"list"):
        assert cmd in r.stdout
