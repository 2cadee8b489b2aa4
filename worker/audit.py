"""Audit rows: which events a verification or a request records, written one way (one INSERT).

An event is a dict of `audit_events` columns; `insert_audit_events` writes any number of them in
the caller's transaction, so a status change and its event are one commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Table, func, insert, select
from sqlalchemy.orm import Session

from models import AccountStatus, AuditEvent, AuditEventType

if TYPE_CHECKING:  # `request_verification` writes events without loading boto3
    from worker.rules import Decision
    from worker.sts.outcome import Outcome
    from worker.verify import Attempt

_INSERT_EVENTS = insert(cast(Table, AuditEvent.__table__))


def insert_audit_events(session: Session, events: Sequence[dict[str, Any]]) -> None:
    """Write audit rows in one statement; each is a dict of every column of `audit_events` but
    its id and time."""
    if events:
        session.execute(_INSERT_EVENTS, list(events))


def requested_event(
    organization_id: uuid.UUID,
    account_id: uuid.UUID,
    *,
    actor: str,
    correlation_id: str,
    already_in_flight: bool,
) -> dict[str, Any]:
    """`verification_requested`: someone asked for this account to be verified now."""
    return {
        "organization_id": organization_id,
        "account_id": account_id,
        "actor": actor,
        "correlation_id": correlation_id,
        "event_type": AuditEventType.VERIFICATION_REQUESTED,
        "from_status": None,
        "to_status": None,
        "reason": None,
        "details": {"already_in_flight": already_in_flight},
    }


def count_recent_failures(session: Session, *, code: str, window_seconds: int) -> int:
    """connected -> failed transitions with this error code inside the wave window."""
    count = session.scalar(
        select(func.count())
        .select_from(AuditEvent)
        .where(
            AuditEvent.event_type == AuditEventType.STATUS_CHANGED,
            AuditEvent.from_status == AccountStatus.CONNECTED,
            AuditEvent.to_status == AccountStatus.FAILED,
            AuditEvent.reason == code,
            AuditEvent.occurred_at > func.now() - timedelta(seconds=window_seconds),
        )
    )
    return int(count or 0)


def audit_events_for(
    attempt: Attempt,
    decision: Decision,
    outcome: Outcome,
    *,
    actor: str,
    correlation_id: str | None,
) -> list[dict[str, Any]]:
    """The events an applied decision records: a status change, and a change in the set of
    missing permissions."""
    common: dict[str, Any] = {
        "organization_id": attempt.organization_id,
        "account_id": attempt.account_id,
        "actor": actor,
        "correlation_id": correlation_id,
    }
    permissions = _permissions_event(attempt, outcome)
    if decision.status == attempt.state.status:
        return [{**common, **permissions}] if permissions else []
    events: list[dict[str, Any]] = [
        {
            **common,
            "event_type": AuditEventType.STATUS_CHANGED,
            "from_status": attempt.state.status,
            "to_status": decision.status,
            "reason": outcome.code,
            "details": {"error_message": decision.error_message, "outcome": outcome.kind.value},
        }
    ]
    if outcome.code == "ExternalIdNotEnforced":
        events.append(
            {
                **common,
                "event_type": AuditEventType.EXTERNAL_ID_NOT_ENFORCED,
                "from_status": None,
                "to_status": None,
                "reason": outcome.code,
                "details": {"role_arn": attempt.details.role_arn},
            }
        )
    if permissions:
        events.append({**common, **permissions})
    return events


def _permissions_event(attempt: Attempt, outcome: Outcome) -> dict[str, Any] | None:
    """`permissions_changed` when the probes found a different set missing than last time.

    The first verdict is a change only if something is missing: "nothing known" to "nothing
    missing" is not news.
    """
    report = outcome.permissions
    if report is None:
        return None
    before = attempt.state.permissions_missing
    if attempt.state.permissions_checked_at is None:
        before = None
    after = sorted(report.missing)
    if sorted(before or ()) == after:
        return None
    return {
        "event_type": AuditEventType.PERMISSIONS_CHANGED,
        "from_status": None,
        "to_status": None,
        "reason": outcome.code,
        "details": {
            "before": None if before is None else sorted(before),
            "after": after,
            "proven": sorted(report.proven),
        },
    }
