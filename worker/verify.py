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
from typing import Any

from sqlalchemy import func, select, update
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


def start_attempt(session: Session, account_id: uuid.UUID, lease_id: uuid.UUID) -> Attempt | None:
    """Re-read the account; None if it is gone or no longer leased to this attempt."""
    row = session.execute(
        select(AwsAccount, func.now()).where(
            AwsAccount.id == account_id, AwsAccount.lease_id == lease_id
        )
    ).one_or_none()
    if row is None:
        return None
    account, now = row
    return Attempt(
        account_id=account.id,
        organization_id=account.organization_id,
        lease_id=lease_id,
        details=RoleDetails(
            connection_id=account.id,
            aws_account_id=account.aws_account_id,
            role_arn=account.role_arn,
            external_id=account.external_id,
        ),
        state=AccountState(
            status=account.status,
            error_message=account.error_message,
            role_changed_at=account.role_changed_at,
            last_outcome=account.last_outcome,
            last_error_code=account.last_error_code,
            consecutive_failures=account.consecutive_failures,
            external_id_checked_at=account.external_id_checked_at,
        ),
        now=now,
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
) -> list[AuditEvent]:
    """The events an applied decision records; none when the status did not change."""
    if decision.status == attempt.state.status:
        return []
    common: dict[str, Any] = {
        "organization_id": attempt.organization_id,
        "account_id": attempt.account_id,
        "actor": actor,
        "correlation_id": correlation_id,
    }
    events = [
        AuditEvent(
            event_type=AuditEventType.STATUS_CHANGED,
            from_status=attempt.state.status,
            to_status=decision.status,
            reason=outcome.code,
            details={"error_message": decision.error_message, "outcome": outcome.kind.value},
            **common,
        )
    ]
    if outcome.code == "ExternalIdNotEnforced":
        events.append(
            AuditEvent(
                event_type=AuditEventType.EXTERNAL_ID_NOT_ENFORCED,
                reason=outcome.code,
                details={"role_arn": attempt.details.role_arn},
                **common,
            )
        )
    return events


def apply_decision(
    session: Session,
    attempt: Attempt,
    decision: Decision,
    events: list[AuditEvent],
) -> bool:
    """Write the decision and its audit events, if the account is as the attempt found it.

    The compare-and-set covers the role details (an edit means the result is about a role that
    no longer exists), the status (someone else moved it) and the lease (someone else holds it).
    """
    details = attempt.details
    values: dict[str, Any] = {
        "status": decision.status,
        "error_message": decision.error_message,
        "next_due_at": decision.next_due_at,
        "consecutive_failures": decision.consecutive_failures,
        "last_outcome": decision.last_outcome,
        "last_error_code": decision.last_error_code,
        "last_attempted_at": attempt.now,
        "lease_id": None,
        "lease_expires_at": None,
    }
    if decision.verified:
        values["last_verified_at"] = attempt.now
    if decision.external_id_checked:
        values["external_id_checked_at"] = attempt.now
    updated = session.execute(
        update(AwsAccount)
        .where(
            AwsAccount.id == attempt.account_id,
            AwsAccount.lease_id == attempt.lease_id,
            AwsAccount.status == attempt.state.status,
            AwsAccount.role_arn == details.role_arn,
            AwsAccount.external_id == details.external_id,
            AwsAccount.aws_account_id == details.aws_account_id,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not updated.rowcount:  # type: ignore[attr-defined]
        return False
    session.add_all(events)
    session.flush()
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
