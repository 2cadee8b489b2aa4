"""Re-verify AWS account connections now, ahead of the schedule.

Examples:
  reverify 550e8400-e29b-41d4-a716-446655440000 --wait
  reverify --status failed --yes --wait --timeout 300
  reverify --aws-account-id 123456789012 --inline
  reverify --organization 0b6c... --dry-run --json

Without --inline the verifications are sent to the worker ahead of scheduled work; --wait then
waits for them and prints the results. --inline verifies in this process, without a broker or
worker, printing each step; the result is applied and audited exactly as the worker would.

Settings come from the environment (DATABASE_URL, REDIS_URL, AWS_*). When DATABASE_URL is not set
and a scripts/run is running, the settings of its stack are read from its DATA_DIR/stack.env
(.data/stack.env, or $VERIFIER_DATA_DIR): variables set in the environment win, and its AWS
settings are skipped when the environment configures AWS itself.

Exit codes: 0 all verified (connected) or, without --wait/--inline, all requested; 1 some not
connected (or --timeout reached); 2 bad usage or unknown ids; 3 the database or broker cannot be
reached.
"""

from __future__ import annotations

import argparse
import getpass
import json
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import kombu.exceptions
import redis
from sqlalchemy import Select, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from models import AccountStatus, AwsAccount
from scripts.stack_env import apply_stack_env
from worker.claims import claim_accounts
from worker.db import session_factory
from worker.logging import configure_logging
from worker.settings import Settings, get_settings_or_exit

EXIT_OK, EXIT_NOT_CONNECTED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class UnreachableError(Exception):
    """The database or broker did not answer; the message names it (password masked)."""


@dataclass
class Row:
    """One selected account, before and after."""

    id: uuid.UUID
    alias: str
    aws_account_id: str
    old_status: str
    new_status: str | None = None
    error_message: str | None = None
    lease_id: uuid.UUID | None = None
    done: bool = False

    def as_json(self) -> dict[str, Any]:
        """The row for --json output."""
        return {
            "id": str(self.id),
            "alias": self.alias,
            "awsAccountId": self.aws_account_id,
            "oldStatus": self.old_status,
            "newStatus": self.new_status,
            "errorMessage": self.error_message,
            "done": self.done,
        }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reverify",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    select_group = parser.add_argument_group("which accounts (combine to narrow down)")
    select_group.add_argument("ids", nargs="*", metavar="ID", help="account ids (UUIDs)")
    select_group.add_argument("--aws-account-id", action="append", default=[], metavar="ID")
    select_group.add_argument("--organization", action="append", default=[], metavar="UUID")
    select_group.add_argument("--status", choices=[s.value for s in AccountStatus])
    select_group.add_argument("--all", action="store_true", help="every account")
    parser.add_argument("--wait", action="store_true", help="wait for the results")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds --wait waits (default 120)"
    )
    parser.add_argument(
        "--inline", action="store_true", help="verify here, step by step, without the worker"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.add_argument("--dry-run", action="store_true", help="list what would be verified")
    parser.add_argument("--yes", "-y", action="store_true", help="no confirmation prompt")
    parser.add_argument(
        "--confirm-over",
        type=int,
        default=20,
        metavar="N",
        help="ask for confirmation above N accounts (default 20)",
    )
    parser.add_argument(
        "--requested-by",
        default=f"script:reverify:{getpass.getuser()}",
        help="recorded in the audit event (default script:reverify:<user>)",
    )
    return parser


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise UsageError(f"{what} {value!r} is not a UUID") from None


class UsageError(Exception):
    """Bad arguments or unknown ids (exit code 2)."""


def _selection(args: argparse.Namespace) -> tuple[Select[AwsAccount], list[uuid.UUID]]:
    ids = [_uuid(i, "account id") for i in args.ids]
    organizations = [_uuid(o, "organization id") for o in args.organization]
    for aws_id in args.aws_account_id:
        if not (len(aws_id) == 12 and aws_id.isdigit()):
            raise UsageError(f"AWS account id {aws_id!r} is not 12 digits")
    if not (ids or organizations or args.aws_account_id or args.status or args.all):
        raise UsageError(
            "say which accounts: ids, --aws-account-id, --organization, --status or --all"
        )
    query = select(AwsAccount).order_by(AwsAccount.created_at, AwsAccount.id)
    if ids:
        query = query.where(AwsAccount.id.in_(ids))
    if organizations:
        query = query.where(AwsAccount.organization_id.in_(organizations))
    if args.aws_account_id:
        query = query.where(AwsAccount.aws_account_id.in_(args.aws_account_id))
    if args.status:
        query = query.where(AwsAccount.status == AccountStatus(args.status))
    return query, ids


def _load(session: Session, args: argparse.Namespace) -> list[Row]:
    query, ids = _selection(args)
    accounts = list(session.scalars(query))
    missing = sorted(set(ids) - {a.id for a in accounts}, key=str)
    if missing:
        raise UsageError("unknown account id(s): " + ", ".join(str(m) for m in missing))
    return [
        Row(a.id, a.alias, a.aws_account_id, a.status.value, error_message=a.error_message)
        for a in accounts
    ]


def _confirm(rows: list[Row], args: argparse.Namespace) -> None:
    if len(rows) <= args.confirm_over or args.yes or args.dry_run:
        return
    if not sys.stdin.isatty():
        raise UsageError(
            f"{len(rows)} accounts selected (more than {args.confirm_over}); "
            "pass --yes to confirm when not running interactively"
        )
    answer = input(f"Re-verify {len(rows)} accounts? [y/N] ")
    if answer.strip().lower() not in {"y", "yes"}:
        raise UsageError("cancelled")


def _check_broker(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as error:
        raise UnreachableError(
            f"cannot reach the broker at {settings.redis_url_masked}: {error}"
        ) from None
    finally:
        client.close()


def _progress(done: int, total: int, started: float) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * done / total) if total else width
    bar = "#" * filled + "-" * (width - filled)
    sys.stderr.write(f"\r[{bar}] {done}/{total} verified  {time.monotonic() - started:5.1f}s")
    sys.stderr.flush()
    if done == total:
        sys.stderr.write("\n")


def _wait(rows: list[Row], timeout: float) -> None:
    """Poll until each row's lease (the request's, or an in-flight one) is released."""
    sessions = session_factory()
    started = time.monotonic()
    pending = {row.id: row for row in rows}
    while True:
        with sessions() as session:
            current = session.execute(
                select(
                    AwsAccount.id, AwsAccount.lease_id, AwsAccount.status, AwsAccount.error_message
                ).where(AwsAccount.id.in_(list(pending)))
            ).all()
        for account_id, lease_id, status, error_message in current:
            row = pending[account_id]
            row.new_status, row.error_message = status.value, error_message
            if lease_id is None or lease_id != row.lease_id:
                row.done = True
                del pending[account_id]
        for gone in set(pending) - {c[0] for c in current}:
            pending.pop(gone).new_status = "deleted"
        _progress(len(rows) - len(pending), len(rows), started)
        if not pending or time.monotonic() - started > timeout:
            if pending and sys.stderr.isatty():
                sys.stderr.write("\n")
            return
        time.sleep(0.25)


def _request(rows: list[Row], args: argparse.Namespace) -> str:
    from worker.requests import request_verification  # noqa: PLC0415 - loads Celery

    correlation_id = str(uuid.uuid4())
    with session_factory().begin() as session:
        result = request_verification(
            [r.id for r in rows],
            requested_by=args.requested_by,
            correlation_id=correlation_id,
            session=session,
        )
        # In-flight accounts are waited for through the lease their verification holds.
        leases = {
            account_id: lease_id
            for account_id, lease_id in session.execute(
                select(AwsAccount.id, AwsAccount.lease_id).where(
                    AwsAccount.id.in_([r.id for r in rows])
                )
            )
        }
    for row in rows:
        row.lease_id = leases.get(row.id)
    if not args.json:
        print(
            f"requested {len(result.sent)} verification(s), "
            f"{len(result.in_flight)} already in progress (correlation id {correlation_id})"
        )
    return correlation_id


def _inline(rows: list[Row], args: argparse.Namespace, settings: Settings) -> None:
    from worker.sts import StsVerifier  # noqa: PLC0415 - boto3 only when needed
    from worker.verify import Verification, verify_account  # noqa: PLC0415

    ctx = Verification(
        sessions=session_factory(),
        verifier=StsVerifier(settings),
        circuit=None,
        settings=settings,
        rng=random.Random(),
    )
    correlation_id = str(uuid.uuid4())
    for row in rows:
        if not args.json:
            print(f"\n{row.alias} ({row.aws_account_id}, {row.id})")
        with ctx.sessions.begin() as session:
            claim = claim_accounts(session, [row.id], lease_seconds=settings.lease_seconds)
        if not claim.account_ids:
            if not args.json:
                print("  skipped: a worker is verifying it right now")
            continue

        def observe(step: str, detail: str) -> None:
            if not args.json:
                print(f"  {step:<18} {detail}")

        verify_account(
            ctx,
            row.id,
            claim.lease_id,
            actor=args.requested_by,
            correlation_id=correlation_id,
            check_external_id=True,
            observe=observe,
        )
        with ctx.sessions() as session:
            account = session.get(AwsAccount, row.id)
            if account is not None:
                row.new_status, row.error_message = account.status.value, account.error_message
        row.done = True


def _status_cell(row: Row, *, dry_run: bool) -> str:
    if dry_run:
        return row.old_status
    return f"{row.old_status} -> {row.new_status or '?'}" + ("" if row.done else " (not finished)")


def _table(rows: Sequence[Row], *, dry_run: bool) -> None:
    headers = ("ACCOUNT", "ALIAS", "AWS ACCOUNT", "STATUS", "ERROR")
    lines = [
        (
            str(r.id),
            r.alias[:24],
            r.aws_account_id,
            _status_cell(r, dry_run=dry_run),
            (r.error_message or "")[:100],
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    for line in (headers, *lines):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def _act(rows: list[Row], args: argparse.Namespace, settings: Settings) -> str | None:
    """Verify inline, or request (and maybe wait); returns the request's correlation id."""
    if args.dry_run:
        return None
    if args.inline:
        _inline(rows, args, settings)
        return None
    _check_broker(settings)
    try:
        correlation_id = _request(rows, args)
    except kombu.exceptions.OperationalError as error:
        # Committed but not sent: the leases expire and the accounts fall due by themselves.
        raise UnreachableError(
            f"cannot send to the broker at {settings.redis_url_masked}: {error}"
        ) from None
    if args.wait:
        _wait(rows, args.timeout)
    return correlation_id


def run(argv: Sequence[str] | None = None) -> int:
    """The command; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    if args.inline and args.wait:
        raise UsageError("--inline already waits; drop --wait")
    stack_file = apply_stack_env()
    if stack_file is not None:
        print(f"reverify: using the running scripts/run's settings: {stack_file}", file=sys.stderr)
    settings = get_settings_or_exit()
    # Step-by-step output is the interface here; only errors from the libraries are worth a line.
    configure_logging(settings.model_copy(update={"log_level": "ERROR"}), stream=sys.stderr)
    try:
        with session_factory()() as session:
            rows = _load(session, args)
    except OperationalError as error:
        raise UnreachableError(
            f"cannot reach the database at {settings.database_url_masked}: "
            + (str(error.orig).strip().splitlines() or ["no answer"])[0]
        ) from None
    if not rows:
        print("no account matches", file=sys.stderr)
        return EXIT_OK
    _confirm(rows, args)
    correlation_id = _act(rows, args, settings)
    if args.json:
        print(
            json.dumps(
                {
                    "dryRun": args.dry_run,
                    "correlationId": correlation_id,
                    "accounts": [r.as_json() for r in rows],
                },
                indent=2,
            )
        )
    elif args.dry_run or args.wait or args.inline:
        if args.dry_run:
            print(f"would re-verify {len(rows)} account(s):")
        _table(rows, dry_run=args.dry_run)
    if args.dry_run or not (args.wait or args.inline):
        return EXIT_OK
    if all(r.done and r.new_status == AccountStatus.CONNECTED.value for r in rows):
        return EXIT_OK
    unfinished = [r for r in rows if not r.done]
    if unfinished and not args.json:
        print(f"timed out: {len(unfinished)} verification(s) not finished", file=sys.stderr)
    return EXIT_NOT_CONNECTED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: maps errors to exit codes and messages."""
    try:
        return run(argv)
    except UsageError as error:
        print(f"reverify: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except UnreachableError as error:
        print(f"reverify: error: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("\nreverify: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
