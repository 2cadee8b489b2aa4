"""Command line for the sandbox STS.

    python -m sandbox serve [--host H] [--port P] [--demo] [--propagation-delay S] [--verbose]
    python -m sandbox platform-credentials {show,revoke,restore} --endpoint-url URL

`serve` runs in the foreground until SIGINT or SIGTERM and prints one line, once requests can be
answered, naming the endpoint and the platform's access key id; wrappers can wait for it.
`platform-credentials` flips a running sandbox between accepting the platform's credentials and
answering ``InvalidClientTokenId``, to show the platform-fault path from another terminal.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
import threading
import urllib.error
from types import FrameType

from sandbox.demo import DEMO_CONNECTIONS, seed_demo_roles
from sandbox.moto_sts import (
    PLATFORM_ACCESS_KEY_ID,
    PLATFORM_PRINCIPAL_ARN,
    SandboxSts,
    get_platform_credentials_valid,
    set_platform_credentials_valid,
)


def _say(line: str, *, err: bool = False) -> None:
    """The CLI's output: one flushed line, so a wrapper reading a pipe sees it at once."""
    print(line, file=sys.stderr if err else sys.stdout, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox",
        description="A local STS that enforces IAM role trust policies and external IDs "
        "(moto plus a trust-policy layer).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the sandbox in the foreground")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    serve.add_argument(
        "--port", type=int, default=5000, help="port to bind, 0 for any free one (default 5000)"
    )
    serve.add_argument(
        "--demo", action="store_true", help="create the demo customer roles after start"
    )
    serve.add_argument(
        "--propagation-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep new roles invisible to STS this long, like IAM propagation (default 0)",
    )
    serve.add_argument("--verbose", action="store_true", help="log every request to stderr")

    creds = commands.add_parser(
        "platform-credentials", help="show, revoke or restore the platform's credentials"
    )
    creds.add_argument("action", choices=["show", "revoke", "restore"])
    creds.add_argument(
        "--endpoint-url", required=True, help="the running sandbox, e.g. http://127.0.0.1:5000"
    )
    return parser


def _serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        _say(f"error: --port must be between 0 and 65535, not {args.port}", err=True)
        return 2
    if args.propagation_delay < 0:
        _say("error: --propagation-delay must not be negative", err=True)
        return 2
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sandbox = SandboxSts(
        args.host, args.port, propagation_delay=args.propagation_delay, verbose=args.verbose
    )
    try:
        sandbox.start()
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        _say(f"error: cannot listen on {args.host}:{args.port}: {reason}", err=True)
        return 1

    stopping = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        if args.demo:
            seed_demo_roles(sandbox.endpoint_url)
            for connection in DEMO_CONNECTIONS:
                _say(
                    f"demo: {connection.behaviour:<24} {connection.role_arn} "
                    f"external id {connection.external_id} (shows {connection.shows})",
                    err=True,
                )
        _say(
            f"sandbox STS listening on {sandbox.endpoint_url} "
            f"(platform access key id {PLATFORM_ACCESS_KEY_ID}, any secret; "
            f"principal {PLATFORM_PRINCIPAL_ARN})"
        )
        stopping.wait()
    finally:
        sandbox.stop()
    return 0


def _platform_credentials(args: argparse.Namespace) -> int:
    try:
        if args.action != "show":
            set_platform_credentials_valid(args.endpoint_url, args.action == "restore")
        valid = get_platform_credentials_valid(args.endpoint_url)
    except (urllib.error.URLError, ValueError) as exc:
        _say(f"error: cannot reach the sandbox at {args.endpoint_url}: {exc}", err=True)
        return 1
    _say(f"platform credentials: {'valid' if valid else 'revoked'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the command; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _platform_credentials(args)


if __name__ == "__main__":
    sys.exit(main())
