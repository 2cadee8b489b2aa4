"""One account from lease to audit event: read, verify against STS, apply with compare-and-set.

The STS call happens between two short transactions, never inside one: a slow AWS answer must
not hold a row lock or a pooled connection. The second transaction applies the result only if the
account still has the role details, status and lease the attempt started from.
"""

from __future__ import annotations

import enum
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AuditEvent, AuditEventType, AwsAccount, OutcomeKind
from worker.circuit import PlatformCircuit
from worker.claims import release_lease
from worker.logging import bind_context, get_logger
from worker.rules import (
    AccountState,
    Decision,
    decide,
    hold_for_wave,
    is_connected_to_failed,
    needs_external_id_check,
)
from worker.settings import Settings
from worker.sts import Observer, Outcome, RoleDetails, StsVerifier

log = get_logger("worker.verify")

WORKER_ACTOR = "worker"


@dataclass(frozen=True, slots=True)
class Attempt:
    """What an attempt read before calling STS; the compare-and-set checks it still holds."""

    account_id: uuid.UUID
    organization_id: uuid.UUID
    lease_id: uuid.UUID
    details: RoleDetails
    state: AccountState
    now: datetime


class Result(enum.StrEnum):
    """How a verification task ended."""

    APPLIED = "applied"
    DISCARDED = "discarded"  # the account changed (or the lease was lost) during the attempt
    SKIPPED = "skipped"  # nothing to do: gone, not ours, or verification paused


_ACCOUNTS = cast(Table, AwsAccount.__table__)

# Statements built once: building one costs more CPU than running it. Parameters are bound at
# execution; SQLAlchemy compiles each of these once per process.
_READ_ATTEMPT = select(
    _ACCOUNTS.c.organization_id,
    _ACCOUNTS.c.aws_account_id,
    _ACCOUNTS.c.role_arn,
    _ACCOUNTS.c.external_id,
    _ACCOUNTS.c.status,
    _ACCOUNTS.c.error_message,
    _ACCOUNTS.c.role_changed_at,
    _ACCOUNTS.c.last_outcome,
    _ACCOUNTS.c.last_error_code,
    _ACCOUNTS.c.consecutive_failures,
    _ACCOUNTS.c.external_id_checked_at,
    func.now().label("now"),
).where(_ACCOUNTS.c.id == bindparam("account_id"), _ACCOUNTS.c.lease_id == bindparam("lease_id"))


def start_attempt(session: Session, account_id: uuid.UUID, lease_id: uuid.UUID) -> Attempt | None:
    """Re-read the account; None if it is gone or no longer leased to this attempt."""
    row = session.execute(
        _READ_ATTEMPT, {"account_id": account_id, "lease_id": lease_id}
    ).one_or_none()
    if row is None:
        return None
    return Attempt(
        account_id=account_id,
        organization_id=row.organization_id,
        lease_id=lease_id,
        details=RoleDetails(
            connection_id=account_id,
            aws_account_id=row.aws_account_id,
            role_arn=row.role_arn,
            external_id=row.external_id,
        ),
        state=AccountState(
            status=row.status,
            error_message=row.error_message,
            role_changed_at=row.role_changed_at,
            last_outcome=row.last_outcome,
            last_error_code=row.last_error_code,
            consecutive_failures=row.consecutive_failures,
            external_id_checked_at=row.external_id_checked_at,
        ),
        now=row.now,
    )


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
    """The events an applied decision records; none when the status did not change."""
    if decision.status == attempt.state.status:
        return []
    common: dict[str, Any] = {
        "organization_id": attempt.organization_id,
        "account_id": attempt.account_id,
        "actor": actor,
        "correlation_id": correlation_id,
    }
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
    return events


# The compare-and-set: the role details (an edit means the result is about a role that no longer
# exists), the status (someone else moved it) and the lease (someone else holds it). NULL
# timestamps leave the stored ones as they are.
_APPLY = (
    update(_ACCOUNTS)
    .where(
        _ACCOUNTS.c.id == bindparam("b_id"),
        _ACCOUNTS.c.lease_id == bindparam("b_lease_id"),
        _ACCOUNTS.c.status == bindparam("b_status"),
        _ACCOUNTS.c.role_arn == bindparam("b_role_arn"),
        _ACCOUNTS.c.external_id == bindparam("b_external_id"),
        _ACCOUNTS.c.aws_account_id == bindparam("b_aws_account_id"),
    )
    .values(
        status=bindparam("new_status"),
        error_message=bindparam("new_error_message"),
        next_due_at=bindparam("new_next_due_at"),
        consecutive_failures=bindparam("new_consecutive_failures"),
        last_outcome=bindparam("new_last_outcome"),
        last_error_code=bindparam("new_last_error_code"),
        last_attempted_at=bindparam("attempted_at"),
        last_verified_at=func.coalesce(bindparam("verified_at"), _ACCOUNTS.c.last_verified_at),
        external_id_checked_at=func.coalesce(
            bindparam("checked_at"), _ACCOUNTS.c.external_id_checked_at
        ),
        lease_id=None,
        lease_expires_at=None,
    )
)
_INSERT_EVENTS = insert(cast(Table, AuditEvent.__table__))


def apply_decision(
    session: Session,
    attempt: Attempt,
    decision: Decision,
    events: list[dict[str, Any]],
) -> bool:
    """Write the decision and its audit events, if the account is as the attempt found it."""
    details = attempt.details
    updated = session.execute(
        _APPLY,
        {
            "b_id": attempt.account_id,
            "b_lease_id": attempt.lease_id,
            "b_status": attempt.state.status,
            "b_role_arn": details.role_arn,
            "b_external_id": details.external_id,
            "b_aws_account_id": details.aws_account_id,
            "new_status": decision.status,
            "new_error_message": decision.error_message,
            "new_next_due_at": decision.next_due_at,
            "new_consecutive_failures": decision.consecutive_failures,
            "new_last_outcome": decision.last_outcome,
            "new_last_error_code": decision.last_error_code,
            "attempted_at": attempt.now,
            "verified_at": attempt.now if decision.verified else None,
            "checked_at": attempt.now if decision.external_id_checked else None,
        },
    )
    if not updated.rowcount:  # type: ignore[attr-defined]
        return False
    if events:
        session.execute(_INSERT_EVENTS, events)
    return True


@dataclass
class Verification:
    """Everything one verification task needs, built once per worker process."""

    sessions: sessionmaker[Session]
    verifier: StsVerifier
    # None: no circuit breaker (`reverify --inline`, which runs without the worker's Redis).
    circuit: PlatformCircuit | None
    settings: Settings
    rng: random.Random


def _outcome_level(attempt: Attempt, outcome: Outcome, changed: bool) -> str:
    if outcome.kind is OutcomeKind.VERIFIED:
        return "info"
    if outcome.kind is OutcomeKind.PLATFORM_FAULT:
        return "error"
    if changed or outcome.unclassified:
        return "warning"
    # A permanently broken account says the same thing on every attempt: only the first time
    # (or a new error) is worth a warning; repeats go to debug.
    if attempt.state.last_error_code == outcome.code:
        return "debug"
    return "warning" if outcome.kind is OutcomeKind.CUSTOMER_MUST_FIX else "info"


def verify_account(
    ctx: Verification,
    account_id: uuid.UUID,
    lease_id: uuid.UUID,
    *,
    actor: str = WORKER_ACTOR,
    correlation_id: str | None = None,
    check_external_id: bool | None = None,
    observe: Observer | None = None,
) -> Result:
    """Verify one leased account and apply the outcome. Safe to run twice for the same lease.

    `check_external_id` forces the enforcement check on or off (None: the rules decide);
    `observe` is told every step of the STS attempt.
    """
    started = time.perf_counter()
    with ctx.sessions.begin() as session:
        attempt = start_attempt(session, account_id, lease_id)
    if attempt is None:
        log.info("verification.skipped", account_id=str(account_id), reason="not_leased")
        return Result.SKIPPED
    bind_context(
        account_id=str(attempt.account_id),
        organization_id=str(attempt.organization_id),
        aws_account_id=attempt.details.aws_account_id,
    )
    if ctx.circuit is not None and ctx.circuit.is_open():
        with ctx.sessions.begin() as session:
            release_lease(
                session, account_id, lease_id, due_in_seconds=ctx.settings.platform_pause_seconds
            )
        log.info("verification.skipped", reason="platform_paused")
        return Result.SKIPPED

    check = check_external_id
    if check is None:
        check = needs_external_id_check(attempt.state, attempt.now, ctx.settings)
    outcome = ctx.verifier.verify(attempt.details, check_external_id=check, observe=observe)
    if (
        outcome.kind is OutcomeKind.PLATFORM_FAULT
        and ctx.circuit is not None
        and ctx.circuit.trip(outcome.code, outcome.message)
    ):
        log.critical(
            "platform.fault",
            error_code=outcome.code,
            detail=outcome.message,
            action="verification paused; no customer status is changed until a probe succeeds",
        )

    decision = decide(attempt.state, outcome, now=attempt.now, settings=ctx.settings, rng=ctx.rng)
    with ctx.sessions.begin() as session:
        if is_connected_to_failed(attempt.state, decision):
            recent = count_recent_failures(
                session, code=outcome.code, window_seconds=ctx.settings.wave_window_seconds
            )
            if recent >= ctx.settings.wave_threshold:
                decision = hold_for_wave(
                    attempt.state, decision, now=attempt.now, settings=ctx.settings, rng=ctx.rng
                )
                log.error(
                    "platform.suspected_fault",
                    error_code=outcome.code,
                    recent_failures=recent,
                    window_seconds=ctx.settings.wave_window_seconds,
                    action="connected -> failed held: too many accounts failing the same way",
                )
        events = audit_events_for(
            attempt, decision, outcome, actor=actor, correlation_id=correlation_id
        )
        applied = apply_decision(session, attempt, decision, events)
        if not applied:
            # Edited, deleted or re-leased meanwhile: the result describes a role that is no
            # longer there. Make the account due again (if the lease is still ours).
            release_lease(session, account_id, lease_id, due_in_seconds=0)
    duration_ms = round((time.perf_counter() - started) * 1000, 1)
    if not applied:
        log.info("verification.discarded", reason="account_changed", duration_ms=duration_ms)
        return Result.DISCARDED
    changed = decision.status != attempt.state.status
    getattr(log, _outcome_level(attempt, outcome, changed))(
        "verification.completed",
        outcome=outcome.kind.value,
        error_code=None if outcome.verified else outcome.code,
        duration_ms=duration_ms,
        sts_calls=outcome.sts_calls,
        external_id_checked=check,
        hold=decision.hold.value if decision.hold else None,
        status=decision.status.value,
    )
    if changed:
        (log.warning if decision.status is AccountStatus.FAILED else log.info)(
            "account.status_changed",
            from_status=attempt.state.status.value,
            to_status=decision.status.value,
            reason=outcome.code,
            error_message=decision.error_message,
        )
    return Result.APPLIED
