"""Accounts from lease to audit event, against PostgreSQL, Redis and the STS stand-in.

No Celery here: `verify_account` and the chunk steps are the plain functions the task wraps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from models import AccountStatus, AuditEvent, AuditEventType, AwsAccount, OutcomeKind
from sandbox.standin import StsStandIn
from tests.factories import make_account, make_organization
from worker.circuit import PlatformCircuit
from worker.claims import claim_due_accounts
from worker.dispatch import dispatch_due_accounts
from worker.settings import Settings
from worker.sts.verifier import StsVerifier
from worker.tasks import ChunkInFlight, VerificationWindow, check_in_window
from worker.verify import (
    WORKER_ACTOR,
    Result,
    Verification,
    apply_checked,
    check_account,
    read_attempts,
    verify_account,
)


@pytest.fixture(scope="module")
def standin() -> Iterator[StsStandIn]:
    """A zero-latency STS stand-in."""
    with StsStandIn(median_ms=0, seed=3) as sts:
        yield sts


@pytest.fixture
def circuit(redis_url: str) -> Iterator[PlatformCircuit]:
    """A closed circuit breaker on the test Redis, with no local caching."""
    client = redis.Redis.from_url(redis_url)
    breaker = PlatformCircuit(client, pause_seconds=60, cache_seconds=0)
    breaker.close()
    yield breaker
    breaker.close()
    client.close()


@pytest.fixture
def make_ctx(
    scratch_sessions: sessionmaker[Session],
    circuit: PlatformCircuit,
    standin: StsStandIn,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Verification]:
    """Build a verification context; keyword arguments override settings."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", standin.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", standin.endpoint_url)  # the permission probes'
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLATFORMTESTKEY1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")

    def build(before_call: Callable[[], None] | None = None, **overrides: object) -> Verification:
        settings = Settings(sts_max_attempts=1, jitter_ratio=0, **overrides)  # type: ignore[arg-type]
        return Verification(
            sessions=scratch_sessions,
            verifier=StsVerifier(settings, before_call=before_call),
            circuit=circuit,
            settings=settings,
            rng=random.Random(0),
        )

    return build


def _account(
    sessions: sessionmaker[Session], role_name: str, **fields: object
) -> tuple[uuid.UUID, uuid.UUID]:
    """Insert an account for a stand-in role and lease it; returns (account id, lease id)."""
    with sessions.begin() as session:
        organization = make_organization(session)
        account = make_account(
            session,
            organization=organization,
            aws_account_id="123456789012",
            role_arn=f"arn:aws:iam::123456789012:role/{role_name}",
            **fields,
        )
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id != account.id)
            .values(next_due_at=func.now() + timedelta(days=1))
        )
        claim = claim_due_accounts(session, limit=1, lease_seconds=60)
        assert claim.account_ids == [account.id]
        return account.id, claim.lease_id


def _read(sessions: sessionmaker[Session], account_id: uuid.UUID) -> AwsAccount:
    with sessions() as session:
        return session.scalars(select(AwsAccount).where(AwsAccount.id == account_id)).one()


def _events(sessions: sessionmaker[Session], account_id: uuid.UUID) -> list[AuditEvent]:
    with sessions() as session:
        return list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.account_id == account_id)
                .order_by(AuditEvent.id)
            )
        )


def test_a_working_role_connects_with_one_audit_event(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """pending -> connected, lease released, enforcement recorded, one status_changed event."""
    account_id, lease_id = _account(scratch_sessions, "ok-Works")
    result = verify_account(make_ctx(), account_id, lease_id, correlation_id="corr-1")
    account = _read(scratch_sessions, account_id)
    assert result is Result.APPLIED
    assert (account.status, account.error_message, account.lease_id) == (
        AccountStatus.CONNECTED,
        None,
        None,
    )
    assert account.external_id_checked_at is not None
    assert account.last_verified_at is not None
    assert account.next_due_at > account.last_verified_at + timedelta(hours=5)
    [event] = _events(scratch_sessions, account_id)
    assert (event.event_type, event.from_status, event.to_status, event.reason) == (
        AuditEventType.STATUS_CHANGED,
        AccountStatus.PENDING,
        AccountStatus.CONNECTED,
        "verified",
    )
    assert (event.actor, event.correlation_id) == ("worker", "corr-1")


def test_a_role_without_the_condition_fails_with_two_events(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """Not enforced: failed with the fix in the message, plus an external_id_not_enforced event."""
    account_id, lease_id = _account(scratch_sessions, "noext-Open")
    verify_account(make_ctx(pending_grace_seconds=0), account_id, lease_id)
    account = _read(scratch_sessions, account_id)
    assert account.status is AccountStatus.FAILED
    assert account.error_message is not None
    assert "sts:ExternalId" in account.error_message
    assert [e.event_type for e in _events(scratch_sessions, account_id)] == [
        AuditEventType.STATUS_CHANGED,
        AuditEventType.EXTERNAL_ID_NOT_ENFORCED,
    ]


def test_a_denied_role_in_its_grace_window_stays_pending_without_events(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """A just-created role that is refused stays pending, retried soon, and writes no event."""
    account_id, lease_id = _account(scratch_sessions, "deny-New")
    verify_account(make_ctx(pending_grace_seconds=600), account_id, lease_id)
    account = _read(scratch_sessions, account_id)
    assert (account.status, account.last_error_code, account.lease_id) == (
        AccountStatus.PENDING,
        "AccessDenied",
        None,
    )
    assert account.last_attempted_at is not None
    assert account.next_due_at <= account.last_attempted_at + timedelta(seconds=31)
    assert _events(scratch_sessions, account_id) == []


def test_an_edit_during_verification_discards_the_result(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """The role ARN changes while STS answers: nothing is applied and the account is due now."""
    account_id, lease_id = _account(scratch_sessions, "ok-Before")

    def edit_meanwhile() -> None:
        with scratch_sessions.begin() as session:
            session.execute(
                update(AwsAccount)
                .where(AwsAccount.id == account_id)
                .values(role_arn="arn:aws:iam::123456789012:role/deny-After")
            )

    result = verify_account(make_ctx(before_call=edit_meanwhile), account_id, lease_id)
    account = _read(scratch_sessions, account_id)
    assert result is Result.DISCARDED
    assert account.status is AccountStatus.PENDING
    assert account.lease_id is None
    with scratch_sessions() as session:
        assert session.scalar(
            select(AwsAccount.next_due_at <= func.now()).where(AwsAccount.id == account_id)
        )
    assert _events(scratch_sessions, account_id) == []


def test_a_lost_lease_means_no_write(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """A task whose lease was taken over does nothing (running it twice is harmless)."""
    account_id, _lease = _account(scratch_sessions, "ok-Twice")
    assert verify_account(make_ctx(), account_id, uuid.uuid4()) is Result.SKIPPED
    assert _read(scratch_sessions, account_id).status is AccountStatus.PENDING


def test_platform_fault_changes_nothing_and_opens_the_circuit(
    make_ctx: Callable[..., Verification],
    scratch_sessions: sessionmaker[Session],
    standin: StsStandIn,
    circuit: PlatformCircuit,
) -> None:
    """Our credentials rejected: status untouched, no event, a critical line, circuit open."""
    account_id, lease_id = _account(scratch_sessions, "ok-Fine", status=AccountStatus.CONNECTED)
    standin.configure(platform_credentials_valid=False)
    try:
        with capture_logs() as logs:
            verify_account(make_ctx(), account_id, lease_id)
    finally:
        standin.configure(platform_credentials_valid=True)
    account = _read(scratch_sessions, account_id)
    assert account.status is AccountStatus.CONNECTED
    assert account.last_outcome is OutcomeKind.PLATFORM_FAULT
    assert _events(scratch_sessions, account_id) == []
    assert circuit.is_open()
    assert any(e["event"] == "platform.fault" and e["log_level"] == "critical" for e in logs)


def test_an_open_circuit_pauses_verification_until_a_probe_succeeds(
    make_ctx: Callable[..., Verification],
    scratch_sessions: sessionmaker[Session],
    circuit: PlatformCircuit,
) -> None:
    """While open, the dispatcher probes STS before claiming; a successful probe closes it.
    (Accounts already in flight skip: see the test of an account whose turn comes after the
    circuit opened.)"""
    _account(scratch_sessions, "ok-Paused")
    ctx = make_ctx(platform_pause_seconds=1)
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
            settings=ctx.settings,
            send=send,
            queued=lambda: 0,
            circuit=circuit,
            verifier=ctx.verifier,
        )
    assert not report.paused
    assert not circuit.is_open()
    assert any(e["event"] == "platform.recovered" for e in logs)


def test_connected_is_confirmed_before_it_fails(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """A connected role that now denies stays connected once, then fails on the re-attempt."""
    account_id, lease_id = _account(
        scratch_sessions, "deny-Revoked", status=AccountStatus.CONNECTED
    )
    ctx = make_ctx()
    verify_account(ctx, account_id, lease_id)
    assert _read(scratch_sessions, account_id).status is AccountStatus.CONNECTED
    with scratch_sessions.begin() as session:
        session.execute(
            update(AwsAccount).where(AwsAccount.id == account_id).values(next_due_at=func.now())
        )
        second = claim_due_accounts(session, limit=1, lease_seconds=60)
    verify_account(ctx, account_id, second.lease_id)
    assert _read(scratch_sessions, account_id).status is AccountStatus.FAILED
    [event] = _events(scratch_sessions, account_id)
    assert (event.from_status, event.to_status, event.reason) == (
        AccountStatus.CONNECTED,
        AccountStatus.FAILED,
        "AccessDenied",
    )


def test_a_wave_of_identical_failures_is_held(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """Past the threshold, connected -> failed with the same code is held and logged loudly."""
    ctx = make_ctx(wave_threshold=2, wave_window_seconds=600)
    statuses = []
    with capture_logs() as logs:
        for n in range(3):
            account_id, lease_id = _account(
                scratch_sessions,
                f"deny-Wave{n}",
                status=AccountStatus.CONNECTED,
                last_outcome=OutcomeKind.CUSTOMER_MUST_FIX,
            )
            verify_account(ctx, account_id, lease_id)
            statuses.append(_read(scratch_sessions, account_id).status)
    assert statuses == [AccountStatus.FAILED, AccountStatus.FAILED, AccountStatus.CONNECTED]
    assert [e["event"] for e in logs].count("platform.suspected_fault") == 1


def test_repeated_identical_failures_are_quiet(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """A failed account failing the same way again logs at debug, not warning."""
    account_id, lease_id = _account(
        scratch_sessions,
        "deny-Broken",
        status=AccountStatus.FAILED,
        last_error_code="AccessDenied",
        last_outcome=OutcomeKind.CUSTOMER_MUST_FIX,
    )
    with capture_logs() as logs:
        verify_account(make_ctx(), account_id, lease_id)
    [completed] = [e for e in logs if e["event"] == "verification.completed"]
    assert completed["log_level"] == "debug"
    assert not [e for e in logs if e["event"] == "account.status_changed"]


def test_a_status_change_stands_out(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """Moving to failed logs account.status_changed at warning with from and to."""
    account_id, lease_id = _account(scratch_sessions, "deny-Gone")
    with capture_logs() as logs:
        verify_account(make_ctx(pending_grace_seconds=0), account_id, lease_id)
    [changed] = [e for e in logs if e["event"] == "account.status_changed"]
    assert (changed["log_level"], changed["from_status"], changed["to_status"]) == (
        "warning",
        "pending",
        "failed",
    )


def _chunk(
    sessions: sessionmaker[Session], role_names: Sequence[str], **fields: object
) -> tuple[list[uuid.UUID], uuid.UUID]:
    """Insert one account per stand-in role and lease them together; returns (ids, lease id)."""
    with sessions.begin() as session:
        organization = make_organization(session)
        ids = [
            make_account(
                session,
                organization=organization,
                role_arn=f"arn:aws:iam::{n + 100000000000}:role/{role_name}",
                aws_account_id=str(n + 100000000000),
                **fields,
            ).id
            for n, role_name in enumerate(role_names)
        ]
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id.not_in(ids))
            .values(next_due_at=func.now() + timedelta(days=1))
        )
        claim = claim_due_accounts(session, limit=len(ids), lease_seconds=60)
        assert sorted(claim.account_ids) == sorted(ids)
        return ids, claim.lease_id


@contextlib.contextmanager
def _statements(sessions: sessionmaker[Session]) -> Iterator[list[str]]:
    """Record the first word of every SQL statement the scratch engine runs."""
    engine = sessions.kw["bind"]
    seen: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_a_chunk_is_read_with_one_query_in_the_order_given(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """read_attempts returns the accounts still leased to the attempt, each once (a duplicate
    would be verified and recorded twice), with one SELECT for all."""
    ids, lease_id = _chunk(scratch_sessions, ["ok-A", "ok-B", "ok-C"])
    with scratch_sessions.begin() as session:
        session.execute(
            update(AwsAccount).where(AwsAccount.id == ids[1]).values(lease_id=uuid.uuid4())
        )
    with _statements(scratch_sessions) as seen, scratch_sessions.begin() as session:
        attempts = read_attempts(session, [ids[2], ids[1], ids[0], ids[2]], lease_id)
    assert [a.account_id for a in attempts] == [ids[2], ids[0]]
    assert seen == ["SELECT"]


def test_a_chunk_is_applied_in_one_transaction_and_an_edit_discards_only_its_account(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """Three results, one account edited meanwhile: two applied with events, one due again."""
    ids, lease_id = _chunk(scratch_sessions, ["ok-One", "deny-Two", "ok-Three"])
    ctx = make_ctx(pending_grace_seconds=0)
    with scratch_sessions.begin() as session:
        attempts = read_attempts(session, ids, lease_id)
    checked = [check_account(ctx, attempt) for attempt in attempts]
    with scratch_sessions.begin() as session:
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id == ids[2])
            .values(role_arn=f"arn:aws:iam::{attempts[2].details.aws_account_id}:role/ok-New")
        )
    with _statements(scratch_sessions) as seen, scratch_sessions.begin() as session:
        results = apply_checked(ctx, session, checked, actor="worker", correlation_id="corr-9")
    assert [r.applied for r in results] == [True, True, False]
    assert [_read(scratch_sessions, i).status for i in ids] == [
        AccountStatus.CONNECTED,
        AccountStatus.FAILED,
        AccountStatus.PENDING,
    ]
    assert [_read(scratch_sessions, i).lease_id for i in ids] == [None, None, None]
    assert [[e.to_status for e in _events(scratch_sessions, i)] for i in ids] == [
        [AccountStatus.CONNECTED],
        [AccountStatus.FAILED],
        [],
    ]
    # The compare-and-set for all three, the events of both, the discarded one's release.
    assert seen == ["UPDATE", "INSERT", "UPDATE"]
    with scratch_sessions() as session:
        assert session.scalar(
            select(AwsAccount.next_due_at <= func.now()).where(AwsAccount.id == ids[2])
        )


def test_the_wave_guard_counts_failures_earlier_in_the_same_chunk(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """Threshold 2: of three connected accounts failing the same way together, the third holds."""
    ids, lease_id = _chunk(
        scratch_sessions,
        ["deny-W1", "deny-W2", "deny-W3"],
        status=AccountStatus.CONNECTED,
        last_outcome=OutcomeKind.CUSTOMER_MUST_FIX,
    )
    ctx = make_ctx(wave_threshold=2, wave_window_seconds=600)
    with scratch_sessions.begin() as session:
        checked = [check_account(ctx, a) for a in read_attempts(session, ids, lease_id)]
    with capture_logs() as logs, scratch_sessions.begin() as session:
        apply_checked(ctx, session, checked, actor="worker", correlation_id=None)
    assert [_read(scratch_sessions, i).status for i in ids] == [
        AccountStatus.FAILED,
        AccountStatus.FAILED,
        AccountStatus.CONNECTED,
    ]
    [held] = [e for e in logs if e["event"] == "platform.suspected_fault"]
    assert held["account_id"] == str(ids[2])


def test_a_chunk_is_written_by_its_last_account_even_when_one_check_failed(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """An account whose check raised is left to its lease; the others are written together."""
    ids, lease_id = _chunk(scratch_sessions, ["ok-X", "ok-Y"])
    ctx = make_ctx()
    with scratch_sessions.begin() as session:
        first, second = read_attempts(session, ids, lease_id)
    chunk = ChunkInFlight(ctx, [first, second], WORKER_ACTOR, None)
    chunk.done(first, check_account(ctx, first))
    assert _read(scratch_sessions, ids[0]).status is AccountStatus.PENDING  # not yet written
    chunk.done(second, None)
    assert _read(scratch_sessions, ids[0]).status is AccountStatus.CONNECTED
    untouched = _read(scratch_sessions, ids[1])
    assert (untouched.status, untouched.lease_id) == (AccountStatus.PENDING, lease_id)
    assert second.account_id == ids[1]


def test_an_account_accounted_for_twice_is_written_once(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """An account abandoned by an interrupted hand-over and then reported by its thread: the
    first word counts, the chunk is written once, the late result is left to the lease."""
    ids, lease_id = _chunk(scratch_sessions, ["ok-P", "ok-Q"])
    ctx = make_ctx()
    with scratch_sessions.begin() as session:
        first, second = read_attempts(session, ids, lease_id)
    chunk = ChunkInFlight(ctx, [first, second], WORKER_ACTOR, None)
    chunk.done(first, check_account(ctx, first))
    chunk.abandon([second])
    chunk.done(second, check_account(ctx, second))
    assert [
        (_read(scratch_sessions, i).status, _read(scratch_sessions, i).lease_id) for i in ids
    ] == [
        (AccountStatus.CONNECTED, None),
        (AccountStatus.PENDING, lease_id),
    ]
    assert len(_events(scratch_sessions, ids[0])) == 1


def test_a_paused_account_is_released_until_the_pause_ends(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """The circuit opened before its turn: no STS call, lease released, due after the pause."""
    ids, lease_id = _chunk(scratch_sessions, ["ok-R", "ok-S"])
    ctx = make_ctx(platform_pause_seconds=600)
    with scratch_sessions.begin() as session:
        first, second = read_attempts(session, ids, lease_id)
    chunk = ChunkInFlight(ctx, [first, second], WORKER_ACTOR, None)
    chunk.paused(second)
    chunk.done(first, check_account(ctx, first))
    paused = _read(scratch_sessions, ids[1])
    attempted = _read(scratch_sessions, ids[0]).last_attempted_at
    assert (paused.status, paused.lease_id, paused.last_attempted_at) == (
        AccountStatus.PENDING,
        None,
        None,
    )
    assert attempted is not None
    assert paused.next_due_at > attempted + timedelta(seconds=500)
    assert _read(scratch_sessions, ids[0]).status is AccountStatus.CONNECTED


def test_a_row_the_database_refuses_does_not_hold_back_its_chunk(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """The chunk's statement fails on one account's row: the others are written one by one."""
    ids, lease_id = _chunk(scratch_sessions, ["ok-T", "ok-U", "ok-V"])
    ctx = make_ctx()
    with scratch_sessions.begin() as session:
        attempts = read_attempts(session, ids, lease_id)
    checked = [check_account(ctx, attempt) for attempt in attempts]
    # A value the column cannot hold (varchar(128)) stands for any row the database refuses.
    checked[1] = dataclasses.replace(
        checked[1], decision=dataclasses.replace(checked[1].decision, last_error_code="E" * 200)
    )
    chunk = ChunkInFlight(ctx, attempts, WORKER_ACTOR, None)
    with capture_logs() as logs:
        for attempt, item in zip(attempts, checked, strict=True):
            chunk.done(attempt, item)
    assert [_read(scratch_sessions, i).status for i in ids] == [
        AccountStatus.CONNECTED,
        AccountStatus.PENDING,
        AccountStatus.CONNECTED,
    ]
    assert _read(scratch_sessions, ids[1]).lease_id == lease_id  # left to its lease
    events = [e["event"] for e in logs]
    assert events.count("verification.write_split") == 1
    [error] = [e for e in logs if e["event"] == "verification.error"]
    assert error["account_id"] == str(ids[1])


def test_an_account_whose_turn_comes_after_the_circuit_opened_makes_no_sts_call(
    make_ctx: Callable[..., Verification],
    scratch_sessions: sessionmaker[Session],
    circuit: PlatformCircuit,
) -> None:
    """The circuit opened while the account waited for a slot: no STS call, the slot is given
    back, the lease is released until the pause ends."""
    calls: list[str] = []
    ctx = make_ctx(before_call=lambda: calls.append("sts"), platform_pause_seconds=600)
    ids, lease_id = _chunk(scratch_sessions, ["ok-W"])
    with scratch_sessions.begin() as session:
        [attempt] = read_attempts(session, ids, lease_id)
    window = VerificationWindow(1)
    try:
        assert window.slots.acquire(timeout=0)
        circuit.trip("InvalidClientTokenId", "test")
        check_in_window(ctx, attempt, ChunkInFlight(ctx, [attempt], WORKER_ACTOR, None), window)
        assert window.slots.acquire(timeout=0), "the slot was given back"
    finally:
        window.drain()
    account = _read(scratch_sessions, ids[0])
    assert (calls, account.status, account.lease_id, account.last_attempted_at) == (
        [],
        AccountStatus.PENDING,
        None,
        None,
    )
    with scratch_sessions() as session:
        assert session.scalar(
            select(AwsAccount.next_due_at > func.now() + timedelta(seconds=500)).where(
                AwsAccount.id == ids[0]
            )
        )


def test_chunks_written_at_the_same_time_count_each_others_wave(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """Threshold 2: a chunk failing two connected accounts has not committed yet when another
    chunk fails a third the same way; the second waits for the first and holds its account."""
    ctx = make_ctx(wave_threshold=2, wave_window_seconds=600)
    fields = {"status": AccountStatus.CONNECTED, "last_outcome": OutcomeKind.CUSTOMER_MUST_FIX}
    first_ids, first_lease = _chunk(scratch_sessions, ["deny-C1", "deny-C2"], **fields)
    second_ids, second_lease = _chunk(scratch_sessions, ["deny-C3"], **fields)
    with scratch_sessions.begin() as session:
        first = [check_account(ctx, a) for a in read_attempts(session, first_ids, first_lease)]
        second = [check_account(ctx, a) for a in read_attempts(session, second_ids, second_lease)]

    def write_second() -> None:
        with scratch_sessions.begin() as session:
            apply_checked(ctx, session, second, actor="worker", correlation_id=None)

    with scratch_sessions.begin() as session:
        apply_checked(ctx, session, first, actor="worker", correlation_id=None)
        writer = threading.Thread(target=write_second)
        writer.start()
        writer.join(timeout=1.0)
        assert writer.is_alive(), "the second chunk waits for the first one's commit"
    writer.join(timeout=30)
    assert [_read(scratch_sessions, i).status for i in [*first_ids, *second_ids]] == [
        AccountStatus.FAILED,
        AccountStatus.FAILED,
        AccountStatus.CONNECTED,
    ]


# --- permission probes ------------------------------------------------------------------------

ALL_PROBES = (
    "iam:GetAccountSummary",
    "ec2:DescribeRegions",
    "s3:ListAllMyBuckets",
    "cloudtrail:DescribeTrails",
)


def test_a_working_role_records_the_permissions_it_proved(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """First success: every probe proven and when; no permissions_changed event (nothing was
    missing before or after)."""
    account_id, lease_id = _account(scratch_sessions, "ok-Probed")
    verify_account(make_ctx(), account_id, lease_id)
    account = _read(scratch_sessions, account_id)
    assert account.status is AccountStatus.CONNECTED
    assert account.permissions_checked_at == account.last_verified_at
    assert (account.permissions_proven, account.permissions_missing) == (list(ALL_PROBES), [])
    assert [e.event_type for e in _events(scratch_sessions, account_id)] == [
        AuditEventType.STATUS_CHANGED
    ]


def test_a_role_without_permissions_fails_naming_them_with_a_permissions_event(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """pending -> failed with MissingPermissions naming all four; permissions_changed records
    unknown -> the four."""
    account_id, lease_id = _account(scratch_sessions, "noperms-Bare")
    verify_account(make_ctx(pending_grace_seconds=0), account_id, lease_id)
    account = _read(scratch_sessions, account_id)
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
    status, permissions = _events(scratch_sessions, account_id)
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
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """Missing ec2 twice: one event; then no longer probed for it: connected, and missing
    [ec2] -> [] recorded."""
    account_id, lease_id = _account(scratch_sessions, "noec2-Partial")
    verify_account(make_ctx(pending_grace_seconds=0), account_id, lease_id)
    for probes in (",".join(ALL_PROBES), ",".join(p for p in ALL_PROBES if p.startswith("ec2"))):
        with scratch_sessions.begin() as session:
            session.execute(
                update(AwsAccount).where(AwsAccount.id == account_id).values(next_due_at=func.now())
            )
            lease = claim_due_accounts(session, limit=1, lease_seconds=60).lease_id
        verify_account(
            make_ctx(pending_grace_seconds=0, permission_probes=probes), account_id, lease
        )
        assert _read(scratch_sessions, account_id).status is AccountStatus.FAILED
    with scratch_sessions.begin() as session:
        session.execute(
            update(AwsAccount).where(AwsAccount.id == account_id).values(next_due_at=func.now())
        )
        lease = claim_due_accounts(session, limit=1, lease_seconds=60).lease_id
    others = ",".join(p for p in ALL_PROBES if not p.startswith("ec2"))
    verify_account(make_ctx(permission_probes=others), account_id, lease)
    account = _read(scratch_sessions, account_id)
    assert (account.status, account.permissions_missing) == (AccountStatus.CONNECTED, [])
    changes = [
        e.details
        for e in _events(scratch_sessions, account_id)
        if e.event_type is AuditEventType.PERMISSIONS_CHANGED
    ]
    assert [(c["before"], c["after"]) for c in changes] == [
        (None, ["ec2:DescribeRegions"]),
        (["ec2:DescribeRegions"], []),
    ]


def test_a_failing_probe_service_does_not_hold_a_pending_account_back(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """503s from every probed service, nothing denied: the account connects (STS verified it),
    the external-ID check is recorded, the permissions stay unknown (so the probes are due next
    time) and the log names the service and the error."""
    account_id, lease_id = _account(scratch_sessions, "probeerror-Flaky")
    with capture_logs() as logs:
        verify_account(make_ctx(), account_id, lease_id)
    account = _read(scratch_sessions, account_id)
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
    assert [e.event_type for e in _events(scratch_sessions, account_id)] == [
        AuditEventType.STATUS_CHANGED
    ]


def test_missing_permissions_record_the_external_id_check(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """A role lacking a permission was shown to enforce the external ID in the same attempt:
    the check is recorded, so the retries while the customer fixes the policy skip it."""
    account_id, lease_id = _account(scratch_sessions, "noec2-Checked")
    verify_account(make_ctx(), account_id, lease_id)  # held in the grace window
    account = _read(scratch_sessions, account_id)
    assert (account.status, account.last_error_code) == (
        AccountStatus.PENDING,
        "MissingPermissions",
    )
    assert account.external_id_checked_at is not None


def test_probing_off_forgets_the_recorded_permissions(
    make_ctx: Callable[..., Verification], scratch_sessions: sessionmaker[Session]
) -> None:
    """PERMISSION_PROBES=none: a connected account's recorded verdict (ec2 missing, from when
    probing was on) is cleared on its next success instead of going stale."""
    account_id, lease_id = _account(
        scratch_sessions,
        "ok-Stale",
        status=AccountStatus.CONNECTED,
        permissions_checked_at=datetime.now(UTC) - timedelta(days=3),
        permissions_proven=["iam:GetAccountSummary"],
        permissions_missing=["ec2:DescribeRegions"],
    )
    verify_account(make_ctx(permission_probes="none"), account_id, lease_id)
    account = _read(scratch_sessions, account_id)
    assert account.status is AccountStatus.CONNECTED
    assert (
        account.permissions_checked_at,
        account.permissions_proven,
        account.permissions_missing,
    ) == (None, None, None)


def test_probes_that_are_not_due_are_not_made(
    make_ctx: Callable[..., Verification],
    scratch_sessions: sessionmaker[Session],
    standin: StsStandIn,
) -> None:
    """Proven an hour ago: the next verification calls no other service and keeps the record."""
    proven_at = datetime.now(UTC) - timedelta(hours=1)
    account_id, lease_id = _account(
        scratch_sessions,
        "noperms-WouldFail",
        status=AccountStatus.CONNECTED,
        role_changed_at=proven_at - timedelta(days=1),
        permissions_checked_at=proven_at,
        permissions_proven=list(ALL_PROBES),
        permissions_missing=[],
    )
    before = standin.stats(roles=False)["probe_requests"]
    verify_account(make_ctx(), account_id, lease_id)
    account = _read(scratch_sessions, account_id)
    assert account.status is AccountStatus.CONNECTED
    assert account.permissions_checked_at == proven_at
    assert standin.stats(roles=False)["probe_requests"] == before
