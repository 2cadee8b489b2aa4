"""The state rules, as plain functions: outcome and current state in, new state out."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from models import AccountStatus, OutcomeKind
from worker.rules import (
    MAX_CONSECUTIVE_FAILURES,
    AccountState,
    Decision,
    Hold,
    backoff,
    decide,
    hold_for_wave,
    is_connected_to_failed,
    jittered,
    needs_external_id_check,
    permissions_to_probe,
)
from worker.settings import Settings
from worker.sts.outcome import Outcome

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
SETTINGS = Settings(jitter_ratio=0.0)

VERIFIED = Outcome(OutcomeKind.VERIFIED, "verified", "ok", external_id_enforced=True)
DENIED = Outcome(OutcomeKind.CUSTOMER_MUST_FIX, "AccessDenied", "Could not assume role ...")
THROTTLED = Outcome(OutcomeKind.TRANSIENT, "Throttling", "Rate exceeded")
BAD_CREDENTIALS = Outcome(OutcomeKind.PLATFORM_FAULT, "InvalidClientTokenId", "invalid token")


def state(
    status: AccountStatus = AccountStatus.PENDING,
    *,
    role_age: timedelta = timedelta(hours=1),
    last_outcome: OutcomeKind | None = None,
    last_error_code: str | None = None,
    failures: int = 0,
    checked_at: datetime | None = None,
    probed_at: datetime | None = None,
    proven: tuple[str, ...] | None = None,
    missing: tuple[str, ...] | None = None,
) -> AccountState:
    """An account state; failed accounts carry a message, as the schema requires."""
    return AccountState(
        status=status,
        error_message="old message" if status is AccountStatus.FAILED else None,
        role_changed_at=NOW - role_age,
        last_outcome=last_outcome,
        last_error_code=last_error_code,
        consecutive_failures=failures,
        external_id_checked_at=checked_at,
        permissions_checked_at=probed_at,
        permissions_proven=proven,
        permissions_missing=missing,
    )


def run(current: AccountState, outcome: Outcome, settings: Settings = SETTINGS) -> Decision:
    """Decide with a fixed clock and no jitter."""
    return decide(current, outcome, now=NOW, settings=settings, rng=random.Random(1))


PLATFORM_ACCOUNT = Outcome(
    OutcomeKind.CUSTOMER_MUST_FIX, "PlatformAccount", "cannot be connected", decisive=True
)


@pytest.mark.parametrize(
    "current",
    [
        state(role_age=timedelta(seconds=1)),
        state(AccountStatus.CONNECTED, last_outcome=OutcomeKind.VERIFIED),
    ],
    ids=["pending-inside-grace", "connected-first-sighting"],
)
def test_a_decisive_refusal_fails_at_once(current: AccountState) -> None:
    """A refusal decided without AWS (the platform's own account) skips grace and confirming."""
    decision = run(current, PLATFORM_ACCOUNT)
    assert (decision.status, decision.hold) == (AccountStatus.FAILED, None)
    assert decision.error_message == PLATFORM_ACCOUNT.message


@pytest.mark.parametrize("status", list(AccountStatus))
def test_verified_connects_and_clears_the_error(status: AccountStatus) -> None:
    """Any account that verifies becomes connected, with no error and no failure count."""
    decision = run(state(status, failures=3), VERIFIED)
    assert (decision.status, decision.error_message, decision.consecutive_failures) == (
        AccountStatus.CONNECTED,
        None,
        0,
    )
    assert decision.next_due_at == NOW + timedelta(seconds=SETTINGS.connected_interval_seconds)
    assert decision.verified
    assert decision.external_id_checked


def test_pending_inside_grace_window_stays_pending() -> None:
    """A refused role created a minute ago may still be propagating: stay pending, retry soon."""
    decision = run(state(role_age=timedelta(minutes=1)), DENIED)
    assert decision.status is AccountStatus.PENDING
    assert decision.hold is Hold.GRACE
    assert decision.next_due_at == NOW + timedelta(seconds=SETTINGS.pending_retry_seconds)
    assert decision.last_error_code == "AccessDenied"


def test_pending_after_grace_window_fails_with_the_message() -> None:
    """Once the grace window is over, pending -> failed with the customer-facing message."""
    decision = run(state(role_age=timedelta(seconds=SETTINGS.pending_grace_seconds)), DENIED)
    assert decision.status is AccountStatus.FAILED
    assert decision.error_message == DENIED.message
    assert decision.hold is None


def test_connected_first_failure_is_confirmed_before_failing() -> None:
    """A connected account refused once stays connected and is re-attempted quickly."""
    decision = run(state(AccountStatus.CONNECTED, last_outcome=OutcomeKind.VERIFIED), DENIED)
    assert decision.status is AccountStatus.CONNECTED
    assert decision.error_message is None
    assert decision.hold is Hold.CONFIRMING
    assert decision.next_due_at == NOW + timedelta(seconds=SETTINGS.confirm_delay_seconds)


def test_connected_second_failure_fails() -> None:
    """The confirming re-attempt failing too moves connected -> failed."""
    current = state(
        AccountStatus.CONNECTED,
        last_outcome=OutcomeKind.CUSTOMER_MUST_FIX,
        last_error_code="AccessDenied",
        failures=1,
    )
    decision = run(current, DENIED)
    assert decision.status is AccountStatus.FAILED
    assert is_connected_to_failed(current, decision)


def test_a_transient_between_failures_restarts_the_confirmation() -> None:
    """connected, refused, throttled, refused: the last refusal is a first sighting again."""
    current = state(AccountStatus.CONNECTED, last_outcome=OutcomeKind.TRANSIENT, failures=2)
    assert run(current, DENIED).hold is Hold.CONFIRMING


def test_failed_backoff_starts_over_after_the_grace_window() -> None:
    """A new connection refused through its whole grace window is retried 5 min, then 10 min
    after failing, not a day apart (the attempts held in the grace window do not count)."""
    grace_attempts = SETTINGS.pending_grace_seconds // SETTINGS.pending_retry_seconds
    current = state(
        role_age=timedelta(seconds=SETTINGS.pending_grace_seconds),
        last_outcome=OutcomeKind.CUSTOMER_MUST_FIX,
        failures=grace_attempts,
    )
    first = run(current, DENIED)
    assert first.status is AccountStatus.FAILED
    assert first.next_due_at == NOW + timedelta(seconds=SETTINGS.failed_backoff_initial_seconds)
    failed = state(
        AccountStatus.FAILED,
        last_outcome=OutcomeKind.CUSTOMER_MUST_FIX,
        failures=first.consecutive_failures,
    )
    second = run(failed, DENIED)
    assert second.next_due_at == NOW + timedelta(
        seconds=2 * SETTINGS.failed_backoff_initial_seconds
    )


def test_failed_stays_failed_with_the_message_refreshed_and_backoff_growing() -> None:
    """A failed account failing again keeps failing, with a fresh message and a longer wait."""
    first = run(state(AccountStatus.FAILED, failures=1), DENIED)
    third = run(state(AccountStatus.FAILED, failures=3), DENIED)
    assert (first.status, first.error_message) == (AccountStatus.FAILED, DENIED.message)
    assert first.next_due_at - NOW == timedelta(seconds=2 * SETTINGS.failed_backoff_initial_seconds)
    assert third.next_due_at - NOW == timedelta(seconds=8 * SETTINGS.failed_backoff_initial_seconds)


def test_failed_backoff_is_capped_at_the_maximum() -> None:
    """However long an account keeps failing, it is looked at again within a day."""
    decision = run(state(AccountStatus.FAILED, failures=40), DENIED)
    assert decision.next_due_at - NOW == timedelta(seconds=SETTINGS.failed_backoff_max_seconds)


@pytest.mark.parametrize("status", list(AccountStatus))
def test_transient_errors_never_change_status(status: AccountStatus) -> None:
    """Throttling leaves every status and message as it was, and retries within minutes."""
    current = state(status, role_age=timedelta(days=3))
    decision = run(current, THROTTLED)
    assert (decision.status, decision.error_message) == (status, current.error_message)
    assert decision.next_due_at - NOW <= timedelta(seconds=SETTINGS.transient_retry_max_seconds)


def test_transient_retries_back_off() -> None:
    """Each consecutive transient error doubles the wait, up to the maximum."""
    delays = [run(state(failures=n), THROTTLED).next_due_at - NOW for n in range(0, 10)]
    assert delays[0] == timedelta(seconds=SETTINGS.transient_retry_initial_seconds)
    assert delays[1] == 2 * delays[0]
    assert delays[-1] == timedelta(seconds=SETTINGS.transient_retry_max_seconds)


@pytest.mark.parametrize("status", list(AccountStatus))
def test_platform_faults_change_nothing_about_the_customer(status: AccountStatus) -> None:
    """Our own broken credentials leave status, message and failure count untouched."""
    current = state(status, failures=2, role_age=timedelta(days=3))
    decision = run(current, BAD_CREDENTIALS)
    assert (decision.status, decision.error_message, decision.consecutive_failures) == (
        status,
        current.error_message,
        2,
    )
    assert decision.next_due_at == NOW + timedelta(seconds=SETTINGS.platform_pause_seconds)


def test_wave_hold_keeps_the_account_connected() -> None:
    """A held connected -> failed keeps the account connected and looks again after the window."""
    current = state(AccountStatus.CONNECTED, last_outcome=OutcomeKind.CUSTOMER_MUST_FIX)
    failing = run(current, DENIED)
    held = hold_for_wave(current, failing, now=NOW, settings=SETTINGS, rng=random.Random(1))
    assert (held.status, held.error_message, held.hold) == (
        AccountStatus.CONNECTED,
        None,
        Hold.WAVE,
    )
    assert held.next_due_at == NOW + timedelta(seconds=SETTINGS.wave_window_seconds)


def test_external_id_is_checked_first_and_then_daily() -> None:
    """Never checked: check; checked an hour ago: skip; checked a day ago: check again."""
    interval = timedelta(seconds=SETTINGS.external_id_check_interval_seconds)
    assert needs_external_id_check(state(), NOW, SETTINGS)
    assert not needs_external_id_check(state(checked_at=NOW - timedelta(hours=1)), NOW, SETTINGS)
    assert needs_external_id_check(state(checked_at=NOW - interval), NOW, SETTINGS)


def test_verified_without_the_check_does_not_record_one() -> None:
    """A success that did not test enforcement does not move external_id_checked_at."""
    outcome = Outcome(OutcomeKind.VERIFIED, "verified", "ok", external_id_enforced=None)
    assert not run(state(), outcome).external_id_checked


def test_jitter_stays_within_its_ratio() -> None:
    """Jitter of 10% keeps an hour between 54 and 66 minutes."""
    rng = random.Random(7)
    values = [jittered(3600, 0.1, rng).total_seconds() for _ in range(1000)]
    assert 3240 <= min(values) < 3300
    assert 3900 < max(values) <= 3960


def test_backoff_doubles_and_caps() -> None:
    """1, 2, 4, 8, then the cap."""
    assert [backoff(1, 10, n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_the_failure_count_is_capped() -> None:
    """An account failing for years never overflows its counter."""
    decision = run(state(AccountStatus.FAILED, failures=MAX_CONSECUTIVE_FAILURES), DENIED)
    assert decision.consecutive_failures == MAX_CONSECUTIVE_FAILURES


ALL = SETTINGS.permission_probes


def test_permissions_are_probed_first_and_then_daily() -> None:
    """Never probed: probe all; proven an hour ago: skip; proven a day ago: probe again."""
    interval = timedelta(seconds=SETTINGS.permission_probe_interval_seconds)
    assert permissions_to_probe(state(), NOW, SETTINGS) == ALL
    recent = state(probed_at=NOW - timedelta(hours=1), proven=ALL, missing=())
    assert permissions_to_probe(recent, NOW, SETTINGS) == ()
    old = state(probed_at=NOW - interval, proven=ALL, missing=())
    assert permissions_to_probe(old, NOW, SETTINGS) == ALL


@pytest.mark.parametrize(
    ("why", "current"),
    [
        ("missing", state(probed_at=NOW, proven=ALL[1:], missing=ALL[:1])),
        # The role changed after the last probe: its permissions are unknown.
        ("role changed", state(probed_at=NOW - timedelta(hours=2), proven=ALL, missing=())),
        ("newly configured", state(probed_at=NOW, proven=ALL[:2], missing=())),
    ],
)
def test_permissions_are_probed_at_once_when_the_last_verdict_says_little(
    why: str, current: AccountState
) -> None:
    """Missing permissions (being fixed), a changed role, or a probe not yet proven: probe now."""
    assert permissions_to_probe(current, NOW, SETTINGS) == ALL, why


def test_no_probes_when_probing_is_off() -> None:
    """PERMISSION_PROBES=none: never due."""
    off = Settings(jitter_ratio=0.0, permission_probes="none")
    assert permissions_to_probe(state(), NOW, off) == ()
