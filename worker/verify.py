"""The steps of one verification: read leased accounts, check each against STS, report.

A verification is read -> check -> apply -> report. This module holds the reading, the checking
(one STS attempt and the rules' decision, nothing written) and the reporting; `worker.apply`
writes decisions with a compare-and-set and their audit rows (`worker.audit`), and
`worker.chunk` runs the steps for a chunk of accounts, the same for the worker (many chunks at
once, on the window of `worker.window`) and for `reverify --inline` and the tests (a chunk of one).

The STS calls happen between two short transactions, never inside one: a slow AWS answer must
not hold a row lock or a pooled connection.
"""

from __future__ import annotations

import enum
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import ARRAY, Table, Uuid, any_, bindparam, func, select
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AwsAccount, OutcomeKind
from worker import metrics
from worker.circuit import PlatformCircuit
from worker.logging import get_logger
from worker.rules import (
    AccountState,
    Decision,
    decide,
    needs_external_id_check,
    permissions_to_probe,
)
from worker.settings import Settings
from worker.stall import StallWatch
from worker.sts.outcome import Observer, Outcome, RoleDetails
from worker.sts.platform import PLATFORM_ACCOUNT_CODE
from worker.sts.verifier import StsVerifier

log = get_logger("worker.verify")

WORKER_ACTOR = "worker"


@dataclass(frozen=True, slots=True)
class VerificationDeps:
    """What a verification needs from its process: built once per process by
    `worker.resources`, or by a test for its own database and STS."""

    sessions: sessionmaker[Session]
    verifier: StsVerifier
    # None: no circuit breaker (`reverify --inline`, which runs without the worker's Redis).
    circuit: PlatformCircuit | None
    settings: Settings
    rng: random.Random
    # None: outcomes are not counted for the fleet's stall detector (`reverify --inline`, tests).
    stall: StallWatch | None = None


@dataclass(frozen=True, slots=True)
class CheckOptions:
    """How an attempt departs from what the rules decide (`reverify --inline` forces both
    checks on and watches every step); the default departs in nothing."""

    check_external_id: bool | None = None  # None: the rules decide
    probe_permissions: bool | None = None  # None: the rules decide
    observe: Observer | None = None  # told every step of the attempt


RULES_DECIDE = CheckOptions()


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
    """How one account's verification ended."""

    APPLIED = "applied"
    DISCARDED = "discarded"  # the account changed (or the lease was lost) during the attempt
    SKIPPED = "skipped"  # nothing to do: gone, or not ours

    ERROR = "error"  # the check or the write failed: left to its lease
    PAUSED = "paused"  # the circuit breaker was open: due again after the pause


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
                account_id=row.id,
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


def account_fields(attempt: Attempt) -> dict[str, str]:
    """The fields every log line about this account carries."""
    return {
        "account_id": str(attempt.account_id),
        "organization_id": str(attempt.organization_id),
        "aws_account_id": attempt.details.aws_account_id,
    }


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


def check_account(
    deps: VerificationDeps, attempt: Attempt, options: CheckOptions = RULES_DECIDE
) -> Checked:
    """Ask STS about one account and decide its new state; nothing is written.

    A platform fault trips the circuit breaker (if the process has one).
    """
    started = time.perf_counter()
    check = options.check_external_id
    if check is None:
        check = needs_external_id_check(attempt.state, attempt.now, deps.settings)
    if options.probe_permissions is None:
        probe = permissions_to_probe(attempt.state, attempt.now, deps.settings)
    else:
        probe = deps.settings.permission_probes if options.probe_permissions else ()
    outcome = deps.verifier.verify(
        attempt.details, check_external_id=check, probe=probe, observe=options.observe
    )
    if (
        outcome.kind is OutcomeKind.PLATFORM_FAULT
        and deps.circuit is not None
        and deps.circuit.trip(outcome.code, outcome.message)
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
    decision = decide(attempt.state, outcome, now=attempt.now, settings=deps.settings, rng=deps.rng)
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
