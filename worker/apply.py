"""Apply checked verifications: the wave guard, then a compare-and-set and audit rows.

The worker applies a chunk's results with one statement in one transaction (one commit for the
chunk, not one per account); the compare-and-set stays per row, so an edit to one account
discards only that account's result.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from worker.audit import audit_events_for, count_recent_failures, insert_audit_events
from worker.claims import release_leases
from worker.logging import get_logger
from worker.rules import Decision, hold_for_wave, is_connected_to_failed
from worker.verify import Applied, Checked, VerificationDeps, account_fields

log = get_logger("worker.apply")

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


def _hold_waves(
    deps: VerificationDeps, session: Session, checked: Sequence[Checked]
) -> list[Decision]:
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
                    session, code=code, window_seconds=deps.settings.wave_window_seconds
                )
            if recent[code] >= deps.settings.wave_threshold:
                decision = hold_for_wave(
                    item.attempt.state,
                    decision,
                    now=item.attempt.now,
                    settings=deps.settings,
                    rng=deps.rng,
                )
                log.error(
                    "platform.suspected_fault",
                    **account_fields(item.attempt),
                    error_code=code,
                    recent_failures=recent[code],
                    window_seconds=deps.settings.wave_window_seconds,
                    action="connected -> failed held: too many accounts failing the same way",
                )
            else:
                recent[code] += 1
        decisions.append(decision)
    return decisions


def apply_checked(
    deps: VerificationDeps,
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
    decisions = _hold_waves(deps, session, checked)
    pairs = list(zip(checked, decisions, strict=True))
    applied_ids = set(
        session.scalars(
            _APPLY_MANY, _apply_parameters(pairs, probing=bool(deps.settings.permission_probes))
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
    insert_audit_events(session, events)
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
