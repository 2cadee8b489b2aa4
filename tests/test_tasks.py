"""The thin Celery layer: the redelivery cap, and the dispatch task on a database that cut its
connections (no worker, no eager mode)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
import redis

from worker import db, tasks
from worker.settings import get_settings
from worker.tasks import _redelivered_too_often, verify_accounts_task


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


# Celery warns, when the task is first used in-process, about its `queue` attribute.
@pytest.mark.filterwarnings("ignore::celery.exceptions.CDeprecationWarning")
def test_a_dispatch_after_the_database_cut_its_connections_claims_on_fresh_ones(
    broker: redis.Redis, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a database restart the process's pooled connections are dead: the dispatch beat's
    listener sends at once claims on fresh ones instead of failing until the next tick."""
    monkeypatch.setattr(db, "DATABASE_RETRY_DELAYS", (0.0,))
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
