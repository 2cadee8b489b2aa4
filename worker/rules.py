"""The state rules: an outcome and an account's current state in, the new state out. Pure.

Nothing here touches the database, the network or the clock: callers pass `now` and a random
source, so every rule is tested as a plain function.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from models import AccountStatus, OutcomeKind
from worker.settings import Settings
from worker.sts.outcome import Outcome

MAX_CONSECUTIVE_FAILURES = 1_000_000


@dataclass(frozen=True, slots=True)
class AccountState:
    """What the rules need to know about an account before the attempt."""

    status: AccountStatus
    error_message: str | None
    role_changed_at: datetime
    last_outcome: OutcomeKind | None
    last_error_code: str | None
    consecutive_failures: int
    external_id_checked_at: datetime | None
    # The permission probes' last verdict (None: never probed).
    permissions_checked_at: datetime | None = None
    permissions_proven: tuple[str, ...] | None = None
    permissions_missing: tuple[str, ...] | None = None


class Hold(enum.StrEnum):
    """Why a customer-fixable outcome did not (yet) change the status."""

    GRACE = "grace"  # pending, inside the IAM propagation grace window
    CONFIRMING = "confirming"  # connected, first sighting: re-attempt soon before failing
    WAVE = "wave"  # connected, but too many accounts failed with this code at once


@dataclass(frozen=True, slots=True)
class Decision:
    """The new state of an account after an attempt."""

    status: AccountStatus
    error_message: str | None
    next_due_at: datetime
    consecutive_failures: int
    last_outcome: OutcomeKind
    last_error_code: str | None
    verified: bool
    external_id_checked: bool
    hold: Hold | None = None


def jittered(seconds: float, ratio: float, rng: random.Random) -> timedelta:
    """`seconds` give or take `ratio` of it, so accounts do not fall due in lockstep."""
    return timedelta(seconds=seconds * (1 + rng.uniform(-ratio, ratio)))


def backoff(initial: float, maximum: float, attempt: int) -> float:
    """Exponential backoff: initial, 2x, 4x, ... capped at maximum (attempt counts from 1)."""
    return float(min(maximum, initial * 2 ** min(max(attempt - 1, 0), 30)))


def needs_external_id_check(state: AccountState, now: datetime, settings: Settings) -> bool:
    """Check enforcement on the first success and then at most once per interval."""
    if state.external_id_checked_at is None:
        return True
    interval = timedelta(seconds=settings.external_id_check_interval_seconds)
    return now - state.external_id_checked_at >= interval


def permissions_to_probe(state: AccountState, now: datetime, settings: Settings) -> tuple[str, ...]:
    """The permissions to probe in this attempt; () when no probe is due.

    Due on the first success, then at most once per interval, like the external-ID check; and at
    once while permissions are missing (the customer is fixing them), after the role changed, or
    when the configured set names a permission not yet proven.
    """
    wanted = settings.permission_probes
    if not wanted:
        return ()
    checked = state.permissions_checked_at
    if (
        checked is None
        or checked < state.role_changed_at
        or state.permissions_missing
        or not set(wanted) <= set(state.permissions_proven or ())
    ):
        return wanted
    interval = timedelta(seconds=settings.permission_probe_interval_seconds)
    return wanted if now - checked >= interval else ()


def decide(
    state: AccountState,
    outcome: Outcome,
    *,
    now: datetime,
    settings: Settings,
    rng: random.Random,
) -> Decision:
    """Apply the state rules (docs/design.md) to one outcome (the wave guard is applied
    separately)."""
    kind = outcome.kind
    if kind is OutcomeKind.VERIFIED:
        return Decision(
            status=AccountStatus.CONNECTED,
            error_message=None,
            next_due_at=now
            + jittered(settings.connected_interval_seconds, settings.jitter_ratio, rng),
            consecutive_failures=0,
            last_outcome=kind,
            last_error_code=None,
            verified=True,
            external_id_checked=outcome.external_id_enforced is True,
        )
    if kind is OutcomeKind.PLATFORM_FAULT:
        # Not the customer's doing: nothing about the account changes except when to look again
        # (after the circuit breaker's pause). The failure count is left alone on purpose.
        return Decision(
            status=state.status,
            error_message=state.error_message,
            next_due_at=now + jittered(settings.platform_pause_seconds, settings.jitter_ratio, rng),
            consecutive_failures=state.consecutive_failures,
            last_outcome=kind,
            last_error_code=outcome.code,
            verified=False,
            external_id_checked=False,
        )
    # Capped: an account failing every few minutes for years must not overflow the column.
    failures = min(state.consecutive_failures + 1, MAX_CONSECUTIVE_FAILURES)
    if kind is OutcomeKind.TRANSIENT:
        delay = backoff(
            settings.transient_retry_initial_seconds, settings.transient_retry_max_seconds, failures
        )
        return Decision(
            status=state.status,
            error_message=state.error_message,
            next_due_at=now + jittered(delay, settings.jitter_ratio, rng),
            consecutive_failures=failures,
            last_outcome=kind,
            last_error_code=outcome.code,
            verified=False,
            external_id_checked=outcome.external_id_enforced is True,
        )
    return _customer_must_fix(state, outcome, failures, now=now, settings=settings, rng=rng)


def _customer_must_fix(
    state: AccountState,
    outcome: Outcome,
    failures: int,
    *,
    now: datetime,
    settings: Settings,
    rng: random.Random,
) -> Decision:
    def stay(hold: Hold, delay: float) -> Decision:
        return Decision(
            status=state.status,
            error_message=state.error_message,
            next_due_at=now + jittered(delay, settings.jitter_ratio, rng),
            consecutive_failures=failures,
            last_outcome=OutcomeKind.CUSTOMER_MUST_FIX,
            last_error_code=outcome.code,
            verified=False,
            # Proven in this attempt (a role that lacks permissions is still the right role).
            external_id_checked=outcome.external_id_enforced is True,
            hold=hold,
        )

    if outcome.decisive:
        # Decided without AWS (the platform's own account): no propagation or second look can
        # change it, so neither the grace window nor a confirming re-attempt applies.
        pass
    elif state.status is AccountStatus.PENDING:
        # IAM changes take seconds to minutes to propagate: a role created a moment ago can
        # still be refused. Keep trying quickly until the grace window is over.
        grace = timedelta(seconds=settings.pending_grace_seconds)
        if now - state.role_changed_at < grace:
            return stay(Hold.GRACE, settings.pending_retry_seconds)
    elif state.status is AccountStatus.CONNECTED and (
        state.last_outcome is not OutcomeKind.CUSTOMER_MUST_FIX
    ):
        # A working connection that fails once is confirmed by a quick second attempt first,
        # so a single odd answer never shows a customer "failed".
        return stay(Hold.CONFIRMING, settings.confirm_delay_seconds)
    # Failing (or failing again): back off, growing up to a day. The count restarts when the
    # account becomes failed: the attempts held in the grace window (one every
    # PENDING_RETRY_SECONDS) must not make its first retries as failed a day apart.
    streak = failures if state.status is AccountStatus.FAILED else 1
    delay = backoff(
        settings.failed_backoff_initial_seconds, settings.failed_backoff_max_seconds, streak
    )
    return Decision(
        status=AccountStatus.FAILED,
        error_message=outcome.message,
        next_due_at=now + jittered(delay, settings.jitter_ratio, rng),
        consecutive_failures=streak,
        last_outcome=OutcomeKind.CUSTOMER_MUST_FIX,
        last_error_code=outcome.code,
        verified=False,
        external_id_checked=outcome.external_id_enforced is True,
    )


def is_connected_to_failed(state: AccountState, decision: Decision) -> bool:
    """Whether the decision takes a connected account to failed (what the wave guard watches)."""
    return state.status is AccountStatus.CONNECTED and decision.status is AccountStatus.FAILED


def hold_for_wave(
    state: AccountState,
    decision: Decision,
    *,
    now: datetime,
    settings: Settings,
    rng: random.Random,
) -> Decision:
    """Keep a connected account connected while a wave of identical failures is suspected.

    Many accounts failing the same way at once is far likelier to be the platform's fault than
    every customer's; the account is looked at again after the wave window.
    """
    return Decision(
        status=state.status,
        error_message=state.error_message,
        next_due_at=now + jittered(settings.wave_window_seconds, settings.jitter_ratio, rng),
        consecutive_failures=decision.consecutive_failures,
        last_outcome=decision.last_outcome,
        last_error_code=decision.last_error_code,
        verified=False,
        external_id_checked=decision.external_id_checked,
        hold=Hold.WAVE,
    )
