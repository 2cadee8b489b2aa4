"""What must hold after every fault, written once.

1. Every account reached the status its STS behaviour implies, and none was moved to `failed`
   by a transient or platform-side fault.
2. Every status change has exactly one audit event and every audit event matches a change: per
   account, the chain of `status_changed` events starts at its initial status, each event starts
   where the previous one ended, and the chain ends at its current status.
3. Nothing is stuck: no lease outlives its expiry, no account stays overdue.
4. The worker still runs and still verifies: a fresh account gets verified.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AuditEvent, AuditEventType, AwsAccount, OutcomeKind
from tests.faults.fleet import Fleet, Planned
from tests.faults.harness import log_events
from tests.processes import Service
from tests.verification import status_events

# Reasons a status may move to failed for: what the customer must fix (docs/design.md). Anything
# else, above all a throttle, a 5xx, a timeout, a reset, an unparseable answer or our own
# credentials, must never fail a customer's account.
CUSTOMER_REASONS = frozenset(
    {
        "AccessDenied",
        "ExternalIdNotEnforced",
        "IdentityMismatch",
        "InvalidRoleArn",
        "UnsupportedPartition",
        "RoleAccountMismatch",
        "InvalidExternalId",
        "RegionDisabledException",
        "ValidationError",
        "InvalidRoleDetails",
    }
)


def wait_for(fleet: Fleet, *, timeout: float, what: str = "every account to settle") -> None:
    """Wait until every live account is attempted and at its expected status."""
    deadline = time.monotonic() + timeout
    while True:
        waiting = fleet.pending_work()
        if not waiting:
            return
        if time.monotonic() > deadline:
            shown = "\n  ".join(waiting[:20])
            raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n  {shown}")
        time.sleep(0.25)


# -- 1. statuses ---------------------------------------------------------------------------------


def check_final_statuses(fleet: Fleet) -> None:
    """Each account is at its expected status; accounts that only met transient or platform
    faults kept their status and their error message."""
    rows = fleet.rows()
    problems = []
    for planned in fleet.live():
        row = rows.get(planned.id)
        if row is None:
            problems.append(f"{planned.label}: row is gone")
            continue
        if row.status is not planned.expected:
            problems.append(
                f"{planned.label}: {row.status.value}, expected {planned.expected.value} "
                f"(last error {row.last_error_code})"
            )
        if planned.transient and row.last_outcome not in {
            None,
            OutcomeKind.TRANSIENT,
            OutcomeKind.PLATFORM_FAULT,
        }:
            problems.append(f"{planned.label}: last outcome {row.last_outcome}")
    for planned in fleet.accounts.values():
        if planned.deleted and planned.id in rows:
            problems.append(f"{planned.label}: deleted, but the row is back")
    assert not problems, "accounts not where their STS behaviour puts them:\n  " + "\n  ".join(
        problems
    )


def check_no_wrongful_failures(sessions: sessionmaker[Session]) -> None:
    """No status change to failed for anything but a customer-fixable outcome."""
    wrongful = [
        f"{e.account_id}: {e.from_status} -> failed by {e.reason} ({e.details.get('outcome')})"
        for e in status_events(sessions)
        if e.to_status is AccountStatus.FAILED
        and (
            e.reason not in CUSTOMER_REASONS
            or e.details.get("outcome") != OutcomeKind.CUSTOMER_MUST_FIX.value
        )
    ]
    assert not wrongful, "accounts failed by a transient or platform fault:\n  " + "\n  ".join(
        wrongful
    )


# -- 2. audit trail ------------------------------------------------------------------------------


def _sort_events(
    fleet: Fleet, events: list[AuditEvent]
) -> tuple[dict[uuid.UUID, list[AuditEvent]], list[str]]:
    """Each account's status changes in order, and what is wrong with the events themselves."""
    by_account: dict[uuid.UUID, list[AuditEvent]] = {}
    problems = []
    for event in events:
        if event.account_id not in fleet.accounts:
            problems.append(f"event {event.id} for an account the test never made")
            continue
        if event.organization_id != fleet.organization_id:
            problems.append(f"event {event.id} names organization {event.organization_id}")
        if event.event_type is AuditEventType.STATUS_CHANGED:
            by_account.setdefault(event.account_id, []).append(event)
        elif event.event_type is AuditEventType.EXTERNAL_ID_NOT_ENFORCED:
            siblings = [
                e
                for e in events
                if e.account_id == event.account_id
                and e.event_type is AuditEventType.STATUS_CHANGED
                and e.reason == "ExternalIdNotEnforced"
                and e.occurred_at == event.occurred_at  # now(): the same transaction
            ]
            if len(siblings) != 1:
                problems.append(
                    f"{fleet.accounts[event.account_id].label}: external_id_not_enforced event "
                    f"{event.id} without exactly one status change in its transaction "
                    f"({len(siblings)})"
                )
    return by_account, problems


def _chain_problems(planned: Planned, chain: list[AuditEvent], row: AwsAccount | None) -> list[str]:
    """What is wrong with one account's chain of status changes."""
    problems = []
    status = planned.initial
    for event in chain:
        if event.from_status is not status:
            problems.append(
                f"{planned.label}: event {event.id} {event.from_status} -> "
                f"{event.to_status}, but the account was {status.value}"
            )
        assert event.to_status is not None
        status = event.to_status
        if event.to_status is AccountStatus.FAILED and not event.details.get("error_message"):
            problems.append(f"{planned.label}: change to failed without its message")
        if event.to_status is AccountStatus.CONNECTED and event.reason != "verified":
            problems.append(f"{planned.label}: connected by {event.reason}")
    if planned.deleted:
        return problems
    if row is not None and row.status is not status:
        problems.append(
            f"{planned.label}: status {row.status.value}, but its audit trail ends at "
            f"{status.value} ({len(chain)} events): a change without its event"
        )
    if planned.reason is not None and (not chain or chain[-1].reason != planned.reason):
        last = chain[-1].reason if chain else "no change"
        problems.append(f"{planned.label}: last change by {last}, expected {planned.reason}")
    if planned.reason is None and planned.expected is planned.initial and chain:
        problems.append(
            f"{planned.label}: should never have changed, but has "
            + ", ".join(f"{e.from_status} -> {e.to_status} ({e.reason})" for e in chain)
        )
    return problems


def check_audit_trail(fleet: Fleet) -> None:
    """One event per change, one change per event, and nothing else in the table: per account,
    the status changes chain from its initial status to its current one."""
    with fleet.sessions() as session:
        events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    rows = fleet.rows()
    by_account, problems = _sort_events(fleet, events)
    for planned in fleet.accounts.values():
        problems += _chain_problems(planned, by_account.get(planned.id, []), rows.get(planned.id))
    assert not problems, "audit trail and statuses disagree:\n  " + "\n  ".join(problems)


def check_logs_match_audit(fleet: Fleet, workers: Sequence[Service], *, exact: bool) -> None:
    """Each `account.status_changed` line of the workers has its audit event. With `exact` (no
    worker was killed, no database connection cut between commit and log), the other way too."""
    logged: Counter[tuple[object, ...]] = Counter(
        (r.get("account_id"), r.get("from_status"), r.get("to_status"), r.get("reason"))
        for worker in workers
        for r in log_events(worker, "account.status_changed")
    )
    audited: Counter[tuple[object, ...]] = Counter(
        (str(e.account_id), e.from_status.value, e.to_status.value, e.reason)
        for e in status_events(fleet.sessions)
        if e.from_status is not None and e.to_status is not None
    )
    missing = logged - audited
    assert not missing, f"status changes logged without an audit event: {dict(missing)}"
    if exact:
        unlogged = audited - logged
        assert not unlogged, f"audit events without their log line: {dict(unlogged)}"


# -- 3. nothing stuck -----------------------------------------------------------------------------


def stuck_accounts(fleet: Fleet, *, slack_seconds: float) -> list[str]:
    """Accounts holding a lease past its expiry, or overdue by more than `slack_seconds`."""
    slack = timedelta(seconds=slack_seconds)
    with fleet.sessions() as session:
        rows = session.execute(
            select(AwsAccount.id, AwsAccount.lease_expires_at, AwsAccount.next_due_at, func.now())
            .where(AwsAccount.id.in_(list(fleet.accounts)))
            .where(
                or_(
                    and_(
                        AwsAccount.lease_id.is_not(None),
                        AwsAccount.lease_expires_at < func.now() - slack,
                    ),
                    AwsAccount.next_due_at < func.now() - slack,
                )
            )
        ).all()
    return [
        f"{fleet.accounts[row[0]].label}: lease expires {row[1]}, due {row[2]}, now {row[3]}"
        for row in rows
    ]


def check_nothing_stuck(fleet: Fleet, *, timeout: float, slack_seconds: float = 3.0) -> None:
    """Within `timeout`, no lease outlives its expiry and every account is due in the future
    (give or take one dispatch): an expired lease is taken over, an overdue account claimed."""
    deadline = time.monotonic() + timeout
    while True:
        stuck = stuck_accounts(fleet, slack_seconds=slack_seconds)
        if not stuck:
            return
        if time.monotonic() > deadline:
            raise AssertionError("accounts stuck:\n  " + "\n  ".join(stuck))
        time.sleep(0.5)


# -- 4. still verifying ---------------------------------------------------------------------------


def check_still_verifying(
    fleet: Fleet, services: Iterable[Service], *, timeout: float = 30
) -> None:
    """Every process still runs, and an account inserted now is verified."""
    for service in services:
        assert service.process.poll() is None, (
            f"{service.name} exited with {service.process.returncode}:\n{service.errors()[-3000:]}"
        )
    fresh = fleet.add(f"ok-fresh-{uuid.uuid4().hex[:8]}")
    deadline = time.monotonic() + timeout
    while fleet.statuses().get(fresh.id) is not AccountStatus.CONNECTED:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"an account inserted after the fault was not verified within {timeout}s: "
                f"{fleet.pending_work()}"
            )
        time.sleep(0.25)


def check_invariants(
    fleet: Fleet,
    *,
    services: Sequence[Service],
    workers: Sequence[Service],
    exact_logs: bool,
    stuck_timeout: float = 15,
) -> None:
    """All four, in the order that gives the clearest failure."""
    check_no_wrongful_failures(fleet.sessions)
    check_final_statuses(fleet)
    check_nothing_stuck(fleet, timeout=stuck_timeout)
    check_still_verifying(fleet, services)
    check_audit_trail(fleet)
    check_logs_match_audit(fleet, workers, exact=exact_logs)
