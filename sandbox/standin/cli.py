"""The command line: ``python -m sandbox.standin``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from sandbox.standin.config import _FIELD_KINDS, StandInConfig
from sandbox.standin.server import serve


def build_parser() -> argparse.ArgumentParser:
    """The `python -m sandbox.standin` arguments; defaults are StandInConfig's."""
    d = StandInConfig()
    parser = argparse.ArgumentParser(
        prog="python -m sandbox.standin",
        description=(
            "A fast STS stand-in speaking AWS's real wire format. Prints its URL on one line "
            "when ready; exits on SIGINT/SIGTERM. Role behaviour follows the role name prefix "
            "(ok, noext, otheracct, deny, throttle, error500, error503, slow, reset, garbage, "
            "regiondisabled, expiredtoken, invalidtoken, badsignature, flakyN, noperms, noec2, "
            "probeerror, bigquota); the four permission-probe calls (IAM, EC2, S3, CloudTrail) are "
            "answered too; see the module docstring. Knobs can be changed later with "
            "POST /_standin/config."
        ),
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    add("--port", type=int, default=0, help="port to listen on (default: a free one)")
    add("--seed", type=int, help="seed of latency, faults and fake credentials")
    add("--median-ms", type=float, help=f"median latency, 0 for none (default {d.median_ms})")
    add("--latency-sigma", type=float, help=f"log-normal shape (default {d.latency_sigma})")
    add("--slow-seconds", type=float, help=f"delay of 'slow' roles (default {d.slow_seconds})")
    add("--rate-limit", type=float, help="global requests/s above which Throttling is answered")
    add("--rate-burst", type=float, help="token bucket size (default: one second of rate)")
    add("--platform-arn", help=f"the platform's identity (default {d.platform_arn})")
    add(
        "--platform-credentials-invalid",
        action="store_true",
        help="answer InvalidClientTokenId to every request",
    )
    add(
        "--accept-access-key",
        action="append",
        metavar="AKID",
        help="accept only these access key ids (repeatable; default: any)",
    )
    add(
        "--enabled-region",
        action="append",
        metavar="REGION",
        help="regions where 'regiondisabled' roles succeed (repeatable; '*' for all; "
        "default us-east-1)",
    )
    add(
        "--flaky-failures", type=int, help=f"failures of 'flaky' roles (default {d.flaky_failures})"
    )
    add("--flaky-error", help=f"error code of 'flaky' failures (default {d.flaky_error})")
    add(
        "--max-session-seconds",
        type=int,
        help=f"every role's MaxSessionDuration (default {d.max_session_seconds})",
    )
    add("--force-error", help="answer this code (or reset/garbage/slow) to every request")
    add("--force-ratio", type=float, help="fraction of requests that get --force-error (1.0)")
    add("--force-seconds", type=float, help="how long --force-error lasts (default: forever)")
    return parser


def _config_from_args(args: argparse.Namespace) -> StandInConfig:
    changes: dict[str, object] = {}
    for name in _FIELD_KINDS:
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if args.platform_credentials_invalid:
        changes["platform_credentials_valid"] = False
    if args.accept_access_key:
        changes["accepted_access_keys"] = args.accept_access_key
    if args.enabled_region:
        changes["enabled_regions"] = args.enabled_region
    return StandInConfig().with_changes(changes)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in as a process until SIGINT or SIGTERM."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = _config_from_args(args)
    except ValueError as error:
        parser.error(str(error))

    def ready(port: int) -> None:
        host = f"[{args.host}]" if ":" in args.host else args.host
        sys.stdout.write(f"http://{host}:{port}\n")
        sys.stdout.flush()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, stop, host=args.host, port=args.port, on_ready=ready)

    try:
        asyncio.run(run())
    except OSError as error:
        sys.stderr.write(f"sts stand-in: cannot listen on {args.host}:{args.port}: {error}\n")
        return 1
    return 0
