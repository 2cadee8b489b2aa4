"""The invariant checks themselves: each one passes on a healthy state and catches the violation
it exists for. A fault test is only as good as its checks; none of them may be vacuous."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, update

from models import AccountStatus, AuditEvent, AuditEventType, AwsAccount, OutcomeKind
from tests.faults.fleet import Fleet, Planned
from tests.faults.invariants import (
    check_audit_trail,
    check_final_statuses,
    check_logs_match_audit,
    check_no_wrongful_failures,
    check_nothing_stuck,
    check_still_verifying,
)
from tests.processes import Service

pytestmark = pytest.mark.faults

CONNECTED, FAILED, PENDING = AccountStatus.CONNECTED, AccountStatus.FAILED, AccountStatus.PENDING


def _move(
    fleet: Fleet,
    planned: Planned,
    to: AccountStatus,
    *,
    reason: str,
    outcome: OutcomeKind,
    events: int = 1,
    **row: object,
) -> None:
    """Set an account's status as the worker would, with `events` audit events (0: none)."""
    message = f"failed by {reason}" if to is FAILED else None
    with fleet.sessions.begin() as session:
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id == planned.id)
            .values(
                status=to,
                error_message=message,
                last_outcome=outcome,
                last_attempted_at=func.now(),
                next_due_at=func.now() + timedelta(hours=1),
                **row,
            )
        )
        session.add_all(
            AuditEvent(
                organization_id=fleet.organization_id,
                account_id=planned.id,
                event_type=AuditEventType.STATUS_CHANGED,
                actor="worker",
                from_status=planned.initial,
                to_status=to,
                reason=reason,
                details={"error_message": message, "outcome": outcome.value},
            )
            for _ in range(events)
        )


def _worker_log(tmp_path: Path, *records: Mapping[str, object]) -> Service:
    """A finished process whose stdout holds these JSON lines, standing in for a worker's."""
    lines = "".join(json.dumps(r) + "\n" for r in records)
    service = Service(
        "fake-worker", [sys.executable, "-c", f"print({lines!r}, end='')"], {}, tmp_path
    )
    service.process.wait(timeout=10)
    service.stop()  # closes its files; what it wrote stays readable
    return service


@pytest.mark.timeout(60)
def test_each_invariant_catches_its_violation(fleet: Fleet, tmp_path: Path) -> None:
    healthy = fleet.add("ok-healthy")
    _move(fleet, healthy, CONNECTED, reason="verified", outcome=OutcomeKind.VERIFIED)
    changed = {
        "event": "account.status_changed",
        "account_id": str(healthy.id),
        "from_status": "pending",
        "to_status": "connected",
        "reason": "verified",
    }
    check_final_statuses(fleet)
    check_no_wrongful_failures(fleet.sessions)
    check_audit_trail(fleet)
    check_nothing_stuck(fleet, timeout=0)
    check_logs_match_audit(fleet, [_worker_log(tmp_path, changed)], exact=True)

    # A connected account failed by a throttle.
    wronged = fleet.add("throttle-wronged", initial=CONNECTED)
    _move(fleet, wronged, FAILED, reason="Throttling", outcome=OutcomeKind.TRANSIENT)
    with pytest.raises(AssertionError, match=str(wronged.id)):
        check_no_wrongful_failures(fleet.sessions)
    with pytest.raises(AssertionError, match="throttle-wronged: failed, expected connected"):
        check_final_statuses(fleet)

    # A status change without its audit event, and one with two.
    silent = fleet.add("ok-silent")
    _move(fleet, silent, CONNECTED, reason="verified", outcome=OutcomeKind.VERIFIED, events=0)
    twice = fleet.add("ok-twice")
    _move(fleet, twice, CONNECTED, reason="verified", outcome=OutcomeKind.VERIFIED, events=2)
    with pytest.raises(AssertionError, match="ok-silent: status connected, but its audit trail"):
        check_audit_trail(fleet)
    with pytest.raises(AssertionError, match=r"ok-twice: event .* but the account was connected"):
        check_audit_trail(fleet)

    # An account left where it started.
    never = fleet.add("deny-never")
    with pytest.raises(AssertionError, match="deny-never: pending, expected failed"):
        check_final_statuses(fleet)

    # A lease an hour past its expiry.
    stuck = fleet.add("ok-stuck")
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    _move(
        fleet,
        stuck,
        CONNECTED,
        reason="verified",
        outcome=OutcomeKind.VERIFIED,
        lease_id=uuid.uuid4(),
        lease_expires_at=an_hour_ago,
    )
    with pytest.raises(AssertionError, match="ok-stuck: lease expires"):
        check_nothing_stuck(fleet, timeout=0)

    # A logged change without its event, and (exactly) an event without its line.
    ghost = {**changed, "account_id": str(never.id)}
    with pytest.raises(AssertionError, match="logged without an audit event"):
        check_logs_match_audit(fleet, [_worker_log(tmp_path, changed, ghost)], exact=False)
    with pytest.raises(AssertionError, match="without their log line"):
        check_logs_match_audit(fleet, [_worker_log(tmp_path, changed)], exact=True)

    # A worker that is gone.
    with pytest.raises(AssertionError, match="fake-worker exited"):
        check_still_verifying(fleet, [_worker_log(tmp_path)], timeout=0)
