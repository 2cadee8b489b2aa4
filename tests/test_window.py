"""The worker process's window: slots, yielding to a requested verification, the hand-over."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from types import FrameType
from typing import Any

import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from models import AccountStatus, AwsAccount
from tests.verification import MakeDeps, lease_chunk, read_account
from worker.chunk import ChunkInFlight
from worker.circuit import PlatformCircuit
from worker.queues import REQUESTED_QUEUE
from worker.verify import WORKER_ACTOR, Attempt, Result, read_attempts
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


def _hand_over_interrupted(
    window: VerificationWindow, chunk: ChunkInFlight, lease_id: uuid.UUID, *, landing: int
) -> bool:
    """Hand a chunk over, an exception landing on the hand-over's `landing`th statement (its
    line events, counted as a trace function sees them); whether it landed."""
    code = VerificationWindow.hand_over.__code__
    lines = 0

    def line(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
            if lines == landing:
                raise SoftTimeLimitExceeded()  # the trace function is then removed
        return line

    def call(frame: FrameType, event: str, arg: object) -> Any:
        return line if frame.f_code is code else None

    previous = sys.gettrace()
    sys.settrace(call)
    try:
        window.hand_over(chunk, lease_id)
    except SoftTimeLimitExceeded:
        return True
    finally:
        sys.settrace(previous)
    return False


def test_a_hand_over_interrupted_anywhere_loses_no_slot_and_no_result(
    make_deps: MakeDeps,
    scratch_sessions: sessionmaker[Session],
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Celery's soft time limit raises asynchronously, between any two statements of the
    hand-over: wherever it lands, every slot comes back, and every account handed over keeps its
    result (the others are left to their leases)."""
    # The checks wait until the hand-over is over: an account handed over just before the
    # interruption is checked after it.
    handed_over = threading.Event()
    deps = make_deps(before_call=handed_over.wait)
    size = 4
    landing = 0
    interrupted = True
    while interrupted:
        landing += 1
        ids, lease_id = lease_chunk(scratch_sessions, ["ok-A", "ok-B", "ok-C"])
        with scratch_sessions.begin() as session:
            chunk = ChunkInFlight(deps, read_attempts(session, ids, lease_id), WORKER_ACTOR, None)
        window = VerificationWindow(size, broker)
        checked: list[uuid.UUID] = []
        check = window._check

        def counted_check(
            chunk: ChunkInFlight,
            attempt: Attempt,
            checked: list[uuid.UUID] = checked,
            check: Any = check,
        ) -> None:
            checked.append(attempt.account_id)
            check(chunk, attempt)

        monkeypatch.setattr(window, "_check", counted_check)
        handed_over.clear()
        try:
            interrupted = _hand_over_interrupted(window, chunk, lease_id, landing=landing)
        finally:
            handed_over.set()
            window.drain()
        free = sum(window.slots.acquire(timeout=0) for _ in range(size))
        assert free == size, f"a slot lost (statement {landing})"
        # The chunk is written with the result of each account checked (none left waiting for
        # an account neither handed over nor given up); the others are left to their leases.
        kept = {account for account, result in chunk.results.items() if result is not Result.ERROR}
        assert kept == set(checked), f"a result lost (statement {landing})"
    assert landing > 3 * 3  # each account's statements were interrupted
