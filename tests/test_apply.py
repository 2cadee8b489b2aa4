"""Writing a chunk's results: one compare-and-set for all, their audit rows, the wave guard."""

from __future__ import annotations

import threading

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from models import AccountStatus, AwsAccount, OutcomeKind
from tests.verification import (
    MakeDeps,
    events_of,
    lease_chunk,
    read_account,
    statements,
)
from worker.apply import apply_checked
from worker.verify import check_account, read_attempts


def test_a_chunk_is_applied_in_one_transaction_and_an_edit_discards_only_its_account(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """Three results, one account edited meanwhile: two applied with events, one due again."""
    ids, lease_id = lease_chunk(scratch_sessions, ["ok-One", "deny-Two", "ok-Three"])
    deps = make_deps(pending_grace_seconds=0)
    with scratch_sessions.begin() as session:
        attempts = read_attempts(session, ids, lease_id)
    checked = [check_account(deps, attempt) for attempt in attempts]
    with scratch_sessions.begin() as session:
        session.execute(
            update(AwsAccount)
            .where(AwsAccount.id == ids[2])
            .values(role_arn=f"arn:aws:iam::{attempts[2].details.aws_account_id}:role/ok-New")
        )
    with statements(scratch_sessions) as seen, scratch_sessions.begin() as session:
        results = apply_checked(deps, session, checked, actor="worker", correlation_id="corr-9")
    assert [r.applied for r in results] == [True, True, False]
    assert [read_account(scratch_sessions, i).status for i in ids] == [
        AccountStatus.CONNECTED,
        AccountStatus.FAILED,
        AccountStatus.PENDING,
    ]
    assert [read_account(scratch_sessions, i).lease_id for i in ids] == [None, None, None]
    assert [[e.to_status for e in events_of(scratch_sessions, i)] for i in ids] == [
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
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """Threshold 2: of three connected accounts failing the same way together, the third holds."""
    ids, lease_id = lease_chunk(
        scratch_sessions,
        ["deny-W1", "deny-W2", "deny-W3"],
        status=AccountStatus.CONNECTED,
        last_outcome=OutcomeKind.CUSTOMER_MUST_FIX,
    )
    deps = make_deps(wave_threshold=2, wave_window_seconds=600)
    with scratch_sessions.begin() as session:
        checked = [check_account(deps, a) for a in read_attempts(session, ids, lease_id)]
    with capture_logs() as logs, scratch_sessions.begin() as session:
        apply_checked(deps, session, checked, actor="worker", correlation_id=None)
    assert [read_account(scratch_sessions, i).status for i in ids] == [
        AccountStatus.FAILED,
        AccountStatus.FAILED,
        AccountStatus.CONNECTED,
    ]
    [held] = [e for e in logs if e["event"] == "platform.suspected_fault"]
    assert held["account_id"] == str(ids[2])


def test_chunks_written_at_the_same_time_count_each_others_wave(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """Threshold 2: a chunk failing two connected accounts has not committed yet when another
    chunk fails a third the same way; the second waits for the first and holds its account."""
    deps = make_deps(wave_threshold=2, wave_window_seconds=600)
    fields = {"status": AccountStatus.CONNECTED, "last_outcome": OutcomeKind.CUSTOMER_MUST_FIX}
    first_ids, first_lease = lease_chunk(scratch_sessions, ["deny-C1", "deny-C2"], **fields)
    second_ids, second_lease = lease_chunk(scratch_sessions, ["deny-C3"], **fields)
    with scratch_sessions.begin() as session:
        first = [check_account(deps, a) for a in read_attempts(session, first_ids, first_lease)]
        second = [check_account(deps, a) for a in read_attempts(session, second_ids, second_lease)]

    def write_second() -> None:
        with scratch_sessions.begin() as session:
            apply_checked(deps, session, second, actor="worker", correlation_id=None)

    with scratch_sessions.begin() as session:
        apply_checked(deps, session, first, actor="worker", correlation_id=None)
        writer = threading.Thread(target=write_second)
        writer.start()
        writer.join(timeout=1.0)
        assert writer.is_alive(), "the second chunk waits for the first one's commit"
    writer.join(timeout=30)
    assert [read_account(scratch_sessions, i).status for i in [*first_ids, *second_ids]] == [
        AccountStatus.FAILED,
        AccountStatus.FAILED,
        AccountStatus.CONNECTED,
    ]
