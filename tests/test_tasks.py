"""The thin Celery layer: redelivery cap, chunked sending and database retries (no worker, no
eager mode)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from base64 import b64decode
from collections.abc import Iterator

import psycopg
import pytest
import redis
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from worker import tasks
from worker.queues import REQUESTED_QUEUE
from worker.settings import get_settings
from worker.tasks import (
    _redelivered_too_often,
    send_verifications,
    verify_accounts_task,
    wait_for_slot,
)


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    """The test Redis, emptied."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_a_message_redelivered_too_often_is_dropped(broker: redis.Redis) -> None:
    """A message whose worker keeps dying runs MAX_REDELIVERIES more times, then is dropped."""
    cap = get_settings().max_redeliveries
    task_id = str(uuid.uuid4())
    verify_accounts_task.push_request(id=task_id, delivery_info={"redelivered": True})
    try:
        verdicts = [_redelivered_too_often(verify_accounts_task) for _ in range(cap + 1)]
    finally:
        verify_accounts_task.pop_request()
    assert verdicts == [False] * cap + [True]


def test_a_first_delivery_is_not_counted(broker: redis.Redis) -> None:
    """Only redeliveries cost a Redis round trip and count toward the cap."""
    verify_accounts_task.push_request(id=str(uuid.uuid4()), delivery_info={"redelivered": False})
    try:
        assert not _redelivered_too_often(verify_accounts_task)
    finally:
        verify_accounts_task.pop_request()
    assert broker.keys("verifier:redeliveries:*") == []


def test_accounts_are_sent_in_chunks_with_the_correlation_id(broker: redis.Redis) -> None:
    """60 accounts at the default chunk size of 25 are three messages, each with the header."""
    ids = [str(uuid.uuid4()) for _ in range(60)]
    sent = send_verifications(ids, "lease-1", queue=REQUESTED_QUEUE, correlation_id="corr-9")
    messages = [json.loads(raw) for raw in broker.lrange(REQUESTED_QUEUE, 0, -1)]
    assert sent == len(messages) == 3
    chunks = [json.loads(b64decode(m["body"]))[0][0] for m in messages]
    assert sorted(i for chunk in chunks for i in chunk) == sorted(ids)
    assert {len(chunk) for chunk in chunks} == {25, 10}
    assert {m["headers"]["x_correlation_id"] for m in messages} == {"corr-9"}


class _Flaky:
    """An operation that raises the given errors in turn, then answers."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def _server_away() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception("connection refused"))


def test_a_database_briefly_away_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection errors are retried with backoff, and the operation's answer comes back."""
    monkeypatch.setattr(tasks, "DATABASE_RETRY_DELAYS", (0.0, 0.0, 0.0))
    operation = _Flaky(_server_away(), _server_away())
    assert tasks.with_database_retry(operation, accounts=3) == "done"
    assert operation.calls == 3


def test_a_database_away_for_too_long_fails_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the last delay the error is raised (the leases bring the accounts back)."""
    monkeypatch.setattr(tasks, "DATABASE_RETRY_DELAYS", (0.0, 0.0))
    operation = _Flaky(*[_server_away() for _ in range(5)])
    with pytest.raises(OperationalError):
        tasks.with_database_retry(operation, accounts=3)
    assert operation.calls == 3


def test_an_error_that_is_not_the_connection_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An integrity error means the statement is wrong, not the network: raised at once."""
    monkeypatch.setattr(tasks, "DATABASE_RETRY_DELAYS", (0.0, 0.0))
    operation = _Flaky(IntegrityError("INSERT", {}, Exception("duplicate key")))
    with pytest.raises(IntegrityError):
        tasks.with_database_retry(operation, accounts=3)
    assert operation.calls == 1


class _DriverError(Exception):
    """A driver error carrying a SQLSTATE, as psycopg's do."""

    def __init__(self, sqlstate: str | None) -> None:
        super().__init__("driver error")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "away"),
    [
        (OperationalError("SELECT 1", {}, _DriverError(None)), True),  # could not connect
        (OperationalError("SELECT 1", {}, _DriverError("08006")), True),  # connection failure
        (OperationalError("SELECT 1", {}, _DriverError("57P01")), True),  # admin shutdown
        (OperationalError("SELECT 1", {}, _DriverError("57014")), False),  # statement timeout
        (OperationalError("SELECT 1", {}, _DriverError("55P03")), False),  # lock timeout
        (IntegrityError("INSERT", {}, _DriverError("23505")), False),  # unique violation
    ],
)
def test_only_a_database_that_is_away_is_waited_for(error: DBAPIError, away: bool) -> None:
    """Connection loss and server shutdown are retried; timeouts and refusals are not."""
    assert tasks.database_away(error) is away


# Celery warns, when the task is first used in-process, about its `queue` attribute.
@pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")
def test_a_dispatch_after_the_database_cut_its_connections_claims_on_fresh_ones(
    broker: redis.Redis, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a database restart the process's pooled connections are dead: the dispatch beat's
    listener sends at once claims on fresh ones instead of failing until the next tick."""
    monkeypatch.setattr(tasks, "DATABASE_RETRY_DELAYS", (0.0,))
    tasks.dispatch_due_accounts_task()  # the process's pool now holds a connection
    with psycopg.connect(database_url, autocommit=True) as admin:
        cut = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'account-verifier' AND datname = %s",
            (database_url.rpartition("/")[2],),
        ).fetchone()
    assert cut is not None
    assert cut[0] >= 1
    assert tasks.dispatch_due_accounts_task()["claimed"] == 0


@pytest.fixture
def full_window() -> Iterator[tasks.VerificationWindow]:
    """A window of one slot, taken."""
    window = tasks.VerificationWindow(1)
    assert window.slots.acquire(timeout=0)
    yield window
    window.drain()


def test_a_scheduled_chunk_waiting_for_room_yields_to_a_request(
    broker: redis.Redis, full_window: tasks.VerificationWindow
) -> None:
    """A scheduled chunk waiting for a slot gives up as soon as a requested verification waits
    for this process, long before its deadline."""
    broker.lpush(REQUESTED_QUEUE, "{}")
    deadline = time.monotonic() + 120
    assert wait_for_slot(full_window, deadline, scheduled=True) == "requested_waiting"


def test_a_scheduled_chunk_with_room_yields_to_a_request_too(broker: redis.Redis) -> None:
    """The hand-over itself is slow under a sweep (the process's main thread shares the
    interpreter with every verification thread): a scheduled chunk yields before its next
    account even when a slot is free."""
    window = tasks.VerificationWindow(1)
    try:
        broker.lpush(REQUESTED_QUEUE, "{}")
        time.sleep(tasks.YIELD_CHECK_SECONDS)  # past the last answer this process cached
        deadline = time.monotonic() + 120
        assert wait_for_slot(window, deadline, scheduled=True) == "requested_waiting"
        assert wait_for_slot(window, deadline, scheduled=False) is None
        window.slots.release()
        # Another process took the request: the next scheduled chunk asks again, it does not
        # yield on what this process saw a moment ago.
        broker.delete(REQUESTED_QUEUE)
        assert wait_for_slot(window, deadline, scheduled=True) is None
    finally:
        window.drain()


def test_a_requested_chunk_waits_for_room_until_its_deadline(
    broker: redis.Redis, full_window: tasks.VerificationWindow
) -> None:
    """A requested chunk never yields, not even to another request."""
    broker.lpush(REQUESTED_QUEUE, "{}")
    deadline = time.monotonic() + 0.3
    assert wait_for_slot(full_window, deadline, scheduled=False) == "window_full"


def test_a_scheduled_chunk_with_nothing_requested_waits_for_room(
    broker: redis.Redis, full_window: tasks.VerificationWindow
) -> None:
    """Without a request waiting, a scheduled chunk takes the slot freed meanwhile."""
    threading.Timer(0.2, full_window.slots.release).start()
    assert wait_for_slot(full_window, time.monotonic() + 60, scheduled=True) is None
