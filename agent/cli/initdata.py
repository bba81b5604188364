"""`cva initdata digest|encode|decode|check|reference` (DESIGN §9): host-side initdata tooling.

FILE may be the TOML document, the pod annotation value (base64 of gzip), a gzip file, or a kata
block-device image (or the device itself); `--format` overrides the detection. `-` is stdin.
Results are JSON on stdout, except `decode`, which writes the exact document bytes (the digest is
over those bytes, so they are not re-encoded).
"""

from __future__ import annotations

import argparse
import base64
import json
import stat
import sys
from pathlib import Path
from typing import Any

from agent.contract import Contract
from agent.errors import InputError
from agent.initdata import (
    ANNOTATION,
    FORMATS,
    InitData,
    encode_annotation,
    encode_block_image,
    load_contract,
    parse_initdata,
    read_initdata_block,
    reference_field,
    reference_value,
    unwrap_document,
)

# largest input worth reading: an annotation of the largest gzip, or the largest document
_MAX_INPUT = 2 * 1024 * 1024


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `cva initdata ...`."""
    group = sub.add_parser(
        "initdata", help="compute, encode, decode and check CoCo initdata (host side)"
    )
    isub = group.add_subparsers(dest="initdata_command", metavar="ACTION")
    isub.required = True

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = isub.add_parser(name, help=help_text)
        parser.add_argument(
            "file", metavar="FILE", help="initdata (TOML, annotation, gzip, image; - = stdin)"
        )
        parser.add_argument(
            "--format",
            choices=FORMATS,
            default="auto",
            help="how FILE is encoded (default: detect)",
        )
        return parser

    add("digest", "print the algorithm and digest of the document").set_defaults(func=cmd_digest)
    enc = add("encode", "print the cc_init_data annotation value (base64 of gzip)")
    enc.add_argument("--image", metavar="OUT", help="also write a kata block-device image to OUT")
    enc.set_defaults(func=cmd_encode)
    dec = add("decode", "write the exact document bytes (to stdout or --output)")
    dec.add_argument("--output", "-o", metavar="OUT", help="write here instead of stdout")
    dec.set_defaults(func=cmd_decode)
    chk = add("check", 'validate the initdata and the contract in data."cva.toml"')
    chk.add_argument(
        "--initdata-only", action="store_true", help="do not require a cva contract inside"
    )
    chk.set_defaults(func=cmd_check)
    ref = add("reference", "print the MRCONFIGID / HOST_DATA / PCR8 value to register")
    ref.add_argument("--tee", required=True, choices=("tdx", "snp", "tpm"))
    ref.set_defaults(func=cmd_reference)
    pol = isub.add_parser(
        "policy",
        help="print a Trustee KBS resource policy (Rego) that releases each contract key only to"
        " a TEE whose initdata register holds this document",
    )
    pol.add_argument(
        "files",
        metavar="FILE",
        nargs="+",
        help="initdata (TOML, annotation, gzip, image; - = stdin); several documents make one"
        " policy (the KBS has one)",
    )
    pol.add_argument(
        "--format", choices=FORMATS, default="auto", help="how FILE is encoded (default: detect)"
    )
    pol.add_argument(
        "--tee",
        action="append",
        choices=("tdx", "snp", "tpm"),
        help="grant to this TEE only (repeatable); default: the contract's kbs.tee, or tdx and"
        " snp when it is auto (tpm only when named)",
    )
    pol.add_argument(
        "--allow-unaffirmed",
        action="store_true",
        help='do not require ear.status == "affirming" (the AS\'s appraisal of the image)',
    )
    vol = pol.add_argument_group(
        "volume-gated resources (TDX; the same rules as `cva evidence policy`)",
        "release --resource paths only once the VM's replayed event log shows cva opened this"
        " volume (and has not closed it); bound to FILE's MRCONFIGID",
    )
    vol.add_argument("--volume", metavar="NAME", help="the volume's name")
    vol.add_argument("--uuid", metavar="UUID", help="its LUKS UUID (from cva's event)")
    vol.add_argument("--header-sha256", metavar="HEX", help="its header digest (cva's event)")
    vol.add_argument(
        "--resource", action="append", metavar="REPO/TYPE/TAG", help="a resource (repeatable)"
    )
    vol.add_argument("--min-seq", type=int, metavar="N", help="require the event's seq >= N")
    pol.set_defaults(func=cmd_policy)


# --- reading FILE -------------------------------------------------------------------------


def _read_input(name: str) -> bytes:
    if name == "-":
        data = sys.stdin.buffer.read(_MAX_INPUT + 1)
    else:
        try:
            with Path(name).open("rb") as fh:
                data = fh.read(_MAX_INPUT + 1)
        except OSError as exc:
            raise InputError(f"cannot read {name}: {exc.strerror}") from None
    if len(data) > _MAX_INPUT:
        raise InputError(f"{name} is larger than {_MAX_INPUT} bytes; not initdata")
    return data


def _is_block_device(name: str) -> bool:
    try:
        return name != "-" and stat.S_ISBLK(Path(name).stat().st_mode)
    except OSError:
        return False


def load_raw(name: str, fmt: str) -> bytes:
    """The document bytes in FILE (a block device is read with the device reader's caps)."""
    if _is_block_device(name):
        return read_initdata_block(name)
    return unwrap_document(_read_input(name), fmt)


def _load(args: argparse.Namespace) -> InitData:
    return parse_initdata(load_raw(args.file, args.format))


def _emit(obj: dict[str, Any]) -> int:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    return 0


# --- commands -----------------------------------------------------------------------------


def cmd_digest(args: argparse.Namespace) -> int:
    initdata = _load(args)
    return _emit({"algorithm": initdata.algorithm, "digest": initdata.digest().hex()})


def cmd_encode(args: argparse.Namespace) -> int:
    initdata = _load(args)
    out: dict[str, Any] = {
        "annotation_name": ANNOTATION,
        "annotation": encode_annotation(initdata.raw),
        "algorithm": initdata.algorithm,
        "digest": initdata.digest().hex(),
    }
    if args.image:
        try:
            Path(args.image).write_bytes(encode_block_image(initdata.raw))
        except OSError as exc:
            raise InputError(f"cannot write {args.image}: {exc.strerror}") from None
        out["image"] = args.image
    return _emit(out)


def cmd_decode(args: argparse.Namespace) -> int:
    initdata = _load(args)
    if args.output:
        try:
            Path(args.output).write_bytes(initdata.raw)
        except OSError as exc:
            raise InputError(f"cannot write {args.output}: {exc.strerror}") from None
    else:
        sys.stdout.buffer.write(initdata.raw)
        sys.stdout.flush()
    return 0


def contract_summary(contract: Contract) -> dict[str, Any]:
    """The validated contract as JSON-friendly data."""
    return {
        "version": contract.version,
        "kbs": {
            "url": contract.kbs.url,
            "tee": contract.kbs.tee,
            "cert": contract.kbs.cert is not None,
            "insecure_http": contract.kbs.insecure_http,
        },
        "api": {"allow": sorted(contract.api.allow)},
        "volumes": [
            {
                "name": v.name,
                "key": str(v.key),
                "disk": str(v.disk),
                "lvm": None
                if v.lvm is None
                else {"vg": v.lvm.vg, "lv": v.lvm.lv, "size_bytes": v.lvm.size_bytes},
                "filesystem": v.filesystem,
                "mount": v.mount,
                "containers": list(v.containers),
                "create": v.create,
                "integrity": v.integrity,
                "read_only": v.read_only,
            }
            for v in contract.volumes
        ],
    }


def cmd_check(args: argparse.Namespace) -> int:
    initdata = _load(args)
    out: dict[str, Any] = {
        "ok": True,
        "version": initdata.version,
        "algorithm": initdata.algorithm,
        "digest": initdata.digest().hex(),
        "data_keys": sorted(initdata.data),
    }
    if not args.initdata_only:
        contract = load_contract(initdata)
        out["contract"] = contract_summary(contract)
        from agent.hook.policy import hook_policy_warnings  # noqa: PLC0415 - check only

        out["warnings"] = hook_policy_warnings(initdata.data, contract)
        for warning in out["warnings"]:
            sys.stderr.write(f"cva: warning: {warning}\n")
    return _emit(out)


def cmd_reference(args: argparse.Namespace) -> int:
    initdata = _load(args)
    value = reference_value(initdata, args.tee)
    return _emit(
        {
            "tee": args.tee,
            "field": reference_field(args.tee),
            "hex": value.hex(),
            "base64": base64.b64encode(value).decode("ascii"),
            "algorithm": initdata.algorithm,
            "digest": initdata.digest().hex(),
        }
    )


def cmd_policy(args: argparse.Namespace) -> int:
    from agent.kbs_policy import (  # noqa: PLC0415
        VolumeGrant,
        VolumePin,
        Workload,
        parse_resource_path,
        resource_policy,
    )

    if args.files.count("-") > 1:
        raise InputError("stdin (-) can be read only once")
    workloads = []
    for name in args.files:
        initdata = parse_initdata(load_raw(name, args.format))
        workloads.append(Workload(initdata, load_contract(initdata)))
    volume = None
    given = [args.volume, args.uuid, args.header_sha256, args.resource]
    if any(v is not None for v in given):
        if not all(v is not None for v in given):
            raise InputError("--volume, --uuid, --header-sha256 and --resource go together")
        pin = VolumePin(args.volume, args.uuid, args.header_sha256, args.min_seq)
        volume = VolumeGrant(pin, tuple(parse_resource_path(r) for r in args.resource))
    elif args.min_seq is not None:
        raise InputError("--min-seq needs --volume")
    text = resource_policy(
        workloads, args.tee or (), require_affirming=not args.allow_unaffirmed, volume=volume
    )
    sys.stdout.write(text)
    return 0
