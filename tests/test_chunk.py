"""A chunk's bookkeeping: each account accounted for once, the last one writing them all."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from models import AccountStatus
from tests.verification import (
    MakeDeps,
    events_of,
    lease_chunk,
    read_account,
)
from worker.chunk import ChunkInFlight
from worker.verify import WORKER_ACTOR, check_account, read_attempts


def test_a_chunk_is_written_by_its_last_account_even_when_one_check_failed(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """An account whose check raised is left to its lease; the others are written together."""
    ids, lease_id = lease_chunk(scratch_sessions, ["ok-X", "ok-Y"])
    deps = make_deps()
    with scratch_sessions.begin() as session:
        first, second = read_attempts(session, ids, lease_id)
    chunk = ChunkInFlight(deps, [first, second], WORKER_ACTOR, None)
    chunk.done(first, check_account(deps, first))
    assert read_account(scratch_sessions, ids[0]).status is AccountStatus.PENDING  # not yet written
    chunk.done(second, None)
    assert read_account(scratch_sessions, ids[0]).status is AccountStatus.CONNECTED
    untouched = read_account(scratch_sessions, ids[1])
    assert (untouched.status, untouched.lease_id) == (AccountStatus.PENDING, lease_id)
    assert second.account_id == ids[1]


def test_an_account_accounted_for_twice_is_written_once(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """An account abandoned by an interrupted hand-over and then reported by its thread: the
    first word counts, the chunk is written once, the late result is left to the lease."""
    ids, lease_id = lease_chunk(scratch_sessions, ["ok-P", "ok-Q"])
    deps = make_deps()
    with scratch_sessions.begin() as session:
        first, second = read_attempts(session, ids, lease_id)
    chunk = ChunkInFlight(deps, [first, second], WORKER_ACTOR, None)
    chunk.done(first, check_account(deps, first))
    chunk.abandon([second])
    chunk.done(second, check_account(deps, second))
    assert [
        (read_account(scratch_sessions, i).status, read_account(scratch_sessions, i).lease_id)
        for i in ids
    ] == [
        (AccountStatus.CONNECTED, None),
        (AccountStatus.PENDING, lease_id),
    ]
    assert len(events_of(scratch_sessions, ids[0])) == 1


def test_a_paused_account_is_released_until_the_pause_ends(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """The circuit opened before its turn: no STS call, lease released, due after the pause."""
    ids, lease_id = lease_chunk(scratch_sessions, ["ok-R", "ok-S"])
    deps = make_deps(platform_pause_seconds=600)
    with scratch_sessions.begin() as session:
        first, second = read_attempts(session, ids, lease_id)
    chunk = ChunkInFlight(deps, [first, second], WORKER_ACTOR, None)
    chunk.paused(second)
    chunk.done(first, check_account(deps, first))
    paused = read_account(scratch_sessions, ids[1])
    attempted = read_account(scratch_sessions, ids[0]).last_attempted_at
    assert (paused.status, paused.lease_id, paused.last_attempted_at) == (
        AccountStatus.PENDING,
        None,
        None,
    )
    assert attempted is not None
    assert paused.next_due_at > attempted + timedelta(seconds=500)
    assert read_account(scratch_sessions, ids[0]).status is AccountStatus.CONNECTED


def test_a_row_the_database_refuses_does_not_hold_back_its_chunk(
    make_deps: MakeDeps, scratch_sessions: sessionmaker[Session]
) -> None:
    """The chunk's statement fails on one account's row: the others are written one by one."""
    ids, lease_id = lease_chunk(scratch_sessions, ["ok-T", "ok-U", "ok-V"])
    deps = make_deps()
    with scratch_sessions.begin() as session:
        attempts = read_attempts(session, ids, lease_id)
    checked = [check_account(deps, attempt) for attempt in attempts]
    # A value the column cannot hold (varchar(128)) stands for any row the database refuses.
    checked[1] = dataclasses.replace(
        checked[1], decision=dataclasses.replace(checked[1].decision, last_error_code="E" * 200)
    )
    chunk = ChunkInFlight(deps, attempts, WORKER_ACTOR, None)
    with capture_logs() as logs:
        for attempt, item in zip(attempts, checked, strict=True):
            chunk.done(attempt, item)
    assert [read_account(scratch_sessions, i).status for i in ids] == [
        AccountStatus.CONNECTED,
        AccountStatus.PENDING,
        AccountStatus.CONNECTED,
    ]
    assert read_account(scratch_sessions, ids[1]).lease_id == lease_id  # left to its lease
    events = [e["event"] for e in logs]
    assert events.count("verification.write_split") == 1
    [error] = [e for e in logs if e["event"] == "verification.error"]
    assert error["account_id"] == str(ids[1])
