"""One account from lease to audit event, against PostgreSQL, Redis and the STS stand-in: a
chunk of one through `worker.chunk`, the code the worker runs for its chunks (no Celery here).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from models import AccountStatus, AuditEventType, AwsAccount, OutcomeKind
from sandbox.standin import StsStandIn
from tests.verification import (
    MakeDeps,
    events_of,
    lease_chunk,
    lease_one,
    read_account,
    statements,
)
from worker.chunk import verify_account
from worker.circuit import PlatformCircuit
from worker.claims import claim_due_accounts
from worker.dispatch import dispatch_due_accounts
from worker.verify import Result, read_attempts


def test_a_working_role_connects_with_one_audit_event(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """pending -> connected, lease released, enforcement recorded, one status_changed event."""
    account_id, lease_id = lease_one(scratch_sessions, "ok-Works")
    result = verify_account(make_deps(), account_id, lease_id, correlation_id="corr-1")
    account = read_account(scratch_sessions, account_id)
    assert result is Result.APPLIED
    assert (account.status, account.error_message, account.lease_id) == (
        AccountStatus.CONNECTED,
        None,
        None,
    )
    assert account.external_id_checked_at is not None
    assert account.last_verified_at is not None
    assert account.next_due_at > account.last_verified_at + timedelta(hours=5)
    [event] = events_of(scratch_sessions, account_id)
    assert (event.event_type, event.from_status, event.to_status, event.reason) == (
        AuditEventType.STATUS_CHANGED,
        AccountStatus.PENDING,
        AccountStatus.CONNECTED,
        "verified",
    )
    assert (event.actor, event.correlation_id) == ("worker", "corr-1")


def test_a_role_without_the_condition_fails_with_two_events(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """Not enforced: failed with the fix in the message, plus an external_id_not_enforced event."""
    account_id, lease_id = lease_one(scratch_sessions, "noext-Open")
    verify_account(make_deps(pending_grace_seconds=0), account_id, lease_id)
    account = read_account(scratch_sessions, account_id)
    assert account.status is AccountStatus.FAILED
    assert account.error_message is not None
    assert "sts:ExternalId" in account.error_message
    assert [e.event_type for e in events_of(scratch_sessions, account_id)] == [
        AuditEventType.STATUS_CHANGED,
        AuditEventType.EXTERNAL_ID_NOT_ENFORCED,
    ]


def test_a_denied_role_in_its_grace_window_stays_pending_without_events(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """A just-created role that is refused stays pending, retried soon, and writes no event."""
    account_id, lease_id = lease_one(scratch_sessions, "deny-New")
    verify_account(make_deps(pending_grace_seconds=600), account_id, lease_id)
    account = read_account(scratch_sessions, account_id)
    assert (account.status, account.last_error_code, account.lease_id) == (
        AccountStatus.PENDING,
        "AccessDenied",
        None,
    )
    assert account.last_attempted_at is not None
    assert account.next_due_at <= account.last_attempted_at + timedelta(seconds=31)
    assert events_of(scratch_sessions, account_id) == []


def test_an_edit_during_verification_discards_the_result(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """The role ARN changes while STS answers: nothing is applied and the account is due now."""
    account_id, lease_id = lease_one(scratch_sessions, "ok-Before")

    def edit_meanwhile() -> None:
        with scratch_sessions.begin() as session:
            session.execute(
                update(AwsAccount)
                .where(AwsAccount.id == account_id)
                .values(role_arn="arn:aws:iam::123456789012:role/deny-After")
            )

    result = verify_account(make_deps(before_call=edit_meanwhile), account_id, lease_id)
    account = read_account(scratch_sessions, account_id)
    assert result is Result.DISCARDED
    assert account.status is AccountStatus.PENDING
    assert account.lease_id is None
    with scratch_sessions() as session:
        assert session.scalar(
            select(AwsAccount.next_due_at <= func.now()).where(AwsAccount.id == account_id)
        )
    assert events_of(scratch_sessions, account_id) == []


def test_a_lost_lease_means_no_write(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """A task whose lease was taken over does nothing (running it twice is harmless)."""
    account_id, _lease = lease_one(scratch_sessions, "ok-Twice")
    assert verify_account(make_deps(), account_id, uuid.uuid4()) is Result.SKIPPED
    assert read_account(scratch_sessions, account_id).status is AccountStatus.PENDING


def test_platform_fault_changes_nothing_and_opens_the_circuit(
    make_deps: MakeDeps,
    scratch_sessions: sessionmaker[Session],
    sts_standin: StsStandIn,
    circuit: PlatformCircuit,
) -> None:
    """Our credentials rejected: status untouched, no event, a critical line, circuit open."""
    account_id, lease_id = lease_one(scratch_sessions, "ok-Fine", status=AccountStatus.CONNECTED)
    sts_standin.configure(platform_credentials_valid=False)
    try:
        with capture_logs() as logs:
            verify_account(make_deps(), account_id, lease_id)
    finally:
        sts_standin.configure(platform_credentials_valid=True)
    account = read_account(scratch_sessions, account_id)
    assert account.status is AccountStatus.CONNECTED
    assert account.last_outcome is OutcomeKind.PLATFORM_FAULT
    assert events_of(scratch_sessions, account_id) == []
    assert circuit.is_open()
    assert any(e["event"] == "platform.fault" and e["log_level"] == "critical" for e in logs)


def test_an_open_circuit_pauses_verification_until_a_probe_succeeds(
    make_deps: MakeDeps,
    scratch_sessions: sessionmaker[Session],
    circuit: PlatformCircuit,
) -> None:
    """While open, the dispatcher probes STS before claiming; a successful probe closes it.
    (Accounts already in flight skip: see the test of an account whose turn comes after the
    circuit opened.)"""
    lease_one(scratch_sessions, "ok-Paused")
    deps = make_deps(platform_pause_seconds=1)
    circuit.trip("InvalidClientTokenId", "test")
    probe_now = PlatformCircuit(circuit._redis, pause_seconds=0, cache_seconds=0)
    probe_now.postpone("InvalidClientTokenId", "still")  # probe due at once
    sent: list[str] = []

    def send(accounts: Sequence[str], lease: str) -> int:
        sent.extend(accounts)
        return 1

    with capture_logs() as logs:
        report = dispatch_due_accounts(
            sessions=scratch_sessions,
            settings=deps.settings,
            send=send,
            queued=lambda: 0,
            circuit=circuit,
            verifier=deps.verifier,
        )
    assert not report.paused
    assert not circuit.is_open()
    assert any(e["event"] == "platform.recovered" for e in logs)


def test_connected_is_confirmed_before_it_fails(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """A connected role that now denies stays connected once, then fails on the re-attempt."""
    account_id, lease_id = lease_one(
        scratch_sessions, "deny-Revoked", status=AccountStatus.CONNECTED
    )
    deps = make_deps()
    verify_account(deps, account_id, lease_id)
    assert read_account(scratch_sessions, account_id).status is AccountStatus.CONNECTED
    with scratch_sessions.begin() as session:
        session.execute(
            update(AwsAccount).where(AwsAccount.id == account_id).values(next_due_at=func.now())
        )
        second = claim_due_accounts(session, limit=1, lease_seconds=60)
    verify_account(deps, account_id, second.lease_id)
    assert read_account(scratch_sessions, account_id).status is AccountStatus.FAILED
    [event] = events_of(scratch_sessions, account_id)
    assert (event.from_status, event.to_status, event.reason) == (
        AccountStatus.CONNECTED,
        AccountStatus.FAILED,
        "AccessDenied",
    )


def test_a_wave_of_identical_failures_is_held(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """Past the threshold, connected -> failed with the same code is held and logged loudly."""
    deps = make_deps(wave_threshold=2, wave_window_seconds=600)
    statuses = []
    with capture_logs() as logs:
        for n in range(3):
            account_id, lease_id = lease_one(
                scratch_sessions,
                f"deny-Wave{n}",
                status=AccountStatus.CONNECTED,
                last_outcome=OutcomeKind.CUSTOMER_MUST_FIX,
            )
            verify_account(deps, account_id, lease_id)
            statuses.append(read_account(scratch_sessions, account_id).status)
    assert statuses == [AccountStatus.FAILED, AccountStatus.FAILED, AccountStatus.CONNECTED]
    assert [e["event"] for e in logs].count("platform.suspected_fault") == 1


def test_repeated_identical_failures_are_quiet(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """A failed account failing the same way again logs at debug, not warning."""
    account_id, lease_id = lease_one(
        scratch_sessions,
        "deny-Broken",
        status=AccountStatus.FAILED,
        last_error_code="AccessDenied",
        last_outcome=OutcomeKind.CUSTOMER_MUST_FIX,
    )
    with capture_logs() as logs:
        verify_account(make_deps(), account_id, lease_id)
    [completed] = [e for e in logs if e["event"] == "verification.completed"]
    assert completed["log_level"] == "debug"
    assert not [e for e in logs if e["event"] == "account.status_changed"]


def test_a_status_change_stands_out(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """Moving to failed logs account.status_changed at warning with from and to."""
    account_id, lease_id = lease_one(scratch_sessions, "deny-Gone")
    with capture_logs() as logs:
        verify_account(make_deps(pending_grace_seconds=0), account_id, lease_id)
    [changed] = [e for e in logs if e["event"] == "account.status_changed"]
    assert (changed["log_level"], changed["from_status"], changed["to_status"]) == (
        "warning",
        "pending",
        "failed",
    )


def test_a_chunk_is_read_with_one_query_in_the_order_given(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """read_attempts returns the accounts still leased to the attempt, each once (a duplicate
    would be verified and recorded twice), with one SELECT for all."""
    ids, lease_id = lease_chunk(scratch_sessions, ["ok-A", "ok-B", "ok-C"])
    with scratch_sessions.begin() as session:
        session.execute(
            update(AwsAccount).where(AwsAccount.id == ids[1]).values(lease_id=uuid.uuid4())
        )
    with statements(scratch_sessions) as seen, scratch_sessions.begin() as session:
        attempts = read_attempts(session, [ids[2], ids[1], ids[0], ids[2]], lease_id)
    assert [a.account_id for a in attempts] == [ids[2], ids[0]]
    assert seen == ["SELECT"]


# --- permission probes ------------------------------------------------------------------------

ALL_PROBES = (
    "iam:GetAccountSummary",
    "ec2:DescribeRegions",
    "s3:ListAllMyBuckets",
    "cloudtrail:DescribeTrails",
)


def test_a_working_role_records_the_permissions_it_proved(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """First success: every probe proven and when; no permissions_changed event (nothing was
    missing before or after)."""
    account_id, lease_id = lease_one(scratch_sessions, "ok-Probed")
    verify_account(make_deps(), account_id, lease_id)
    account = read_account(scratch_sessions, account_id)
    assert account.status is AccountStatus.CONNECTED
    assert account.permissions_checked_at == account.last_verified_at
    assert (account.permissions_proven, account.permissions_missing) == (list(ALL_PROBES), [])
    assert [e.event_type for e in events_of(scratch_sessions, account_id)] == [
        AuditEventType.STATUS_CHANGED
    ]


def test_a_role_without_permissions_fails_naming_them_with_a_permissions_event(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """pending -> failed with MissingPermissions naming all four; permissions_changed records
    unknown -> the four."""
    account_id, lease_id = lease_one(scratch_sessions, "noperms-Bare")
    verify_account(make_deps(pending_grace_seconds=0), account_id, lease_id)
    account = read_account(scratch_sessions, account_id)
    assert (account.status, account.last_error_code) == (
        AccountStatus.FAILED,
        "MissingPermissions",
    )
    assert account.error_message is not None
    assert account.error_message.startswith(
        "Role arn:aws:iam::123456789012:role/noperms-Bare can be assumed, but it is not allowed: "
        "cloudtrail:DescribeTrails, ec2:DescribeRegions, iam:GetAccountSummary, "
        "s3:ListAllMyBuckets."
    )
    assert (account.permissions_proven, account.permissions_missing) == ([], list(ALL_PROBES))
    status, permissions = events_of(scratch_sessions, account_id)
    assert (status.event_type, status.reason) == (
        AuditEventType.STATUS_CHANGED,
        "MissingPermissions",
    )
    assert (permissions.event_type, permissions.from_status, permissions.to_status) == (
        AuditEventType.PERMISSIONS_CHANGED,
        None,
        None,
    )
    assert permissions.details == {
        "before": None,
        "after": sorted(ALL_PROBES),
        "proven": [],
    }


def test_a_change_in_the_missing_set_is_audited_once(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """Missing ec2 twice: one event; then no longer probed for it: connected, and missing
    [ec2] -> [] recorded."""
    account_id, lease_id = lease_one(scratch_sessions, "noec2-Partial")
    verify_account(make_deps(pending_grace_seconds=0), account_id, lease_id)
    for probes in (",".join(ALL_PROBES), ",".join(p for p in ALL_PROBES if p.startswith("ec2"))):
        with scratch_sessions.begin() as session:
            session.execute(
                update(AwsAccount).where(AwsAccount.id == account_id).values(next_due_at=func.now())
            )
            lease = claim_due_accounts(session, limit=1, lease_seconds=60).lease_id
        verify_account(
            make_deps(pending_grace_seconds=0, permission_probes=probes), account_id, lease
        )
        assert read_account(scratch_sessions, account_id).status is AccountStatus.FAILED
    with scratch_sessions.begin() as session:
        session.execute(
            update(AwsAccount).where(AwsAccount.id == account_id).values(next_due_at=func.now())
        )
        lease = claim_due_accounts(session, limit=1, lease_seconds=60).lease_id
    others = ",".join(p for p in ALL_PROBES if not p.startswith("ec2"))
    verify_account(make_deps(permission_probes=others), account_id, lease)
    account = read_account(scratch_sessions, account_id)
    assert (account.status, account.permissions_missing) == (AccountStatus.CONNECTED, [])
    changes = [
        e.details
        for e in events_of(scratch_sessions, account_id)
        if e.event_type is AuditEventType.PERMISSIONS_CHANGED
    ]
    assert [(c["before"], c["after"]) for c in changes] == [
        (None, ["ec2:DescribeRegions"]),
        (["ec2:DescribeRegions"], []),
    ]


def test_a_failing_probe_service_does_not_hold_a_pending_account_back(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """503s from every probed service, nothing denied: the account connects (STS verified it),
    the external-ID check is recorded, the permissions stay unknown (so the probes are due next
    time) and the log names the service and the error."""
    account_id, lease_id = lease_one(scratch_sessions, "probeerror-Flaky")
    with capture_logs() as logs:
        verify_account(make_deps(), account_id, lease_id)
    account = read_account(scratch_sessions, account_id)
    assert (account.status, account.last_outcome, account.last_error_code) == (
        AccountStatus.CONNECTED,
        OutcomeKind.VERIFIED,
        None,
    )
    assert account.external_id_checked_at == account.last_verified_at
    assert (account.permissions_checked_at, account.permissions_proven) == (None, None)
    [completed] = [log for log in logs if log["event"] == "verification.completed"]
    assert (
        completed["outcome"],
        completed["service"],
        completed["permissions_unknown"],
        completed["probe_calls"],
    ) == ("verified", "iam", "ServiceUnavailable", 4)
    assert [e.event_type for e in events_of(scratch_sessions, account_id)] == [
        AuditEventType.STATUS_CHANGED
    ]


def test_missing_permissions_record_the_external_id_check(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """A role lacking a permission was shown to enforce the external ID in the same attempt:
    the check is recorded, so the retries while the customer fixes the policy skip it."""
    account_id, lease_id = lease_one(scratch_sessions, "noec2-Checked")
    verify_account(make_deps(), account_id, lease_id)  # held in the grace window
    account = read_account(scratch_sessions, account_id)
    assert (account.status, account.last_error_code) == (
        AccountStatus.PENDING,
        "MissingPermissions",
    )
    assert account.external_id_checked_at is not None


def test_probing_off_forgets_the_recorded_permissions(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """PERMISSION_PROBES=none: a connected account's recorded verdict (ec2 missing, from when
    probing was on) is cleared on its next success instead of going stale."""
    account_id, lease_id = lease_one(
        scratch_sessions,
        "ok-Stale",
        status=AccountStatus.CONNECTED,
        permissions_checked_at=datetime.now(UTC) - timedelta(days=3),
        permissions_proven=["iam:GetAccountSummary"],
        permissions_missing=["ec2:DescribeRegions"],
    )
    verify_account(make_deps(permission_probes="none"), account_id, lease_id)
    account = read_account(scratch_sessions, account_id)
    assert account.status is AccountStatus.CONNECTED
    assert (
        account.permissions_checked_at,
        account.permissions_proven,
        account.permissions_missing,
    ) == (None, None, None)


def test_probes_that_are_not_due_are_not_made(
    make_deps: MakeDeps,
    scratch_sessions: sessionmaker[Session],
    sts_standin: StsStandIn,
) -> None:
    """Proven an hour ago: the next verification calls no other service and keeps the record."""
    proven_at = datetime.now(UTC) - timedelta(hours=1)
    account_id, lease_id = lease_one(
        scratch_sessions,
        "noperms-WouldFail",
        status=AccountStatus.CONNECTED,
        role_changed_at=proven_at - timedelta(days=1),
        permissions_checked_at=proven_at,
        permissions_proven=list(ALL_PROBES),
        permissions_missing=[],
    )
    before = sts_standin.stats(roles=False)["probe_requests"]
    verify_account(make_deps(), account_id, lease_id)
    account = read_account(scratch_sessions, account_id)
    assert account.status is AccountStatus.CONNECTED
    assert account.permissions_checked_at == proven_at
    assert sts_standin.stats(roles=False)["probe_requests"] == before
