"""Accounts from lease to audit event: read, verify against STS, apply with compare-and-set.

The STS calls happen between two short transactions, never inside one: a slow AWS answer must
not hold a row lock or a pooled connection. The second transaction applies each result only if
its account still has the role details, status and lease the attempt started from.

The worker reads a whole chunk of leased accounts with one query and applies their results with
one statement in one transaction (one commit for the chunk, not one per account); the
compare-and-set stays per row, so an edit to one account discards only that account's result.
"""

from __future__ import annotations

import enum
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ARRAY, Table, Uuid, any_, bindparam, func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AuditEvent, AuditEventType, AwsAccount, OutcomeKind
from worker import metrics
from worker.circuit import PlatformCircuit
from worker.claims import release_leases
from worker.logging import bind_context, get_logger
from worker.rules import (
    AccountState,
    Decision,
    decide,
    hold_for_wave,
    is_connected_to_failed,
    needs_external_id_check,
    permissions_to_probe,
)
from worker.settings import Settings
from worker.sts.outcome import Observer, Outcome, RoleDetails
from worker.sts.platform import PLATFORM_ACCOUNT_CODE
from worker.sts.verifier import StsVerifier

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
    due_at: datetime | None = None  # when it fell due (the lag metric)


class Result(enum.StrEnum):
    """How a verification task ended."""

    APPLIED = "applied"
    DISCARDED = "discarded"  # the account changed (or the lease was lost) during the attempt
    SKIPPED = "skipped"  # nothing to do: gone, or not ours


_ACCOUNTS = cast(Table, AwsAccount.__table__)

# Statements built once: building one costs more CPU than running it. Parameters are bound at
# execution. The account ids travel as one array, so the SQL text is the same for any chunk size
# and psycopg prepares it once per connection.
_READ_ATTEMPTS = select(
    _ACCOUNTS.c.id,
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
    _ACCOUNTS.c.next_due_at,
    _ACCOUNTS.c.permissions_checked_at,
    _ACCOUNTS.c.permissions_proven,
    _ACCOUNTS.c.permissions_missing,
    func.now().label("now"),
).where(
    _ACCOUNTS.c.id == any_(bindparam("account_ids", type_=ARRAY(Uuid()))),
    _ACCOUNTS.c.lease_id == bindparam("lease_id"),
)


def read_attempts(
    session: Session, account_ids: Sequence[uuid.UUID], lease_id: uuid.UUID
) -> list[Attempt]:
    """Re-read the accounts still leased to this attempt (in the order given, each once), in one
    query."""
    found: dict[uuid.UUID, Attempt] = {}
    for row in session.execute(
        _READ_ATTEMPTS, {"account_ids": list(account_ids), "lease_id": lease_id}
    ):
        found[row.id] = Attempt(
            account_id=row.id,
            organization_id=row.organization_id,
            lease_id=lease_id,
            details=RoleDetails(
                connection_id=row.id,
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
                permissions_checked_at=row.permissions_checked_at,
                permissions_proven=_tuple_or_none(row.permissions_proven),
                permissions_missing=_tuple_or_none(row.permissions_missing),
            ),
            now=row.now,
            due_at=row.next_due_at,
        )
    # Each account once, however often it was listed: a duplicate would be checked twice and
    # its status change recorded twice.
    return [found[account_id] for account_id in dict.fromkeys(account_ids) if account_id in found]


def _tuple_or_none(values: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if values is None else tuple(values)


def start_attempt(session: Session, account_id: uuid.UUID, lease_id: uuid.UUID) -> Attempt | None:
    """Re-read one account; None if it is gone or no longer leased to this attempt."""
    found = read_attempts(session, [account_id], lease_id)
    return found[0] if found else None


def account_fields(attempt: Attempt) -> dict[str, str]:
    """The fields every log line about this account carries."""
    return {
        "account_id": str(attempt.account_id),
        "organization_id": str(attempt.organization_id),
        "aws_account_id": attempt.details.aws_account_id,
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


@dataclass(frozen=True, slots=True)
class Checked:
    """An attempt and what STS said about it, decided but not yet written."""

    attempt: Attempt
    outcome: Outcome
    decision: Decision
    external_id_checked: bool
    started: float  # time.perf_counter() when the attempt began


@dataclass(frozen=True, slots=True)
class Applied:
    """A checked attempt after the write: the final decision and whether it was applied."""

    checked: Checked
    decision: Decision  # the rules' decision, or the wave guard's hold
    applied: bool


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


# The compare-and-set for a whole chunk in one statement: each row is updated only if it still
# has the role details (an edit means the result is about a role that no longer exists), the
# status (someone else moved it) and the lease (someone else holds it) its attempt read. Rows that
# fail their condition are simply not returned. NULL timestamps keep the stored ones.
_APPLY_MANY = text(
    """
UPDATE aws_accounts AS a SET
    status = v.new_status,
    error_message = v.new_error_message,
    next_due_at = v.new_next_due_at,
    consecutive_failures = v.new_consecutive_failures,
    last_outcome = v.new_last_outcome,
    last_error_code = v.new_last_error_code,
    last_attempted_at = v.attempted_at,
    last_verified_at = coalesce(v.verified_at, a.last_verified_at),
    external_id_checked_at = coalesce(v.checked_at, a.external_id_checked_at),
    permissions_checked_at = CASE WHEN v.forget THEN NULL
        ELSE coalesce(v.probed_at, a.permissions_checked_at) END,
    permissions_proven = CASE WHEN v.forget THEN NULL
        WHEN v.probed_at IS NULL THEN a.permissions_proven
        ELSE string_to_array(v.proven, ',') END,
    permissions_missing = CASE WHEN v.forget THEN NULL
        WHEN v.probed_at IS NULL THEN a.permissions_missing
        ELSE string_to_array(v.missing, ',') END,
    lease_id = NULL,
    lease_expires_at = NULL
FROM unnest(
    CAST(:ids AS uuid[]), CAST(:lease_ids AS uuid[]), CAST(:b_statuses AS text[]),
    CAST(:b_role_arns AS text[]), CAST(:b_external_ids AS text[]),
    CAST(:b_aws_account_ids AS text[]), CAST(:statuses AS text[]),
    CAST(:error_messages AS text[]), CAST(:next_due_ats AS timestamptz[]),
    CAST(:consecutive_failures AS integer[]), CAST(:last_outcomes AS text[]),
    CAST(:last_error_codes AS text[]), CAST(:attempted_ats AS timestamptz[]),
    CAST(:verified_ats AS timestamptz[]), CAST(:checked_ats AS timestamptz[]),
    CAST(:probed_ats AS timestamptz[]), CAST(:proven AS text[]), CAST(:missing AS text[]),
    CAST(:forgets AS boolean[])
) AS v(
    id, lease_id, b_status, b_role_arn, b_external_id, b_aws_account_id, new_status,
    new_error_message, new_next_due_at, new_consecutive_failures, new_last_outcome,
    new_last_error_code, attempted_at, verified_at, checked_at, probed_at, proven, missing,
    forget
)
WHERE a.id = v.id
    AND a.lease_id = v.lease_id
    AND a.status = v.b_status
    AND a.role_arn = v.b_role_arn
    AND a.external_id = v.b_external_id
    AND a.aws_account_id = v.b_aws_account_id
RETURNING a.id
"""
)
_INSERT_EVENTS = insert(cast(Table, AuditEvent.__table__))


def _apply_parameters(
    pairs: Sequence[tuple[Checked, Decision]], *, probing: bool
) -> dict[str, list[Any]]:
    """The compare-and-set's arrays: one element per account, in the same order everywhere."""
    columns: dict[str, list[Any]] = {
        name: []
        for name in (
            "ids",
            "lease_ids",
            "b_statuses",
            "b_role_arns",
            "b_external_ids",
            "b_aws_account_ids",
            "statuses",
            "error_messages",
            "next_due_ats",
            "consecutive_failures",
            "last_outcomes",
            "last_error_codes",
            "attempted_ats",
            "verified_ats",
            "checked_ats",
            "probed_ats",
            "proven",
            "missing",
            "forgets",
        )
    }
    for checked, decision in pairs:
        attempt = checked.attempt
        details = attempt.details
        report = checked.outcome.permissions
        for name, value in (
            ("ids", attempt.account_id),
            ("lease_ids", attempt.lease_id),
            ("b_statuses", attempt.state.status.value),
            ("b_role_arns", details.role_arn),
            ("b_external_ids", details.external_id),
            ("b_aws_account_ids", details.aws_account_id),
            ("statuses", decision.status.value),
            ("error_messages", decision.error_message),
            ("next_due_ats", decision.next_due_at),
            ("consecutive_failures", decision.consecutive_failures),
            ("last_outcomes", decision.last_outcome.value),
            ("last_error_codes", decision.last_error_code),
            ("attempted_ats", attempt.now),
            ("verified_ats", attempt.now if decision.verified else None),
            ("checked_ats", attempt.now if decision.external_id_checked else None),
            # One text per account (a permission name has no comma): unnest() would flatten an
            # array of arrays.
            ("probed_ats", attempt.now if report is not None else None),
            ("proven", ",".join(report.proven) if report is not None else None),
            ("missing", ",".join(report.missing) if report is not None else None),
            # With probing off (PERMISSION_PROBES=none) a connected account's recorded verdict
            # is no longer checked, so it is forgotten rather than left to go stale; turned
            # back on, the next success probes (nothing recorded means due).
            ("forgets", decision.verified and report is None and not probing),
        ):
            columns[name].append(value)
    return columns


_WAVE_LOCK = text(
    "SELECT pg_advisory_xact_lock(CAST(:namespace AS integer), hashtext(:code))"
).bindparams(
    namespace=0x57415645  # "WAVE": keeps these locks apart from any other advisory lock
)


def _hold_waves(ctx: Verification, session: Session, checked: Sequence[Checked]) -> list[Decision]:
    """The wave guard: hold connected -> failed when too many accounts just failed the same way.

    Transitions earlier in the same batch count towards the threshold, as if applied one by one.
    """
    recent: dict[str, int] = {}
    decisions: list[Decision] = []
    codes = sorted(
        {
            item.outcome.code
            for item in checked
            if is_connected_to_failed(item.attempt.state, item.decision)
        }
    )
    for code in codes:
        # Chunks written at the same time cannot see each other's uncommitted events: one at a
        # time per error code (until commit), so each counts what the others wrote. Sorted, so
        # two chunks never wait for each other's locks in opposite orders.
        session.execute(_WAVE_LOCK, {"code": code})
    for item in checked:
        decision = item.decision
        if is_connected_to_failed(item.attempt.state, decision) and not item.outcome.decisive:
            code = item.outcome.code
            if code not in recent:
                recent[code] = count_recent_failures(
                    session, code=code, window_seconds=ctx.settings.wave_window_seconds
                )
            if recent[code] >= ctx.settings.wave_threshold:
                decision = hold_for_wave(
                    item.attempt.state,
                    decision,
                    now=item.attempt.now,
                    settings=ctx.settings,
                    rng=ctx.rng,
                )
                log.error(
                    "platform.suspected_fault",
                    **account_fields(item.attempt),
                    error_code=code,
                    recent_failures=recent[code],
                    window_seconds=ctx.settings.wave_window_seconds,
                    action="connected -> failed held: too many accounts failing the same way",
                )
            else:
                recent[code] += 1
        decisions.append(decision)
    return decisions


def apply_checked(
    ctx: Verification,
    session: Session,
    checked: Sequence[Checked],
    *,
    actor: str,
    correlation_id: str | None,
) -> list[Applied]:
    """Write every decision and its audit events, each only if its account is as it was read.

    One statement for the compare-and-set of all of them, one for their events; the caller's
    transaction makes each status change and its event one commit. An account that changed
    meanwhile has its result discarded and is made due again (if its lease is still ours).
    """
    if not checked:
        return []
    decisions = _hold_waves(ctx, session, checked)
    pairs = list(zip(checked, decisions, strict=True))
    applied_ids = set(
        session.scalars(
            _APPLY_MANY, _apply_parameters(pairs, probing=bool(ctx.settings.permission_probes))
        )
    )
    events = [
        event
        for item, decision in pairs
        if item.attempt.account_id in applied_ids
        for event in audit_events_for(
            item.attempt, decision, item.outcome, actor=actor, correlation_id=correlation_id
        )
    ]
    if events:
        session.execute(_INSERT_EVENTS, events)
    lost: dict[uuid.UUID, list[uuid.UUID]] = {}
    for item in checked:
        if item.attempt.account_id not in applied_ids:
            lost.setdefault(item.attempt.lease_id, []).append(item.attempt.account_id)
    for lease_id, account_ids in lost.items():
        release_leases(session, account_ids, lease_id, due_in_seconds=0)
    return [
        Applied(checked=item, decision=decision, applied=item.attempt.account_id in applied_ids)
        for item, decision in pairs
    ]


@dataclass
class Verification:
    """Everything one verification task needs, built once per worker process."""

    sessions: sessionmaker[Session]
    verifier: StsVerifier
    # None: no circuit breaker (`reverify --inline`, which runs without the worker's Redis).
    circuit: PlatformCircuit | None
    settings: Settings
    rng: random.Random


def check_account(
    ctx: Verification,
    attempt: Attempt,
    *,
    check_external_id: bool | None = None,
    probe_permissions: bool | None = None,
    observe: Observer | None = None,
) -> Checked:
    """Ask STS about one account and decide its new state; nothing is written.

    `check_external_id` and `probe_permissions` force the enforcement check and the permission
    probes on or off (None: the rules decide); `observe` is told every step of the attempt.
    """
    started = time.perf_counter()
    check = check_external_id
    if check is None:
        check = needs_external_id_check(attempt.state, attempt.now, ctx.settings)
    if probe_permissions is None:
        probe = permissions_to_probe(attempt.state, attempt.now, ctx.settings)
    else:
        probe = ctx.settings.permission_probes if probe_permissions else ()
    outcome = ctx.verifier.verify(
        attempt.details, check_external_id=check, probe=probe, observe=observe
    )
    if (
        outcome.kind is OutcomeKind.PLATFORM_FAULT
        and ctx.circuit is not None
        and ctx.circuit.trip(outcome.code, outcome.message)
    ):
        metrics.record_circuit_trip(outcome.code)
        log.critical(
            "platform.fault",
            error_code=outcome.code,
            detail=outcome.message,
            action="verification paused; no customer status is changed until a probe succeeds",
        )
    if outcome.code == PLATFORM_ACCOUNT_CODE:
        # For operators: a customer row points at one of the platform's own accounts (a mistake,
        # or someone probing for a way in). The customer's message says nothing about it.
        log.warning(
            "verification.platform_account_refused",
            **account_fields(attempt),
            role_arn=attempt.details.role_arn,
        )
    decision = decide(attempt.state, outcome, now=attempt.now, settings=ctx.settings, rng=ctx.rng)
    return Checked(
        attempt=attempt,
        outcome=outcome,
        decision=decision,
        external_id_checked=check,
        started=started,
    )


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


def report_applied(result: Applied) -> Result:
    """Log what became of one verification, with its account's fields; returns how it ended."""
    checked, decision = result.checked, result.decision
    attempt, outcome = checked.attempt, checked.outcome
    fields = account_fields(attempt)
    duration_ms = round((time.perf_counter() - checked.started) * 1000, 1)
    metrics.record_applied(result)
    if not result.applied:
        log.info(
            "verification.discarded", **fields, reason="account_changed", duration_ms=duration_ms
        )
        return Result.DISCARDED
    changed = decision.status != attempt.state.status
    getattr(log, _outcome_level(attempt, outcome, changed))(
        "verification.completed",
        **fields,
        outcome=outcome.kind.value,
        error_code=None if outcome.verified else outcome.code,
        duration_ms=duration_ms,
        sts_calls=outcome.sts_calls,
        external_id_checked=checked.external_id_checked,
        probe_calls=outcome.probe_calls,
        permissions_missing=list(outcome.permissions.missing) if outcome.permissions else None,
        service=outcome.service,
        permissions_unknown=outcome.permissions_unknown,
        hold=decision.hold.value if decision.hold else None,
        status=decision.status.value,
    )
    if changed:
        (log.warning if decision.status is AccountStatus.FAILED else log.info)(
            "account.status_changed",
            **fields,
            from_status=attempt.state.status.value,
            to_status=decision.status.value,
            reason=outcome.code,
            error_message=decision.error_message,
        )
    return Result.APPLIED


def verify_account(
    ctx: Verification,
    account_id: uuid.UUID,
    lease_id: uuid.UUID,
    *,
    actor: str = WORKER_ACTOR,
    correlation_id: str | None = None,
    check_external_id: bool | None = None,
    probe_permissions: bool | None = None,
    observe: Observer | None = None,
) -> Result:
    """Verify one leased account and apply the outcome. Safe to run twice for the same lease.

    The worker verifies whole chunks (`worker.tasks`) with the same steps: `read_attempts`,
    `check_account` for each, `apply_checked` for all of them; it also skips accounts while the
    circuit breaker is open, which this function leaves to its caller (`reverify --inline` runs
    without one).
    """
    with ctx.sessions.begin() as session:
        attempt = start_attempt(session, account_id, lease_id)
    if attempt is None:
        log.info("verification.skipped", account_id=str(account_id), reason="not_leased")
        return Result.SKIPPED
    bind_context(**account_fields(attempt))
    checked = check_account(
        ctx,
        attempt,
        check_external_id=check_external_id,
        probe_permissions=probe_permissions,
        observe=observe,
    )
    with ctx.sessions.begin() as session:
        (result,) = apply_checked(
            ctx, session, [checked], actor=actor, correlation_id=correlation_id
        )
    return report_applied(result)
