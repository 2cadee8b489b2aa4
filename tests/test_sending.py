"""Sending verification messages: chunks of account ids, with the correlation id."""

from __future__ import annotations

import json
import uuid
from base64 import b64decode

import redis

from worker.queues import REQUESTED_QUEUE
from worker.sending import send_verifications


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
