"""`cva kbs get-resource`: fetch one KBS resource and write its bytes to stdout (DESIGN §9).

    cva kbs get-resource --url URL [--cacert PEM] [--initdata FILE] [--tee TEE] URI

Exactly one RCAR handshake and one resource GET (3 requests). On any failure stdout stays
empty and stderr gets one line naming the cause; the exit code is non-zero. Logs go to stderr
(errors only unless --verbose), never the resource.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from agent.errors import CvaError, InputError

MAX_FILE_BYTES = 1024 * 1024


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this area's subcommands to `cva`."""
    kbs = sub.add_parser("kbs", help="talk to a Trustee KBS")
    kbs_sub = kbs.add_subparsers(dest="kbs_command", metavar="KBS_COMMAND")
    kbs_sub.required = True
    get = kbs_sub.add_parser("get-resource", help="attest and print a resource's bytes to stdout")
    get.add_argument("--url", required=True, help="the KBS base URL, e.g. https://kbs:8080")
    get.add_argument("--cacert", metavar="PEM", help="trust only this CA for the KBS's TLS")
    get.add_argument("--initdata", metavar="FILE", help="initdata TOML sent as init-data")
    get.add_argument(
        "--tee",
        default="auto",
        choices=("auto", "tdx", "snp", "tpm", "sample"),
        help="which TEE attests (default: detect TDX/SNP, then a TPM; sample only by name)",
    )
    get.add_argument(
        "--key-algorithm",
        default="ECDH-ES+A256KW-P256",
        choices=("ECDH-ES+A256KW-P256", "ECDH-ES+A256KW-P521", "RSA-OAEP-256", "RSA1_5"),
        help="the ephemeral TEE key type the resource is wrapped for",
    )
    get.add_argument(
        "--allow-http", action="store_true", help="allow plain http to a non-loopback KBS"
    )
    get.add_argument("--timeout", type=float, default=60.0, help="overall deadline in seconds")
    get.add_argument("--verbose", action="store_true", help="log progress to stderr")
    get.add_argument("uri", metavar="URI", help="kbs:///repo/type/tag or kbs+plugin:///...")
    get.set_defaults(func=get_resource)


def _read_small(path: str, what: str) -> bytes:
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"{what} {path} is larger than {MAX_FILE_BYTES} bytes")
    return data


def _configure_logging(verbose: bool) -> None:
    from agent.log import configure_logging  # noqa: PLC0415 - lazy, as all handler imports

    # stdout carries the resource bytes only; progress (--verbose) and nothing else on stderr
    configure_logging("info" if verbose else "critical", stream=sys.stderr)


def get_resource(args: argparse.Namespace) -> int:
    _configure_logging(args.verbose)  # before anything that might log
    # lazy imports: agent.cli keeps `cva --help` and the daemon's start fast
    from agent.contract import parse_kbs_uri  # noqa: PLC0415
    from agent.kbs.client import KbsClient  # noqa: PLC0415
    from evidence.detect import attester_for  # noqa: PLC0415

    _configure_logging(args.verbose)
    uri = parse_kbs_uri(args.uri)
    cacert = None
    if args.cacert:
        try:
            cacert = _read_small(args.cacert, "CA certificate").decode("ascii")
        except UnicodeDecodeError:
            raise InputError(f"CA certificate {args.cacert} is not a PEM file") from None
    initdata = None
    if args.initdata:
        from agent.initdata import parse_initdata  # noqa: PLC0415

        initdata = parse_initdata(_read_small(args.initdata, "initdata file"))
    if args.timeout <= 0:
        raise InputError("--timeout must be positive")
    attester = attester_for(args.tee)

    async def fetch() -> int:
        async with KbsClient(
            args.url,
            attester=attester,
            initdata=initdata,
            cacert_pem=cacert,
            allow_http=args.allow_http,
            deadline=args.timeout,
            key_algorithm=args.key_algorithm,
        ) as client:
            with await client.get_resource(uri) as secret:
                out = sys.stdout.buffer
                out.write(secret.view())
                out.flush()
        return 0

    try:
        return asyncio.run(fetch())
    except CvaError:
        raise
    except OSError as exc:  # stdout closed or similar
        raise CvaError(f"cannot write the resource to stdout: {exc.strerror}") from None
