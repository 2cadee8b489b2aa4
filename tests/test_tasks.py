"""The thin Celery layer: redelivery cap and chunked sending (no worker, no eager mode)."""

from __future__ import annotations

import json
import uuid
from base64 import b64decode
from collections.abc import Iterator

import pytest
import redis

from worker.celeryconfig import REQUESTED_QUEUE
from worker.settings import get_settings
from worker.tasks import _redelivered_too_often, send_verifications, verify_accounts_task


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
