"""`cva initdata ...` end to end as a subprocess: JSON out, one-line errors, no tracebacks."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import struct
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cva

KATA_DIGEST = "c6694bb7a29d6f37ec72a15582e004b9f3142159682db8509a304407419a49e5"
EXAMPLE = REPO / "examples/initdata.toml"


def ok(*args: str, input: bytes | None = None) -> dict[str, object]:
    proc = run_cva("initdata", *args, input=input)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def refused(*args: str, match: str, input: bytes | None = None) -> str:
    proc = run_cva("initdata", *args, input=input)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert proc.stdout == b""
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("cva: "), err
    assert match in err, err
    return err


@pytest.mark.parametrize(
    "name", ["kata_runtime_test_annotation.b64", "kata_runtime_test_annotation.decoded.toml"]
)
def test_digest_of_kata_test_initdata(vectors: Path, name: str) -> None:
    out = ok("digest", str(vectors / "initdata" / name))
    assert out == {"algorithm": "sha256", "digest": KATA_DIGEST}


def test_digest_from_stdin_and_explicit_format(vectors: Path) -> None:
    b64 = (vectors / "initdata/kata_runtime_test_annotation.b64").read_bytes()
    assert ok("digest", "-", "--format", "annotation", input=b64)["digest"] == KATA_DIGEST
    assert ok("digest", "-", input=b64)["digest"] == KATA_DIGEST


def test_encode_decode_round_trip(vectors: Path, tmp_path: Path) -> None:
    toml = vectors / "initdata/kata_runtime_test_annotation.decoded.toml"
    img = tmp_path / "data.img"
    out = ok("encode", str(toml), "--image", str(img))
    assert out["annotation_name"] == "io.katacontainers.config.hypervisor.cc_init_data"
    assert out["digest"] == KATA_DIGEST and out["image"] == str(img)
    annotation = str(out["annotation"])
    assert gzip.decompress(base64.b64decode(annotation, validate=True)) == toml.read_bytes()
    ann_file = tmp_path / "ann.b64"
    ann_file.write_text(annotation)
    for source in (ann_file, img):
        proc = run_cva("initdata", "decode", str(source))
        assert proc.returncode == 0 and proc.stdout == toml.read_bytes()
    assert ok("digest", str(img))["digest"] == KATA_DIGEST
    dest = tmp_path / "out.toml"
    proc = run_cva("initdata", "decode", str(ann_file), "-o", str(dest))
    assert proc.returncode == 0 and proc.stdout == b"" and dest.read_bytes() == toml.read_bytes()


def test_kata_upstream_annotation_decodes_byte_exact(vectors: Path) -> None:
    proc = run_cva("initdata", "decode", str(vectors / "initdata/kata_runtime_test_annotation.b64"))
    assert proc.returncode == 0
    assert hashlib.sha256(proc.stdout).hexdigest() == KATA_DIGEST


def test_check_example() -> None:
    proc = run_cva("initdata", "check", str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr.decode()
    # the example carries no agent policy: the prestart hook's path is not pinned (issue 22)
    err = proc.stderr.decode()
    assert (
        err.startswith('cva: warning: initdata has no data."policy.rego"') and err.count("\n") == 1
    )
    out = json.loads(proc.stdout)
    assert out["warnings"] == [err.removeprefix("cva: warning: ").rstrip("\n")]
    assert out["ok"] is True and out["data_keys"] == ["aa.toml", "cva.toml"]
    contract = out["contract"]
    assert isinstance(contract, dict)
    assert [v["name"] for v in contract["volumes"]] == ["pgdata", "shared-config"]
    assert contract["volumes"][0]["lvm"] == {"vg": "cva", "lv": "pgdata", "size_bytes": 8 << 30}
    assert contract["kbs"]["url"] == "https://kbs.example:8080"


def test_check_initdata_only(vectors: Path) -> None:
    path = str(vectors / "initdata/kata_default-initdata.toml")
    refused("check", path, match='data."cva.toml"')
    assert "contract" not in ok("check", path, "--initdata-only")


def test_reference_values() -> None:
    digest = hashlib.sha256(EXAMPLE.read_bytes()).digest()
    tdx = ok("reference", str(EXAMPLE), "--tee", "tdx")
    assert tdx["field"] == "MRCONFIGID" and tdx["hex"] == (digest + bytes(16)).hex()
    assert base64.b64decode(str(tdx["base64"])) == digest + bytes(16)
    snp = ok("reference", str(EXAMPLE), "--tee", "snp")
    assert snp["field"] == "HOST_DATA" and snp["hex"] == digest.hex()
    tpm = ok("reference", str(EXAMPLE), "--tee", "tpm")
    assert tpm["field"] == "PCR8"
    assert tpm["hex"] == hashlib.sha256(bytes(32) + digest).hexdigest()


def test_reference_tpm_refuses_sha384(vectors: Path) -> None:
    path = str(vectors / "initdata/kata_types_test_complete_initdata.toml")
    refused("reference", path, "--tee", "tpm", match='algorithm = "sha256"')


def test_kata_block_image_is_refused_as_initdata(vectors: Path) -> None:
    img = str(vectors / "initdata/kata_agent_testdata_initdata.img")
    for action in ("digest", "check", "decode", "encode"):
        refused(action, img, match="initdata is not a TOML document")


# --- hostile files ------------------------------------------------------------------------


def hostile_files(tmp: Path) -> dict[str, tuple[bytes, str]]:
    good = b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n'
    gz = gzip.compress(good)
    header = struct.Struct("<8sQ")
    return {
        "non-utf8.toml": (b"\xff\xfe\x00", "not UTF-8"),
        "broken.toml": (b'version = "0.1.0\n', "not a TOML document"),
        "wrong-version.toml": (good.replace(b"0.1.0", b"9"), "version"),
        "wrong-type.toml": (good + b'"a" = 1\n', "must be a string"),
        "truncated.gz": (gz[:-6], "truncated"),
        "trailing.gz": (gz + b"\0\0", "follow the gzip stream"),
        "bomb.gz": (gzip.compress(b"\0" * (32 << 20)), "more than"),
        "oversized.gz": (b"\x1f\x8b" + b"\0" * (300 * 1024), "limit"),
        "bad-annotation.b64": (base64.b64encode(gz[:12]), "truncated"),
        "bomb-annotation.b64": (base64.b64encode(gzip.compress(b"\0" * (8 << 20))), "more than"),
        "not-base64.b64": (b"H4sI!!!!", "not a TOML document"),
        "past-end.img": (header.pack(b"initdata", 4096) + gz, "runs past the end"),
        "huge-length.img": (header.pack(b"initdata", 2**63) + gz, "exceeds the limit"),
        "zero-length.img": (header.pack(b"initdata", 0) + gz, "length field is 0"),
        "bomb.img": (
            header.pack(b"initdata", len(b := gzip.compress(b"a" * (16 << 20)))) + b,
            "more than",
        ),
        "huge.toml": (b"#" * (3 << 20), "larger than"),
        "empty": (b"", "version"),
        "contract-bad.toml": (
            good + b"\"cva.toml\" = '''\nversion = 1\n[kbs]\nurl = \"http://kbs.example\"\n'''\n",
            "contract kbs.url: ",
        ),
    }


def test_hostile_files_exit_non_zero_with_one_line(tmp_path: Path) -> None:
    for name, (content, match) in hostile_files(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(content)
        refused("check", str(path), match=match)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    refused("digest", str(tmp_path / "nope"), match="cannot read")
    refused("digest", str(tmp_path), match="cannot read")


def test_usage_errors_are_one_line_too() -> None:
    proc = run_cva("initdata", "reference", str(EXAMPLE), "--tee", "sgx")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    proc = run_cva("initdata")
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr


def test_encode_refuses_invalid_input_and_unwritable_image(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"nonsense")
    refused("encode", str(bad), match="not a TOML document")
    refused(
        "encode", str(EXAMPLE), "--image", str(tmp_path / "no/such/dir.img"), match="cannot write"
    )
