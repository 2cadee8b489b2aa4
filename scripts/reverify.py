"""Re-verify AWS account connections now, ahead of the schedule.

Examples:
  reverify 550e8400-e29b-41d4-a716-446655440000 --wait
  reverify --status failed --yes --wait --timeout 300
  reverify --aws-account-id 123456789012 --inline
  reverify --organization 0b6c... --dry-run --json

Without --inline the verifications are sent to the worker ahead of scheduled work; --wait then
waits for them and prints each account's status and the outcome of its attempt (verified,
customer_must_fix, transient or platform_fault, with the error code), or why it was not verified
(platform paused, timed out). --inline verifies in this process, without a broker or worker,
printing each step; the result is applied and audited exactly as the worker would.

Settings come from the environment (DATABASE_URL, REDIS_URL, AWS_*). When DATABASE_URL is not set
and a scripts/run is running, the settings of its stack are read from its DATA_DIR/stack.env
(.data/stack.env, or $VERIFIER_DATA_DIR): variables set in the environment win, and its AWS
settings are skipped when the environment configures AWS itself.

On a terminal the ERROR column is cut to the terminal's width (ending in "…"); --wide (or --json)
shows whole messages, and so does output that is not a terminal. Customer text (alias, role ARN,
messages) is printed with control characters escaped (\\x1b).

Exit codes:
  0  every account verified and connected (without --wait/--inline: all requested)
  1  every account verified, and some are not connected (the customer must fix something)
  2  bad usage or unknown ids
  3  the database or broker cannot be reached
  4  some account not verified: its attempt was transient (STS unreachable) or a platform
     fault (the worker's own credentials), verification is paused, or --timeout was reached
     (4 wins over 1)
"""

from __future__ import annotations

import argparse
import getpass
import logging
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import kombu.exceptions
import redis
from sqlalchemy import Select, String, engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from models import AccountStatus, AuditEvent, AwsAccount, OutcomeKind
from scripts import _cli
from scripts._cli import (
    EXIT_OK,
    UnreachableError,
    UsageError,
    cut,
    database_unreachable,
    fit_width,
    table,
)
from worker.circuit import PlatformCircuit
from worker.claims import claim_accounts
from worker.db import session_factory
from worker.redact import escape_controls
from worker.requests import UnknownAccountsError
from worker.settings import Settings

EXIT_NOT_CONNECTED, EXIT_NOT_VERIFIED = 1, 4

# The audit event's column that records --requested-by.
ACTOR_MAX_LENGTH = cast(String, AuditEvent.__table__.c.actor.type).length or 255
# On a terminal, aliases are cut to this many columns, and the ERROR column never narrower than
# this (a narrower terminal wraps the line instead).
ALIAS_WIDTH = 24
MIN_ERROR_WIDTH = 20


@dataclass
class Row:
    """One selected account: before, and what this run's attempt concluded."""

    id: uuid.UUID
    alias: str
    aws_account_id: str
    old_status: str
    new_status: str | None = None
    error_message: str | None = None
    # When the account's last attempt before this run read it: an attempt recorded with any other
    # time is one made since the command started.
    attempted_before: datetime | None = None
    # The lease whose release ends the wait (the request's, or an in-flight verification's).
    lease_id: uuid.UUID | None = None
    outcome: OutcomeKind | None = None  # the kind of this run's attempt, once it concluded
    error_code: str | None = None
    not_verified: str | None = None  # why there is no outcome: "platform paused (...)", ...
    done: bool = False

    @property
    def verified(self) -> bool:
        """Whether the attempt had an answer about the customer's role (either way)."""
        return self.outcome in {OutcomeKind.VERIFIED, OutcomeKind.CUSTOMER_MUST_FIX}

    def outcome_text(self) -> str:
        """`verified`, `transient: EndpointConnectionError`, `not verified: timed out`, ..."""
        if self.outcome is None:
            return f"not verified: {self.not_verified or 'no result'}"
        if self.error_code is None:
            return self.outcome.value
        return f"{self.outcome.value}: {self.error_code}"

    def as_json(self) -> dict[str, Any]:
        """The row for --json output."""
        return {
            "id": str(self.id),
            "alias": self.alias,
            "awsAccountId": self.aws_account_id,
            "oldStatus": self.old_status,
            "newStatus": self.new_status,
            "errorMessage": self.error_message,
            "outcome": self.outcome.value if self.outcome else None,
            "errorCode": self.error_code,
            "verified": self.verified,
            "notVerified": self.not_verified,
            "done": self.done,
        }


def _parser() -> argparse.ArgumentParser:
    parser = _cli.parser("reverify", __doc__)
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
    parser.add_argument(
        "--wide", action="store_true", help="whole aliases and messages, even on a terminal"
    )
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
        help=(
            "recorded in the audit event (default script:reverify:<user>; "
            f"at most {ACTOR_MAX_LENGTH} characters)"
        ),
    )
    return parser


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise UsageError(f"{what} {value!r} is not a UUID") from None


def _check_arguments(args: argparse.Namespace) -> None:
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    if args.inline and args.wait:
        raise UsageError("--inline already waits; drop --wait")
    actor = args.requested_by
    if not actor.strip():
        raise UsageError("--requested-by must say who asked")
    if len(actor) > ACTOR_MAX_LENGTH:
        raise UsageError(
            f"--requested-by is {len(actor):,} characters long; at most {ACTOR_MAX_LENGTH}"
        )
    if escape_controls(actor) != actor:
        raise UsageError(f"--requested-by {actor!r} contains control characters")


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
    found = {a.id for a in accounts}
    missing = [i for i in dict.fromkeys(ids) if i not in found]  # in the order given
    if missing:
        raise UsageError(str(UnknownAccountsError(missing)))
    return [
        Row(
            a.id,
            a.alias,
            a.aws_account_id,
            a.status.value,
            error_message=a.error_message,
            attempted_before=a.last_attempted_at,
        )
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


def _broker(settings: Settings) -> redis.Redis:
    """A client for the broker's Redis (which also holds the circuit breaker), once it answers."""
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as error:
        client.close()
        raise UnreachableError(
            f"cannot reach the broker at {settings.redis_url_masked}: {error}"
        ) from None
    return client


def _progress(done: int, total: int, started: float) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * done / total) if total else width
    bar = "#" * filled + "-" * (width - filled)
    sys.stderr.write(f"\r[{bar}] {done}/{total} finished  {time.monotonic() - started:5.1f}s")
    sys.stderr.flush()
    if done == total:
        sys.stderr.write("\n")


_STATE = select(
    AwsAccount.id,
    AwsAccount.lease_id,
    AwsAccount.status,
    AwsAccount.error_message,
    AwsAccount.last_attempted_at,
    AwsAccount.last_outcome,
    AwsAccount.last_error_code,
)


def _take_state(
    row: Row,
    state: engine.Row[
        uuid.UUID,
        uuid.UUID | None,
        AccountStatus,
        str | None,
        datetime | None,
        OutcomeKind | None,
        str | None,
    ],
) -> bool:
    """Copy the account's current state into `row`; True once an attempt made since the command
    started has concluded (its outcome is then the row's)."""
    row.new_status, row.error_message = state.status.value, state.error_message
    attempted = state.last_attempted_at
    # Only a verification holding the account's lease writes last_attempted_at, and it writes the
    # time its attempt read the account: a value other than the one read before the request is a
    # new attempt's. A lease released without a result (paused, discarded) leaves it alone.
    if attempted is None or attempted == row.attempted_before or state.last_outcome is None:
        return False
    row.outcome, row.error_code, row.done = state.last_outcome, state.last_error_code, True
    return True


def _wait(rows: list[Row], timeout: float, circuit: PlatformCircuit) -> None:
    """Poll until each row has the outcome of an attempt made since the command started, or
    cannot have one soon (paused, deleted, timed out)."""
    sessions = session_factory()
    started = time.monotonic()
    pending = {row.id: row for row in rows}
    while True:
        with sessions() as session:
            current = session.execute(_STATE.where(AwsAccount.id.in_(list(pending)))).all()
        for state in current:
            row = pending[state.id]
            if _take_state(row, state):
                del pending[state.id]
            elif state.lease_id != row.lease_id:
                # Released without a result. While the circuit breaker is open the worker skips
                # accounts and makes them due after the pause: nothing will be verified until a
                # probe succeeds. Otherwise (the account changed during the attempt, or the
                # worker had no room) it is due again at once, and the wait goes on.
                paused = circuit.state()
                if paused is not None:
                    row.not_verified = f"platform paused ({paused.code})"
                    row.done = True
                    del pending[state.id]
        for gone in set(pending) - {state.id for state in current}:
            row = pending.pop(gone)
            row.new_status, row.not_verified, row.done = "deleted", "deleted", True
        _progress(len(rows) - len(pending), len(rows), started)
        if not pending or time.monotonic() - started > timeout:
            if pending and sys.stderr.isatty():
                sys.stderr.write("\n")
            for row in pending.values():
                row.not_verified = "timed out"
            return
        time.sleep(0.25)


def _request(rows: list[Row], args: argparse.Namespace) -> str:
    from worker.requests import request_verification  # noqa: PLC0415 - loads Celery

    correlation_id = str(uuid.uuid4())
    try:
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
    except UnknownAccountsError as error:  # deleted since they were selected
        raise UsageError(str(error)) from None
    for row in rows:
        row.lease_id = leases.get(row.id)
    if not args.json:
        print(
            f"requested {len(result.sent)} verification(s), "
            f"{len(result.in_flight)} already in progress (correlation id {correlation_id})"
        )
    return correlation_id


def _inline(rows: list[Row], args: argparse.Namespace, settings: Settings) -> None:
    from worker.chunk import verify_account  # noqa: PLC0415 - boto3 only when needed
    from worker.sts.verifier import StsVerifier  # noqa: PLC0415
    from worker.verify import CheckOptions, Result, VerificationDeps  # noqa: PLC0415

    deps = VerificationDeps(
        sessions=session_factory(),
        verifier=StsVerifier(settings),
        circuit=None,
        settings=settings,
        rng=random.Random(),
    )
    correlation_id = str(uuid.uuid4())
    for row in rows:
        if not args.json:
            print(f"\n{escape_controls(row.alias)} ({row.aws_account_id}, {row.id})")
        with deps.sessions.begin() as session:
            claim = claim_accounts(session, [row.id], lease_seconds=settings.lease_seconds)
        if not claim.account_ids:
            row.not_verified, row.done = "a worker is verifying it", True
            if not args.json:
                print(f"  skipped: {row.not_verified} right now")
            continue

        def observe(step: str, detail: str) -> None:
            if not args.json:
                print(f"  {step:<18} {escape_controls(detail)}")

        result = verify_account(
            deps,
            row.id,
            claim.lease_id,
            actor=args.requested_by,
            correlation_id=correlation_id,
            options=CheckOptions(check_external_id=True, probe_permissions=True, observe=observe),
        )
        with deps.sessions() as session:
            state = session.execute(_STATE.where(AwsAccount.id == row.id)).one_or_none()
        if state is None:
            row.new_status, row.not_verified = "deleted", "deleted"
        elif not _take_state(row, state):
            row.not_verified = (
                "the account changed during the attempt"
                if result is Result.DISCARDED
                else "no result"
            )
        row.done = True


# --- the table ---------------------------------------------------------------------------------


def _status_cell(row: Row, *, dry_run: bool) -> str:
    if dry_run:
        return row.old_status
    return f"{row.old_status} -> {row.new_status or '?'}"


def _table(rows: Sequence[Row], *, dry_run: bool, fit: int | None) -> None:
    """Print the table; `fit`: the terminal's width, to which aliases and messages are cut."""
    headers = ["ACCOUNT", "ALIAS", "AWS ACCOUNT", "STATUS"] + ([] if dry_run else ["OUTCOME"])
    # Customer text is escaped first, then measured and cut: widths are those of what is printed.
    lines = [
        [
            str(r.id),
            escape_controls(r.alias),
            r.aws_account_id,
            _status_cell(r, dry_run=dry_run),
            *([] if dry_run else [escape_controls(r.outcome_text())]),
            escape_controls(r.error_message or ""),
        ]
        for r in rows
    ]
    cut_alias = False
    if fit is not None:
        for line in lines:
            alias = cut(line[1], ALIAS_WIDTH)
            cut_alias = cut_alias or alias != line[1]
            line[1] = alias
    shown, cut_error = table([[*headers, "ERROR"], *lines], fit=fit, min_last=MIN_ERROR_WIDTH)
    for text in shown:
        print(text)
    if cut_alias or cut_error:
        print("(cut to fit the terminal: --wide or --json shows whole aliases and messages)")


def _act(rows: list[Row], args: argparse.Namespace, settings: Settings) -> str | None:
    """Verify inline, or request (and maybe wait); returns the request's correlation id."""
    if args.dry_run:
        return None
    if args.inline:
        _inline(rows, args, settings)
        return None
    broker = _broker(settings)
    try:
        try:
            correlation_id = _request(rows, args)
        except kombu.exceptions.OperationalError as error:
            # Committed but not sent: the leases expire and the accounts fall due by themselves.
            raise UnreachableError(
                f"cannot send to the broker at {settings.redis_url_masked}: {error}"
            ) from None
        if args.wait:
            _wait(rows, args.timeout, PlatformCircuit(broker, pause_seconds=0))
    finally:
        broker.close()
    return correlation_id


def _exit_code(rows: Sequence[Row]) -> int:
    if not all(r.verified for r in rows):
        return EXIT_NOT_VERIFIED
    if all(
        r.outcome is OutcomeKind.VERIFIED and r.new_status == AccountStatus.CONNECTED.value
        for r in rows
    ):
        return EXIT_OK
    return EXIT_NOT_CONNECTED


class _ReportedHere(logging.Filter):
    """Drops the worker's lines about each account's result: `--inline` prints every step and
    the table every outcome, and a log line between them would only say it again."""

    EVENTS = frozenset({"verification.completed", "account.status_changed"})

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, dict) and record.msg.get("event") in self.EVENTS)


def _configure_logging() -> None:
    # Step-by-step output and the table are the interface here; only errors are worth a line
    # (`_cli.load_settings`), and none about what the table shows.
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ReportedHere())


def run(argv: Sequence[str] | None = None) -> int:
    """The command; returns the exit code."""
    args = _parser().parse_args(argv)
    _check_arguments(args)
    settings = _cli.load_settings("reverify")
    _configure_logging()
    try:
        with session_factory()() as session:
            rows = _load(session, args)
    except OperationalError as error:
        raise database_unreachable(settings, error) from None
    if not rows:
        print("no account matches", file=sys.stderr)
        return EXIT_OK
    _confirm(rows, args)
    correlation_id = _act(rows, args, settings)
    if args.json:
        _cli.print_json(
            {
                "dryRun": args.dry_run,
                "correlationId": correlation_id,
                "accounts": [r.as_json() for r in rows],
            }
        )
    elif args.dry_run or args.wait or args.inline:
        if args.dry_run:
            print(f"would re-verify {len(rows)} account(s):")
        _table(rows, dry_run=args.dry_run, fit=fit_width(wide=args.wide))
    if args.dry_run or not (args.wait or args.inline):
        return EXIT_OK
    code = _exit_code(rows)
    if code == EXIT_NOT_VERIFIED and not args.json:
        unverified = sum(not r.verified for r in rows)
        print(
            f"not verified: {unverified} of {len(rows)} account(s) (see OUTCOME)",
            file=sys.stderr,
        )
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: maps errors to exit codes and messages."""
    return _cli.run_main("reverify", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
