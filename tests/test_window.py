"""The worker process's window: slots, yielding to a requested verification, the hand-over."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AwsAccount
from tests.verification import MakeDeps, lease_chunk, read_account
from worker.chunk import ChunkInFlight
from worker.circuit import PlatformCircuit
from worker.queues import REQUESTED_QUEUE
from worker.verify import WORKER_ACTOR, Result, read_attempts
from worker.window import YIELD_CHECK_SECONDS, VerificationWindow


@pytest.fixture
def full_window(broker: redis.Redis) -> Iterator[VerificationWindow]:
    """A window of one slot, taken."""
    window = VerificationWindow(1, broker)
    assert window.slots.acquire(timeout=0)
    yield window
    window.drain()


def test_a_scheduled_chunk_waiting_for_room_yields_to_a_request(
    broker: redis.Redis, full_window: VerificationWindow
) -> None:
    """A scheduled chunk waiting for a slot gives up as soon as a requested verification waits
    for this process, long before its deadline."""
    broker.lpush(REQUESTED_QUEUE, "{}")
    deadline = time.monotonic() + 120
    assert full_window.wait_for_slot(deadline, scheduled=True) == "requested_waiting"


def test_a_scheduled_chunk_with_room_yields_to_a_request_too(broker: redis.Redis) -> None:
    """The hand-over itself is slow under a sweep (the process's main thread shares the
    interpreter with every verification thread): a scheduled chunk yields before its next
    account even when a slot is free."""
    window = VerificationWindow(1, broker)
    try:
        broker.lpush(REQUESTED_QUEUE, "{}")
        time.sleep(YIELD_CHECK_SECONDS)  # past the last answer this process cached
        deadline = time.monotonic() + 120
        assert window.wait_for_slot(deadline, scheduled=True) == "requested_waiting"
        assert window.wait_for_slot(deadline, scheduled=False) is None
        window.slots.release()
        # Another process took the request: the next scheduled chunk asks again, it does not
        # yield on what this process saw a moment ago.
        broker.delete(REQUESTED_QUEUE)
        assert window.wait_for_slot(deadline, scheduled=True) is None
    finally:
        window.drain()


def test_a_requested_chunk_waits_for_room_until_its_deadline(
    broker: redis.Redis, full_window: VerificationWindow
) -> None:
    """A requested chunk never yields, not even to another request."""
    broker.lpush(REQUESTED_QUEUE, "{}")
    deadline = time.monotonic() + 0.3
    assert full_window.wait_for_slot(deadline, scheduled=False) == "window_full"


def test_a_scheduled_chunk_with_nothing_requested_waits_for_room(
    broker: redis.Redis, full_window: VerificationWindow
) -> None:
    """Without a request waiting, a scheduled chunk takes the slot freed meanwhile."""
    threading.Timer(0.2, full_window.slots.release).start()
    assert full_window.wait_for_slot(time.monotonic() + 60, scheduled=True) is None


def test_an_account_whose_turn_comes_after_the_circuit_opened_makes_no_sts_call(
    make_deps: MakeDeps,
    scratch_sessions: sessionmaker[Session],
    circuit: PlatformCircuit,
    broker: redis.Redis,
) -> None:
    """The circuit opened while the account waited for a slot: no STS call, the slot is given
    back, the lease is released until the pause ends."""
    calls: list[str] = []
    deps = make_deps(before_call=lambda: calls.append("sts"), platform_pause_seconds=600)
    ids, lease_id = lease_chunk(scratch_sessions, ["ok-W"])
    with scratch_sessions.begin() as session:
        [attempt] = read_attempts(session, ids, lease_id)
    window = VerificationWindow(1, broker)
    try:
        circuit.trip("InvalidClientTokenId", "test")
        chunk = ChunkInFlight(deps, [attempt], WORKER_ACTOR, None)
        assert window.hand_over(chunk, lease_id) == {"accepted": 1}
    finally:
        window.drain()
    assert window.slots.acquire(timeout=0), "the slot was given back"
    assert chunk.results == {attempt.account_id: Result.PAUSED}
    account = read_account(scratch_sessions, ids[0])
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
